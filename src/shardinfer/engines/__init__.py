"""Engines: one module per backend behind one small interface.

``load()`` builds the model once; ``generate(prompts)`` takes prompt token ids (the whole unit at
once, so the engine can batch freely) and returns one :class:`Completion` per prompt, in order.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Protocol

from shardinfer.config import Config
from shardinfer.errors import missing_dependency


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (max_tokens reached)


class Engine(Protocol):
    name: str

    def load(self) -> None: ...

    def generate(self, prompts: list[list[int]]) -> list[Completion]: ...

    def versions(self) -> dict[str, str]: ...


_MODULES = {"vllm": ("vllm",), "hf": ("torch", "transformers")}


def check_installed(engine: str) -> None:
    """Fail before planning when the engine's packages are missing, naming the extra to install."""
    for module in _MODULES[engine]:
        if importlib.util.find_spec(module) is None:
            raise missing_dependency(module, engine)


def make_engine(cfg: Config, max_model_len: int) -> Engine:
    if cfg.model.engine == "vllm":
        from shardinfer.engines.vllm_engine import VllmEngine

        return VllmEngine(cfg.model, cfg.sampling, max_model_len)
    from shardinfer.engines.hf_engine import HfEngine

    return HfEngine(cfg.model, cfg.sampling, max_model_len)
