"""The engine registry: one :class:`EngineSpec` per engine, the only place engines are told apart.

Each engine module declares its spec (``SPEC``) next to its code: name, pip extra, the modules it
imports, whether it takes arguments (``model.engine_args``, passed to whichever engine runs), how
many GPUs one replica takes, what it supports, and how the benchmark treats it. Config checks,
dispatch, the fingerprint, the report, worker layouts and the benchmark read the spec; nothing else
compares engine names. Engines from plugins (:mod:`shardinfer.plugins`) register with
:func:`register_engine`.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shardinfer.config import Config, ModelConfig
from shardinfer.errors import ConfigError, missing_dependency
from shardinfer.plugins import Registry

if TYPE_CHECKING:
    from shardinfer.engines.base import Engine

_BUILTIN = ("shardinfer.engines.vllm_engine", "shardinfer.engines.hf_engine")


@dataclass(frozen=True)
class Span:
    """Where one node stands in a replica that spans ``nodes`` nodes (node 0 leads)."""

    nodes: int
    node: int
    master_addr: str  # the leader's address, where the engine's processes meet
    master_port: int


@dataclass(frozen=True)
class Capabilities:
    """What an engine does beyond one text out per prompt; a config asking for more is refused."""

    continuous: bool = False  # fed while it runs (submit/poll); else one blocking batch at a time
    structured_output: bool = False  # JSON schema / regex / choice constrained decoding
    lora: bool = False  # LoRA adapters per row
    samples: bool = False  # n > 1 outputs per row
    logprobs: bool = False  # token log-probabilities
    penalties: bool = False  # presence and frequency penalties

    def supported(self) -> list[str]:
        return [name for name, on in vars(self).items() if on]


@dataclass(frozen=True)
class BenchSupport:
    """How ``shardinfer bench`` treats the engine."""

    baseline: str  # mode of shardinfer.bench.raw the pipeline is compared with
    strategies: bool = False  # one-at-a-time / static / continuous comparison available
    # Make a raw ``model`` config section load random weights from config.json alone.
    dummy_weights: Callable[[dict[str, Any], Path], None] | None = None


@dataclass(frozen=True)
class EngineSpec:
    name: str
    description: str
    create: Callable[[Config, int], Engine]  # (config, max_model_len) -> an engine, not loaded yet
    modules: tuple[str, ...]  # imported by the engine: checked before any work starts
    extra: str  # pip install 'shardinfer[<extra>]'
    # GPUs one replica (one worker) takes, given the model config and the GPUs a node has.
    replica_gpus: Callable[[ModelConfig, int], int]
    # Whether it takes model.engine_args (a config giving them to one that does not is refused).
    takes_args: bool = True
    capabilities: Capabilities = field(default_factory=Capabilities)
    install_hint: str = ""  # said after the pip command when a module is missing
    bench: BenchSupport | None = None
    # An engine that brings its own tokenizer (else the model's, loaded with transformers).
    tokenizer: Callable[[ModelConfig], Any] | None = None
    # The argument names the installed engine accepts in model.engine_args, read without loading
    # it (None: it takes any, or it cannot tell).
    argument_names: Callable[[], set[str] | None] | None = None
    tasks: tuple[str, ...] = ("generate",)  # the config tasks it runs (see Config.task)
    # A replica across nodes (slurm.nodes_per_replica > 1); None: the engine cannot span nodes.
    # follower(config, max_model_len, span): run the engine's part on a follower node until it ends.
    follower: Callable[[Config, int, Span], None] | None = None
    # span_args(span): the engine arguments the leader adds for a replica across nodes.
    span_args: Callable[[Span], dict[str, Any]] | None = None
    # span_check(model, nodes_per_replica, gpus_per_node): why that layout cannot work, or None.
    span_check: Callable[[ModelConfig, int, int], str | None] | None = None

    def args(self, model: ModelConfig) -> dict[str, Any]:
        """The engine's own arguments from the config (``model.engine_args``)."""
        return dict(model.engine_args) if self.takes_args else {}

    def check_installed(self) -> None:
        """Fail before planning when a module is missing, naming the extra to install."""
        for module in self.modules:
            if importlib.util.find_spec(module) is None:
                raise missing_dependency(module, self.extra, self.install_hint)

    def version(self) -> str | None:
        """The installed distribution and version of the engine's main module."""
        if not self.modules:
            return None
        module = self.modules[0]
        for dist in importlib.metadata.packages_distributions().get(module, [module]):
            try:
                return f"{dist} {importlib.metadata.version(dist)}"
            except importlib.metadata.PackageNotFoundError:
                continue
        return None


def unknown_arguments(given: dict[str, Any], valid: set[str]) -> list[str]:
    """The given engine arguments that are not valid, each with the closest valid names:
    ``tensor_paralel_size (did you mean tensor_parallel_size, data_parallel_size)``."""
    return [f"{key} (did you mean {', '.join(difflib.get_close_matches(key, sorted(valid), n=2)) or '?'})"
            for key in given if key not in valid]


_REGISTRY: Registry[EngineSpec] = Registry("engine", _BUILTIN, lambda module: [module.SPEC], lambda spec: spec.name)


def register_engine(spec: EngineSpec) -> EngineSpec:
    return _REGISTRY.register(spec)


def engines() -> dict[str, EngineSpec]:
    """Every registered engine by name: the built-in ones first, then plugins'."""
    return _REGISTRY.all()


def engine_names() -> list[str]:
    return list(engines())


def get_engine(name: str) -> EngineSpec:
    known = engines()
    if name not in known:
        raise ConfigError(f"model.engine: {name!r} is not a registered engine. Valid choices: {', '.join(known)}")
    return known[name]


def create_engine(cfg: Config, max_model_len: int) -> Engine:
    return get_engine(cfg.model.engine).create(cfg, max_model_len)
