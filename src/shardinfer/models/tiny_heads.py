"""The pooling kinds of the tiny model: what differs from the causal model.

Every kind shares the tokenizer and the transformer trunk of the causal
model (the same weights, drawn in the same order); only the top changes:

- ``classifier``: ``*ForSequenceClassification`` with three named labels
  (negative, neutral, positive); vLLM's ``LLM.classify`` returns their softmax.
- ``embed``: the bare ``*Model`` (architecture ``Qwen3Model``), plus the
  sentence-transformers files (``modules.json``, ``1_Pooling/config.json``)
  that say "last-token pooling, then L2 normalisation", so that vLLM and a
  transformers-based engine both learn the pooling from the directory.
- ``cross-encoder``: ``*ForSequenceClassification`` with one label whose
  sigmoid is the relevance score of a (query, document) pair; its config
  names the activation the way sentence-transformers' CrossEncoder does.
- ``reward``: ``*ForSequenceClassification`` with one label, read raw (no
  activation) on a chat rendered with the chat template, like
  Skywork-Reward-V2-Qwen3.

The score head is drawn from its own seeded generator with a small standard
deviation, so that class probabilities and scores vary clearly between inputs
without saturating.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

CAUSAL = "causal"
KINDS = (CAUSAL, "classifier", "embed", "cross-encoder", "reward")
POOLING_KINDS = KINDS[1:]

CLASSIFIER_LABELS = ("negative", "neutral", "positive")
_ONE_LABEL = {"cross-encoder": "relevance", "reward": "reward"}
# The activation sentence-transformers' CrossEncoder records in config.json; vLLM reads it too.
SIGMOID = "torch.nn.modules.activation.Sigmoid"

# The trunk's last hidden state has a norm of about sqrt(hidden size); this keeps the head's
# logits within a few units of each other.
HEAD_STD = 0.08
_HEAD_SEED_OFFSET = {kind: 1000 + index for index, kind in enumerate(POOLING_KINDS)}

ST_POOLING_DIR = "1_Pooling"
ST_FILES = ("modules.json", f"{ST_POOLING_DIR}/config.json", "config_sentence_transformers.json",
            "sentence_bert_config.json")


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")


def model_class_name(causal_name: str, kind: str) -> str:
    """``Qwen3ForCausalLM`` -> ``Qwen3ForSequenceClassification`` / ``Qwen3Model``."""
    if kind == CAUSAL:
        return causal_name
    base = causal_name.removesuffix("ForCausalLM")
    return f"{base}Model" if kind == "embed" else f"{base}ForSequenceClassification"


def config_extras(kind: str) -> dict[str, Any]:
    """Keyword arguments for the config class beyond the causal model's."""
    if kind == "classifier":
        return {"id2label": dict(enumerate(CLASSIFIER_LABELS)),
                "label2id": {label: index for index, label in enumerate(CLASSIFIER_LABELS)}}
    if kind in _ONE_LABEL:
        label = _ONE_LABEL[kind]
        extras: dict[str, Any] = {"id2label": {0: label}, "label2id": {label: 0}}
        if kind == "cross-encoder":
            extras["sentence_transformers"] = {"activation_fn": SIGMOID}
        return extras
    return {}


def required_files(kind: str) -> tuple[str, ...]:
    """Files besides the tokenizer's and the stamp that a complete model of ``kind`` holds."""
    if kind == CAUSAL:
        return ("config.json", "generation_config.json", "model.safetensors")
    extra = ST_FILES if kind == "embed" else ()
    return ("config.json", "model.safetensors", *extra)


def initialise_head(torch: Any, model: Any, kind: str, seed: int) -> None:
    """Redraw the classification head (if any) from N(0, HEAD_STD²) with its own generator."""
    head = getattr(model, "score", None)
    if head is None:
        return
    generator = torch.Generator(device="cpu").manual_seed(seed + _HEAD_SEED_OFFSET[kind])
    with torch.no_grad():
        head.weight.normal_(mean=0.0, std=HEAD_STD, generator=generator)


def write_extra_files(directory: Path, kind: str, write_json: Callable[[Path, Any], None],
                      *, hidden_size: int, max_length: int) -> None:
    """The sentence-transformers description of the embedding model's pooling."""
    if kind != "embed":
        return
    write_json(directory / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": ST_POOLING_DIR, "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ])
    (directory / ST_POOLING_DIR).mkdir(exist_ok=True)
    write_json(directory / ST_POOLING_DIR / "config.json", {
        "word_embedding_dimension": hidden_size,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": True,
        "include_prompt": True,
    })
    write_json(directory / "config_sentence_transformers.json",
               {"prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"})
    write_json(directory / "sentence_bert_config.json", {"max_seq_length": max_length, "do_lower_case": False})
