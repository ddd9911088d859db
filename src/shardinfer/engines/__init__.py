"""Engines: one module per backend behind one small interface (:mod:`shardinfer.engines.base`),
each described by an :class:`~shardinfer.engines.registry.EngineSpec` in the registry."""

from __future__ import annotations

from shardinfer.engines.base import BatchQueue, Completion, Engine, Finished
from shardinfer.engines.registry import (
                                         BenchSupport,
                                         Capabilities,
                                         EngineSpec,
                                         create_engine,
                                         engine_names,
                                         get_engine,
                                         register_engine,
)

__all__ = ["BatchQueue", "BenchSupport", "Capabilities", "Completion", "Engine", "EngineSpec", "Finished",
           "create_engine", "engine_names", "get_engine", "register_engine"]
