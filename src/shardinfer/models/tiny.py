"""Build a tiny, real causal language model and tokenizer, locally.

The result is a Hugging Face style model directory that vLLM and
transformers load like any hub checkpoint, small enough (about 0.8M
parameters, 3.3 MB) to run on a CPU in tests, demos and benchmarks:

- a byte-level BPE tokenizer trained in-process on a JSONL corpus, with the
  ChatML special tokens ``<|endoftext|>`` (padding), ``<|im_start|>`` and
  ``<|im_end|>`` (end of sequence) and a ChatML chat template;
- a randomly initialised ``Qwen3ForCausalLM`` (or ``LlamaForCausalLM``)
  with hidden size 128, 2 layers, 4 query / 2 key-value heads of size 32,
  tied embeddings, stored as float32 safetensors.

Other kinds (``kind=``) put a pooling head on the same trunk and tokenizer:
a three-label classifier, an embedding model, a cross-encoder and a reward
model (see ``tiny_heads``).

Nothing is downloaded.  The build is deterministic: the same corpus file,
architecture, seed and vocabulary size give byte-identical weight and
tokenizer files.  A stamp file records those parameters so that a second
call with the same parameters returns the existing directory at once.

torch, transformers and tokenizers are imported only when a model is built;
they come with ``pip install 'shardinfer[cpu]'``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shardinfer.models.tiny_heads import (
    CAUSAL,
    check_kind,
    config_extras,
    initialise_head,
    model_class_name,
    required_files,
    write_extra_files,
)

logger = logging.getLogger(__name__)

STAMP_NAME = "shardinfer-tiny-model.json"
# Bump when the build changes in a way that alters the produced files.
BUILD_FORMAT = 1

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)

HIDDEN_SIZE = 128
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 32
INTERMEDIATE_SIZE = 256
MAX_POSITIONS = 8192
INIT_STD = 0.3

ARCHITECTURES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
}

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set content = message['content'] -%}"
    "{%- else -%}"
    "{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
REQUIRED_FILES = required_files(CAUSAL) + _TOKENIZER_FILES + (STAMP_NAME,)

_INSTALL_HINT = (
    "building the tiny model needs torch, transformers and tokenizers: "
    "pip install 'shardinfer[cpu]'"
)


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------


def build_tiny_model(
    out_dir: str | Path,
    *,
    corpus_path: str | Path,
    architecture: str = "qwen3",
    seed: int = 0,
    vocab_size: int = 4096,
    kind: str = CAUSAL,
) -> Path:
    """Build the tiny model and tokenizer into ``out_dir`` and return its path.

    ``kind`` picks the model on top of the shared trunk and tokenizer:
    ``causal`` (a language model), ``classifier`` (three labels),
    ``embed``, ``cross-encoder`` or ``reward`` (see ``tiny_heads``).

    If ``out_dir`` already holds a complete model built from the same
    parameters and corpus bytes, it is returned untouched.  Otherwise the
    model is built in a temporary sibling directory which is then renamed
    into place, so an interrupted build never leaves a partial model behind.
    An existing ``out_dir`` is replaced only if it is empty or holds a
    previous tiny model (it has a stamp file); anything else raises
    ``FileExistsError``.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose from {sorted(ARCHITECTURES)}")
    if vocab_size < 512:
        raise ValueError(f"vocab_size must be at least 512, got {vocab_size}")
    check_kind(kind)
    out = Path(out_dir).resolve()
    corpus = Path(corpus_path).resolve()
    stamp = _stamp(corpus, architecture=architecture, seed=seed, vocab_size=vocab_size, kind=kind)
    if is_complete(out, stamp):
        logger.info("tiny model already present in %s", out)
        return out
    _check_replaceable(out)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.building-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        started = time.perf_counter()
        _build_into(tmp, corpus, stamp)
        _move_into_place(tmp, out, stamp)
        logger.info("built tiny %s %s model in %s (%.1fs)", architecture, kind, out, time.perf_counter() - started)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_tiny_lora(model_dir: str | Path, out_dir: str | Path, *, rank: int = 8, seed: int = 1,
                    scale: float = 0.5) -> Path:
    """A LoRA adapter (PEFT layout) for a tiny model: random rank-``rank`` updates of every layer's
    q_proj and v_proj, large enough (``scale``) to change what the model generates."""
    import torch
    from safetensors.torch import save_file

    model = Path(model_dir).resolve()
    config = json.loads((model / "config.json").read_text())
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for name, width in (("q_proj", heads * head_dim), ("v_proj", kv_heads * head_dim)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator) * scale
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(width, rank, generator=generator) * scale
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    _write_json(out / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model), "r": rank,
        "lora_alpha": 2 * rank, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "bias": "none",
        "fan_in_fan_out": False, "modules_to_save": None})
    return out


