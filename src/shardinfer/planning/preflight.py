"""Checks made before anything is written or submitted, on the machine that launches (no GPU, no
weights loaded): what would otherwise fail on a GPU node after the queue wait.

``plan`` prints them, ``run``, ``submit`` and ``resume`` refuse to start when one fails (exit 2),
``submit --dry-run`` prints them with the scripts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from shardinfer.config import Config
from shardinfer.engines.registry import get_engine, unknown_arguments
from shardinfer.errors import ConfigError, ShardinferError
from shardinfer.models.info import looks_local, native_context_length, resolve_max_model_len, tokenizer_path
from shardinfer.models.tasks import model_kind, task_problem
from shardinfer.telemetry.trackers import check_trackers

_WEIGHTS = (".safetensors", ".bin", ".pt", ".gguf")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass
class Check:
    name: str
    status: str  # ok | warn (could not check, or worth a look) | fail
    message: str

    def line(self) -> str:
        return f"  [{self.status:4}] {self.name}: {self.message}"


def preflight(cfg: Config) -> list[Check]:
    """Every check, in order; none raises."""
    checks = [_model(cfg), _tokenizer(cfg), _engine_args(cfg), _context(cfg)]
    if cfg.task != "generate" or model_kind(cfg.model.path) is not None:
        checks.append(_task(cfg))
    if cfg.model.lora:
        checks.append(_lora(cfg))
    if cfg.run.report_to:
        checks.append(_trackers(cfg))
    return checks


def describe(checks: list[Check]) -> str:
    return "\n".join(["pre-flight checks:", *(c.line() for c in checks)])


def require(checks: list[Check]) -> None:
    """A config error listing the failed checks, if any."""
    failed = [c for c in checks if c.status == "fail"]
    if failed:
        raise ConfigError("pre-flight checks failed (nothing was planned or submitted):\n"
                          + "\n".join(f"  - {c.name}: {c.message}" for c in failed))


def _model(cfg: Config) -> Check:
    path = cfg.model.path
    if not looks_local(path):
        return _hub_model(path, cfg)
    root = Path(path).expanduser()
    if not (root / "config.json").is_file():
        return Check("model.path", "fail", f"{path!r} is not a model directory (no config.json there). Point it at a "
                                           f"Hugging Face style directory holding config.json and the weights.")
    weights = [p.name for p in root.iterdir() if p.suffix in _WEIGHTS]
    if not weights and cfg.model.engine_args.get("load_format") != "dummy":
        return Check("model.path", "fail", f"{path} has a config.json but no weight files ({', '.join(_WEIGHTS)}); "
                                           f"copy the weights there")
    return Check("model.path", "ok", f"{root.resolve()} ({len(weights)} weight file(s))")


def _hub_model(name: str, cfg: Config) -> Check:
    """A hub name: in the local cache, or (online) on the hub; offline and not cached fails."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return Check("model.path", "warn", f"{name!r} looks like a hub name; huggingface_hub is not installed here "
                                           f"to check it")
    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return Check("model.path", "ok", f"{name} (in the Hugging Face cache: {Path(cached).parent})")
    env = {**os.environ, **cfg.run.env}
    if env.get("HF_HUB_OFFLINE") == "1" or env.get("TRANSFORMERS_OFFLINE") == "1":
        return Check("model.path", "fail", f"{name!r} is not a local directory and not in the Hugging Face cache, and "
                                           f"the hub is off (HF_HUB_OFFLINE). Download it first (huggingface-cli "
                                           f"download {name}) or point model.path at a model directory.")
    return _ask_hub(name)


def _ask_hub(name: str) -> Check:
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError
    except ImportError:
        return Check("model.path", "warn", f"{name!r}: could not ask the hub (huggingface_hub too old)")
    try:
        HfApi().model_info(name, timeout=10)
    except RepositoryNotFoundError:
        return Check("model.path", "fail", f"{name!r} is neither a local directory nor a model on the Hugging Face "
                                           f"hub (a typo? a gated model needs HF_TOKEN). Fix model.path.")
    except Exception as exc:  # noqa: BLE001 - no network on a login node is common: say so, go on
        return Check("model.path", "warn", f"{name!r} is not cached here and the hub could not be asked ({exc}); the "
                                           f"workers will download it")
    return Check("model.path", "ok", f"{name} (on the Hugging Face hub, not cached here: the workers download it)")


