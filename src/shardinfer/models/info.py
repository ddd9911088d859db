"""What we need to know about a model without loading its weights: context length and tokenizer."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shardinfer.config import ModelConfig
from shardinfer.engines.registry import get_engine
from shardinfer.errors import ConfigError, missing_dependency

log = logging.getLogger(__name__)

_LENGTH_KEYS = ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions", "max_seq_len")


def model_config_json(path: str) -> dict[str, Any]:
    """The model's config.json, or {} when the model is not a local directory."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return {}
    with config_file.open() as fh:
        return json.load(fh)


def resolve_max_model_len(cfg: ModelConfig) -> int:
    """model.max_model_len, else the context length in the model's config.json."""
    if cfg.max_model_len:
        return cfg.max_model_len
    native = native_context_length(cfg.path)
    if native is not None:
        return native
    raise ConfigError(
        f"model.max_model_len: not set, and no context length found in {cfg.path}/config.json. "
        f"Set model.max_model_len, e.g. model.max_model_len=8192."
    )


def native_context_length(path: str) -> int | None:
    """The context length the model's config.json gives (the text model's, for multimodal ones)."""
    config = model_config_json(path)
    for section in (config, config.get("text_config") or {}):
        for key in _LENGTH_KEYS:
            if isinstance(section.get(key), int):
                return int(section[key])
    return None


def tokenizer_path(cfg: ModelConfig) -> str:
    return cfg.tokenizer or cfg.path


def check_model_path(cfg: ModelConfig) -> None:
    """A local path that does not exist is a config error, not a hub lookup."""
    path = Path(cfg.path).expanduser()
    if looks_local(cfg.path) and not (path / "config.json").is_file():
        raise ConfigError(
            f"model.path: {cfg.path!r} is not a model directory (no config.json there). "
            f"Point it at a Hugging Face style directory holding config.json and the weights."
        )


def load_tokenizer(cfg: ModelConfig, *, required: bool = True) -> Any:
    """The model's tokenizer (transformers, or the engine's own); None when not installed and not
    required."""
    own = _engine_tokenizer(cfg)
    if own is not None:
        return own(cfg)
    path = tokenizer_path(cfg)
    if looks_local(path) and not Path(path).expanduser().is_dir():
        if required:
            raise ConfigError(f"model.tokenizer: {path!r} is not a directory. Point model.path (or "
                              f"model.tokenizer) at a directory holding the tokenizer files.")
        log.warning("no tokenizer at %s; token counts are estimated from characters", path)
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        if required:
            raise missing_dependency("transformers", "hf") from exc
        return None
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=_trust_remote_code(cfg))
    except (OSError, ValueError) as exc:
        if required:
            raise ConfigError(f"model.tokenizer: cannot load a tokenizer from {path!r}: {exc}") from exc
        log.warning("no tokenizer at %s (%s); token counts are estimated from characters", path, exc)
        return None


def token_counter(cfg: ModelConfig) -> Callable[[list[str]], list[int]] | None:
    """Tokens per text with the model's tokenizer, for planning: the fast tokenizer's own file read
    with the tokenizers library when there is one (no transformers, no torch in memory), else the
    tokenizer loaded as the workers load it; None when there is none."""
    path = Path(tokenizer_path(cfg)).expanduser() / "tokenizer.json"
    if _engine_tokenizer(cfg) is None and path.is_file():
        try:
            from tokenizers import Tokenizer
        except ImportError:
            pass
        else:
            fast = Tokenizer.from_file(str(path))
            return lambda texts: [len(e.ids) for e in fast.encode_batch(texts, add_special_tokens=False)]
    tokenizer = load_tokenizer(cfg, required=False)
    if tokenizer is None:
        return None
    return lambda texts: [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _engine_tokenizer(cfg: ModelConfig) -> Any:
    return get_engine(cfg.engine).tokenizer


def _trust_remote_code(cfg: ModelConfig) -> bool:
    """The engine's own ``trust_remote_code`` argument decides for its tokenizer too."""
    return bool(get_engine(cfg.engine).args(cfg).get("trust_remote_code"))


def looks_local(path: str) -> bool:
    """A path (not a hub name such as org/model): absolute, relative with ./ or ~, or existing."""
    return path.startswith((".", "/", "~")) or Path(path).exists()
