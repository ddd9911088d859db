"""The run fingerprint: everything that decides a run's outputs, so a resume can refuse a changed one.

The settings that change results (:func:`shardinfer.config.results_settings`), the model identity
(path, a checksum of its config, its weight and tokenizer file names and sizes) and that of each LoRA
adapter, the chat template,
the engine and its installed version, and the input files with sizes and mtimes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from shardinfer.config import Config, results_settings
from shardinfer.engines.registry import get_engine

_MODEL_FILES = (".safetensors", ".bin", ".pt", ".json", ".model", ".jinja", ".txt")


def fingerprint(cfg: Config, files: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "config": results_settings(cfg),
        "model": model_identity(cfg.model.path),
        "tokenizer": model_identity(cfg.model.tokenizer) if cfg.model.tokenizer else None,
        # only with adapters, so runs begun without the key compare equal
        **({"adapters": {name: model_identity(path) for name, path in sorted(cfg.model.lora.items())}}
           if cfg.model.lora else {}),
        "engine": {"name": cfg.model.engine, "version": get_engine(cfg.model.engine).version()},
        "input": [{k: f.get(k) for k in ("path", "bytes", "mtime", "version", "rows")} for f in files],
    }


def model_identity(path: str) -> dict[str, Any]:
    """Path, checksum of config.json and of the chat template, and weight/tokenizer files with sizes."""
    root = Path(path).expanduser()
    if not root.is_dir():
        return {"path": path, "local": False}
    files = {p.name: p.stat().st_size for p in sorted(root.iterdir())
             if p.is_file() and p.suffix in _MODEL_FILES and not p.name.startswith(".")}
    return {"path": str(root.resolve()), "config_sha256": _sha(root / "config.json"),
            "chat_template_sha256": _chat_template_sha(root), "files": files}


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _chat_template_sha(root: Path) -> str | None:
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        return _sha(jinja)
    config = root / "tokenizer_config.json"
    if not config.is_file():
        return None
    template = json.loads(config.read_text()).get("chat_template")
    return hashlib.sha256(json.dumps(template).encode()).hexdigest() if template else None


def differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, with both values."""
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(set(saved) | set(current))
        return [d for k in keys for d in differences(saved.get(k), current.get(k), f"{prefix}{k}.")]
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        return [d for i, (a, b) in enumerate(zip(saved, current)) for d in differences(a, b, f"{prefix}{i}.")]
    return [] if saved == current else [f"{prefix.rstrip('.')}: {saved!r} -> {current!r}"]
