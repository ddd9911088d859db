"""Engines: one module per backend behind one small interface (see :mod:`shardinfer.engines.base`)."""

from __future__ import annotations

import importlib.util

from shardinfer.config import Config
from shardinfer.engines.base import BatchQueue, Completion, Engine, Finished
from shardinfer.errors import missing_dependency

__all__ = ["BatchQueue", "Completion", "Engine", "Finished", "check_installed", "make_engine"]

_MODULES = {"vllm": ("vllm",), "hf": ("torch", "transformers")}


def check_installed(engine: str) -> None:
    """Fail before planning when the engine's packages are missing, naming the extra to install."""
    for module in _MODULES[engine]:
        if importlib.util.find_spec(module) is None:
            raise missing_dependency(module, engine)


def make_engine(cfg: Config, max_model_len: int) -> Engine:
    if cfg.model.engine == "vllm":
        from shardinfer.engines.vllm_engine import VllmEngine

        return VllmEngine(cfg.model, cfg.sampling, max_model_len, attempts=cfg.run.max_attempts)
    from shardinfer.engines.hf_engine import HfEngine

    return HfEngine(cfg.model, cfg.sampling, max_model_len, attempts=cfg.run.max_attempts)
