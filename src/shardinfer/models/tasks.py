"""What a model can do, read from its directory without loading it: generate text, embed, classify,
score pairs or score rewards, and the shape of what it returns (embedding size, class labels).

The pre-flight checks refuse a task the model cannot do, with the fix; the worker and the reduce
read :class:`PooledShape` for the result columns, the same for every part of a run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardinfer.config import Config
from shardinfer.models.info import model_config_json

_CLASSIFIER = "ForSequenceClassification"


@dataclass(frozen=True)
class PooledShape:
    """The result columns of a pooling task: embedding size and type, or the class labels."""

    task: str
    dim: int | None = None  # embed: values per embedding
    dtype: str = "float32"  # embed: float32 or float16
    labels: tuple[str, ...] = ()  # classify: label names by class index


@dataclass(frozen=True)
class ModelKind:
    """A model directory's architecture and heads, from config.json (and sentence-transformers files)."""

    architecture: str | None
    num_labels: int | None
    labels: tuple[str, ...]
    hidden_size: int | None
    embedding_size: int | None  # a sentence-transformers Dense module's output, else hidden_size
    matryoshka: bool = False  # trained so that the first N values are an embedding too

    @property
    def classifier(self) -> bool:
        return self.architecture is not None and self.architecture.endswith(_CLASSIFIER)

    @property
    def reward(self) -> bool:
        return self.architecture is not None and ("Reward" in self.architecture or self.architecture.endswith("RM"))

    @property
    def causal(self) -> bool:
        return self.architecture is not None and self.architecture.endswith(("ForCausalLM", "LMHeadModel",
                                                                             "ForConditionalGeneration"))


def model_kind(path: str) -> ModelKind | None:
    """The model's kind, or None when ``path`` is not a local model directory (nothing to read)."""
    config = model_config_json(path)
    if not config:
        return None
    architectures = config.get("architectures") or []
    text = config.get("text_config") or {}
    hidden = config.get("hidden_size") or text.get("hidden_size")
    labels = _labels(config)
    return ModelKind(architecture=architectures[0] if architectures else None,
                     num_labels=len(labels) if labels else None, labels=labels,
                     hidden_size=int(hidden) if hidden else None,
                     embedding_size=_dense_out(Path(path)) or (int(hidden) if hidden else None),
                     matryoshka=bool(config.get("is_matryoshka") or config.get("matryoshka_dimensions")))


def _labels(config: dict[str, Any]) -> tuple[str, ...]:
    """Class names by index: id2label, else LABEL_i for num_labels (transformers' defaults)."""
    id2label = config.get("id2label") or {}
    count = int(config.get("num_labels") or len(id2label) or 0)
    if not (config.get("architectures") or [""])[0].endswith(_CLASSIFIER) and not id2label:
        return ()
    count = max(count, len(id2label))
    return tuple(str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(count))


def _dense_out(root: Path) -> int | None:
    """The output size of a sentence-transformers Dense module, when the model has one."""
    modules = root / "modules.json"
    if not modules.is_file():
        return None
    try:
        entries = json.loads(modules.read_text())
    except ValueError:
        return None
    size = None
    for entry in entries:
        if str(entry.get("type", "")).endswith("Dense"):
            dense = root / entry.get("path", "") / "config.json"
            if dense.is_file():
                size = int(json.loads(dense.read_text()).get("out_features") or 0) or size
    return size


def task_problem(cfg: Config) -> str | None:
    """Why the model cannot do the config's task (with the fix), or None when it can or cannot be told."""
    kind = model_kind(cfg.model.path)
    if kind is None or kind.architecture is None:
        return None
    arch, task = kind.architecture, cfg.task
    if task == "generate" and (kind.classifier or kind.reward):
        return (f"{arch} has a scoring head, not a language-model head: it cannot generate text. Set task: "
                f"{'classify' if (kind.num_labels or 0) > 1 else 'score or reward'} to run it")
    if task == "embed" and (kind.classifier or kind.reward):
        return (f"{arch} ends in a classification head; task embed needs an embedding model or a causal LM "
                f"(pooled at the last token). Set task: classify, or point model.path at an embedding model")
    if task == "classify" and not kind.classifier:
        return (f"{arch} has no classification head; task classify needs a sequence classifier (architectures "
                f"ending in {_CLASSIFIER}, with id2label). Use such a model, or task: embed")
    if task in ("score", "reward") and not ((kind.classifier and kind.num_labels == 1) or kind.reward):
        what = "a cross-encoder" if task == "score" else "a reward model"
        return (f"{arch} ({kind.num_labels or 'no'} labels) is not {what}: task {task} needs a model with one "
                f"output (a {_CLASSIFIER} with num_labels 1). "
                + ("Use task: classify for a model with several labels" if kind.classifier else
                   "Use such a model, or task: embed and compare embeddings"))
    if task == "embed" and cfg.pooling.dimensions and not kind.matryoshka:
        return (f"pooling.dimensions: {arch} is not a Matryoshka model (its config.json has no is_matryoshka or "
                f"matryoshka_dimensions), so its first {cfg.pooling.dimensions} values are no embedding; remove "
                f"pooling.dimensions")
    if task == "embed" and cfg.pooling.dimensions and kind.embedding_size and cfg.pooling.dimensions > kind.embedding_size:
        return (f"pooling.dimensions {cfg.pooling.dimensions} is more than the model's {kind.embedding_size} "
                f"embedding dimensions; lower it or leave it out")
    return None


def pooled_shape(cfg: Config) -> PooledShape | None:
    """The result shape of a pooling run (None for generate)."""
    if cfg.task == "generate":
        return None
    kind = model_kind(cfg.model.path)
    if cfg.task == "embed":
        dim = cfg.pooling.dimensions or (kind.embedding_size if kind else None)
        return PooledShape("embed", dim=dim, dtype=cfg.pooling.embedding_dtype)
    if cfg.task == "classify":
        return PooledShape("classify", labels=kind.labels if kind else ())
    return PooledShape(cfg.task)
