"""How long a planned run will take and what it will cost: an estimate, before anything runs.

Tokens (the plan's prompt tokens plus every row's max_tokens) over a throughput figure per worker:
``run.expected_tokens_per_s``, else the figure of :data:`MEASURED` for the model's size (scaled by
parameter count from the nearest entry). Figures are what was measured with the source named; a
user's own model, GPU and prompts differ, so the estimate says where its figure comes from.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardinfer.config import Config
from shardinfer.engines.registry import get_engine
from shardinfer.models.info import model_config_json
from shardinfer.planning.plan import Plan


@dataclass(frozen=True)
class Figure:
    params_b: float  # model size, billions of parameters
    tokens_per_s: float  # total (input + output) tokens/s of one worker
    device: str
    source: str


MEASURED = (
    Figure(0.001, 5_600, "CPU core", "tiny model, configs/demo.yaml on a 2-core VM (11,286 tok/s with 2 workers)"),
    Figure(8.0, 33_422, "H100 80GB", "Qwen3-8B FP8, fp8 KV cache, raw vLLM (the GPU recipe's anchor figure)"),
)


@dataclass
class Estimate:
    tokens: int
    tokens_per_s: float
    source: str
    device_hours: float
    cost: float | None

    def lines(self) -> list[str]:
        lines = [f"estimate (not a measurement): {self.tokens:,} tokens at {self.tokens_per_s:,.0f} tok/s per worker "
                 f"-> {self.device_hours:.2f} device-hours ({self.source})"]
        if self.cost is not None:
            lines.append(f"  cost at run.gpu_hour_price: {self.cost:,.2f}")
        else:
            lines.append("  set run.gpu_hour_price for a cost; run.expected_tokens_per_s for your own throughput")
        return lines


def estimate(cfg: Config, plan: Plan) -> Estimate:
    tokens = plan.prompt_tokens + plan.output_tokens
    if cfg.run.expected_tokens_per_s:
        rate, source = cfg.run.expected_tokens_per_s, "run.expected_tokens_per_s"
    else:
        rate, source = _from_table(cfg)
    gpus = max(get_engine(cfg.model.engine).replica_gpus(cfg.model, 1), 1)
    hours = tokens / rate / 3600 * gpus
    price = cfg.run.gpu_hour_price
    return Estimate(tokens, rate, source, hours, None if price is None else hours * price)


def _from_table(cfg: Config) -> tuple[float, str]:
    size = parameters_b(cfg.model.path)
    if size is None:
        figure = MEASURED[-1]
        return figure.tokens_per_s, f"model size unknown: the {figure.params_b:g}B figure on {figure.device}, {figure.source}"
    figure = min(MEASURED, key=lambda f: abs(f.params_b - size) / max(f.params_b, size))
    rate = figure.tokens_per_s * figure.params_b / size  # compute-bound: tokens/s fall with parameters
    scaled = "" if abs(size - figure.params_b) / figure.params_b < 0.25 else f", scaled from {figure.params_b:g}B"
    return rate, f"~{size:.3g}B parameters: {figure.device}, {figure.source}{scaled}"


def parameters_b(path: str) -> float | None:
    """Billions of parameters of a transformer from its config.json (layers, width, vocabulary)."""
    config = model_config_json(path)
    config = config.get("text_config") or config
    try:
        hidden, layers, vocab = int(config["hidden_size"]), int(config["num_hidden_layers"]), int(config["vocab_size"])
    except (KeyError, TypeError, ValueError):
        return None
    inner = int(config.get("intermediate_size") or 4 * hidden)
    per_layer = 4 * hidden * hidden + 3 * hidden * inner
    return (layers * per_layer + vocab * hidden) / 1e9