def is_complete(model_dir: str | Path, stamp: dict[str, Any]) -> bool:
    """True if ``model_dir`` holds every file and a stamp equal to ``stamp``."""
    path = Path(model_dir)
    names = required_files(stamp.get("kind", CAUSAL)) + _TOKENIZER_FILES + (STAMP_NAME,)
    if not all((path / name).is_file() for name in names):
        return False
    try:
        return json.loads((path / STAMP_NAME).read_text(encoding="utf-8")) == stamp
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------
# Stamp and directory handling
# --------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(corpus: Path, *, architecture: str, seed: int, vocab_size: int, kind: str = CAUSAL) -> dict[str, Any]:
    stamp: dict[str, Any] = {
        "format": BUILD_FORMAT,
        "architecture": architecture,
        "seed": seed,
        "vocab_size": vocab_size,
        "corpus_sha256": _sha256_file(corpus),
    }
    if kind != CAUSAL:  # the causal stamp stays what it was before there were kinds
        stamp["kind"] = kind
    return stamp


def _check_replaceable(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if any(out.iterdir()) and not (out / STAMP_NAME).is_file():
        raise FileExistsError(f"{out} is not empty and does not hold a tiny model; refusing to replace it")


def _move_into_place(tmp: Path, out: Path, stamp: dict[str, Any]) -> None:
    """Rename ``tmp`` to ``out``, replacing a stale model if there is one."""
    old: Path | None = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        # Another process finished the same build first: keep its result.
        if is_complete(out, stamp):
            logger.info("another build of %s finished first; keeping it", out)
        else:
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------


def _require_backends() -> dict[str, Any]:
    try:
        import tokenizers
        import torch
        import transformers
    except ImportError as exc:
        raise ImportError(f"{_INSTALL_HINT} ({exc})") from exc
    return {"tokenizers": tokenizers, "torch": torch, "transformers": transformers}


def _build_into(directory: Path, corpus: Path, stamp: dict[str, Any]) -> None:
    backends = _require_backends()
    tokenizer = _train_tokenizer(backends["tokenizers"], _read_texts(corpus), stamp["vocab_size"])
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    _save_tokenizer(tokenizer, directory)
    _save_model(backends, directory, stamp, ids, vocab_size=tokenizer.get_vocab_size())
    _check_tokenizer_loads(backends["transformers"], directory)
    _write_json(directory / STAMP_NAME, stamp)


def _read_texts(corpus: Path) -> list[str]:
    """The ``text`` fields of a .jsonl or .jsonl.gz file, sorted."""
    with open(corpus, "rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
    opener = gzip.open if compressed else open
    texts = []
    with opener(corpus, "rt", encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                text = json.loads(line).get("text")
                if isinstance(text, str) and text:
                    texts.append(text)
    if not texts:
        raise ValueError(f"no texts found in {corpus}")
    return sorted(texts)


def _batches(texts: list[str], size: int = 64) -> Iterator[list[str]]:
    for start in range(0, len(texts), size):
        yield texts[start : start + size]


def _train_tokenizer(tokenizers: Any, texts: list[str], vocab_size: int) -> Any:
    """Train a byte-level BPE tokenizer with the ChatML special tokens."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_batches(texts), trainer=trainer, length=len(texts))
    logger.debug("trained BPE tokenizer with %d tokens", tokenizer.get_vocab_size())
    return tokenizer


def _tokenizer_config() -> dict[str, Any]:
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "model_max_length": MAX_POSITIONS,
        "pad_token": PAD_TOKEN,
        "padding_side": "left",
        "split_special_tokens": False,
        # Written explicitly so that both transformers 4.x and 5.x load it.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def _save_tokenizer(tokenizer: Any, directory: Path) -> None:
    tokenizer.save(str(directory / "tokenizer.json"))
    _write_json(directory / "tokenizer_config.json", _tokenizer_config())
    _write_json(
        directory / "special_tokens_map.json",
        {"eos_token": IM_END, "pad_token": PAD_TOKEN, "additional_special_tokens": [IM_START, IM_END]},
    )


def _check_tokenizer_loads(transformers: Any, directory: Path) -> None:
    """Load the saved files as a PreTrainedTokenizerFast and render a chat."""
    wrapped = transformers.PreTrainedTokenizerFast.from_pretrained(str(directory))
    prompt = wrapped.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    expected = f"{IM_START}user\nhi{IM_END}\n{IM_START}assistant\n"
    if prompt != expected or wrapped.eos_token != IM_END or wrapped.padding_side != "left":
        raise RuntimeError(f"tokenizer written to {directory} does not load as expected: {prompt!r}")


def _model_config(transformers: Any, architecture: str, ids: dict[str, int], vocab_size: int,
                  kind: str = CAUSAL) -> Any:
    config_name, causal_name = ARCHITECTURES[architecture]
    config_class = getattr(transformers, config_name)
    return config_class(
        vocab_size=vocab_size,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        initializer_range=INIT_STD,
        bos_token_id=ids[PAD_TOKEN],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[PAD_TOKEN],
        architectures=[model_class_name(causal_name, kind)],
        **config_extras(kind),
    )


def _initialise(torch: Any, model: Any, seed: int) -> None:
    """Draw every matrix from N(0, INIT_STD²) in a fixed, name-sorted order.

    Vectors (norm weights) keep their constructor values.  A large standard
    deviation makes a random model produce varied text instead of repeating
    a single token.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if param.dim() >= 2:
                param.normal_(mean=0.0, std=INIT_STD, generator=generator)


@contextmanager
def _quiet_progress_bars(transformers: Any) -> Iterator[None]:
    """Hide transformers' progress bars for one save, restoring the setting."""
    hf_logging = transformers.utils.logging
    enabled = hf_logging.is_progress_bar_enabled()
    if enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _save_model(
    backends: dict[str, Any],
    directory: Path,
    stamp: dict[str, Any],
    ids: dict[str, int],
    *,
    vocab_size: int,
) -> None:
    torch, transformers = backends["torch"], backends["transformers"]
    architecture, kind = stamp["architecture"], stamp.get("kind", CAUSAL)
    config = _model_config(transformers, architecture, ids, vocab_size, kind)
    model_class = getattr(transformers, config.architectures[0])
    # The constructor's own initialisation draws from the global RNG; keep
    # the caller's RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stamp["seed"])
        model = model_class(config).to(torch.float32)
    _initialise(torch, model, stamp["seed"])
    if kind != CAUSAL:
        initialise_head(torch, model, kind, stamp["seed"])
    model.eval()
    with _quiet_progress_bars(transformers):
        model.save_pretrained(str(directory))
    if kind == CAUSAL:
        generation = transformers.GenerationConfig(
            bos_token_id=ids[PAD_TOKEN],
            eos_token_id=ids[IM_END],
            pad_token_id=ids[PAD_TOKEN],
        )
        generation.save_pretrained(str(directory))
    else:
        write_extra_files(directory, kind, _write_json, hidden_size=HIDDEN_SIZE, max_length=MAX_POSITIONS)
    parameters = sum(p.numel() for p in model.parameters())
    logger.debug("saved %s with %d parameters to %s", model_class.__name__, parameters, directory)