def _tokenizer(cfg: Config) -> Check:
    path = tokenizer_path(cfg.model)
    if get_engine(cfg.model.engine).tokenizer is not None:
        return Check("model.tokenizer", "ok", f"engine {cfg.model.engine} brings its own")
    if not looks_local(path):
        return Check("model.tokenizer", "ok", f"{path} (from the hub)")
    root = Path(path).expanduser()
    found = [name for name in _TOKENIZER_FILES if (root / name).is_file()]
    if not found:
        key = "model.tokenizer" if cfg.model.tokenizer else "model.path"
        return Check("model.tokenizer", "fail", f"no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in {path}; copy "
                                                f"them there or set model.tokenizer (now {key})")
    return Check("model.tokenizer", "ok", f"{', '.join(found)} in {root}")


def _engine_args(cfg: Config) -> Check:
    spec = get_engine(cfg.model.engine)
    if not spec.takes_args:
        return Check("engine", "ok", f"{spec.name} takes no arguments")
    key = "model.engine_args"
    given = spec.args(cfg.model)
    try:
        spec.check_installed()
    except ShardinferError as exc:
        return Check(key, "warn", f"could not check: {exc}")
    valid = spec.argument_names() if spec.argument_names else None
    if valid is None:
        return Check(key, "ok", f"{len(given)} argument(s), not checked ({spec.name} takes any)")
    unknown = unknown_arguments(given, valid)
    if unknown:
        return Check(key, "fail", f"not arguments of {spec.version() or spec.name}: {'; '.join(unknown)}")
    return Check(key, "ok", f"{len(given)} argument(s) known to {spec.version() or spec.name}")


def _lora(cfg: Config) -> Check:
    """Each adapter is a local PEFT directory: the engine reads its adapter_config.json when it loads."""
    for name, path in cfg.model.lora.items():
        root = Path(path).expanduser()
        if not root.is_dir():
            return Check("model.lora", "fail", f"adapter {name!r}: {path!r} is not a directory here. Give the local "
                                               f"directory of a PEFT LoRA adapter (adapter_config.json and weights)")
        if not (root / "adapter_config.json").is_file():
            return Check("model.lora", "fail", f"adapter {name!r}: {path} has no adapter_config.json; give the "
                                               f"directory of a PEFT LoRA adapter")
    return Check("model.lora", "ok", f"{len(cfg.model.lora)} adapter directory(ies): {', '.join(cfg.model.lora)}")


def _task(cfg: Config) -> Check:
    problem = task_problem(cfg)
    if problem is not None:
        return Check("task", "fail", f"task {cfg.task}: {problem}")
    kind = model_kind(cfg.model.path)
    if kind is None:
        return Check("task", "warn", f"task {cfg.task}: {cfg.model.path} is not a local directory; what the model "
                                     f"can do is checked when it loads")
    return Check("task", "ok", f"{cfg.task} with {kind.architecture}")


def _trackers(cfg: Config) -> Check:
    try:
        check_trackers(cfg)
    except ShardinferError as exc:
        return Check("run.report_to", "fail", str(exc))
    return Check("run.report_to", "ok", ", ".join(cfg.run.report_to))


def _context(cfg: Config) -> Check:
    try:
        length = resolve_max_model_len(cfg.model)
    except ConfigError as exc:
        return Check("model.max_model_len", "fail", str(exc))
    native = native_context_length(cfg.model.path)
    if native and length > native and not os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN"):
        return Check("model.max_model_len", "fail", f"{length} is above the model's context length {native}; lower it "
                                                    f"(or scale RoPE in the model's config)")
    if cfg.sampling.max_tokens >= length:
        return Check("model.max_model_len", "fail", f"sampling.max_tokens {cfg.sampling.max_tokens} leaves no room in "
                                                    f"{length} tokens for the prompt")
    return Check("model.max_model_len", "ok", f"{length} tokens" + (f" (the model's: {native})" if native else ""))

