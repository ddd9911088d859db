"""shardinfer: LLM batch inference over large corpora, sharded across workers, nodes and GPUs."""

__version__ = "0.1.0"
