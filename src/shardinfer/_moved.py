"""Module names of earlier versions, still importable: ``shardinfer.rundir`` is
:mod:`shardinfer.ledger.rundir`, and so on. Importing an old name gives the module itself (one
module, not a copy) with a DeprecationWarning naming the new one."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

MOVED = {
    "corpus": "inputs.reading", "storage": "inputs.storage", "parquet_slice": "inputs.parquet_slice",
    "unit_reader": "inputs.unit_reader", "input_digest": "inputs.digest",
    "openai_batch": "requests.openai_batch", "prompts": "requests.prompts", "row_options": "requests.row_options",
    "row_requests": "requests.builder",
    "plan": "planning.plan", "fingerprint": "planning.fingerprint", "estimate": "planning.estimate",
    "preflight": "planning.preflight", "examples": "planning.examples",
    "model_info": "models.info", "tiny_model": "models.tiny",
    "rundir": "ledger.rundir", "runstate": "ledger.runstate", "scheduler": "ledger.scheduler",
    "env": "launch.env", "gpus": "launch.gpus",
    "metrics": "telemetry.metrics", "live": "telemetry.live", "monitor": "telemetry.trackers",
    "progress": "telemetry.progress", "timeline": "telemetry.timeline", "status": "telemetry.status",
    "logs": "telemetry.logs", "result_set": "reduce.result_set", "report": "reduce.report", "plot": "reduce.plot",
}


class _OldNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self) -> None:
        self._specs: dict[str, importlib.machinery.ModuleSpec | None] = {}

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        prefix, _, name = fullname.partition(".")
        if prefix != "shardinfer" or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = f"shardinfer.{MOVED[spec.name.partition('.')[2]]}"
        warnings.warn(f"{spec.name} is now {new}", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        self._specs[new] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._specs[module.__name__]  # the module's own spec, not the old name's


def install() -> None:
    if not any(isinstance(f, _OldNames) for f in sys.meta_path):
        sys.meta_path.append(_OldNames())


def forward(package: str, module: str, name: str) -> object:
    """A package that took the name of an earlier module answers for that module's names."""
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        return getattr(importlib.import_module(f"shardinfer.{package}.{module}"), name)
    except AttributeError:
        raise AttributeError(f"module 'shardinfer.{package}' has no attribute {name!r}") from None
