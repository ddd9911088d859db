"""What a row asks of the engine: prompts, per-row options, OpenAI batch requests."""
