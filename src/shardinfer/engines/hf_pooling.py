"""transformers for ``task: embed | classify | score | reward``: one forward pass per padded batch.

- **embed**: ``AutoModel``'s last hidden states pooled the model's way: the sentence-transformers
  ``Pooling`` module when the directory has one (last token, mean or CLS), else the last token (what
  vLLM does with a causal LM converted to embed), L2-normalised unless the config or the model's
  modules say otherwise; ``pooling.dimensions`` keeps the first N values (renormalised);
- **classify / score / reward**: ``AutoModelForSequenceClassification``'s logits: softmax over
  several classes, sigmoid of one logit (score), the raw logit (reward); ``pooling.activation``
  overrides.

Batches are length-sorted, left-padded and filled under a token budget, as for generation; a batch
that runs out of memory is split and the budget halved.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from shardinfer.config import Config
from shardinfer.engines.base import BatchQueue, Pooled
from shardinfer.errors import ConfigError, missing_dependency
from shardinfer.requests.prompts import Prompt

log = logging.getLogger(__name__)


def embedding_pooling(path: str) -> tuple[str, bool | None]:
    """(pooling mode, normalise) from the model's sentence-transformers modules: ``lasttoken``,
    ``mean`` or ``cls``; (``lasttoken``, None) when the model has none."""
    root = Path(path)
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return "lasttoken", None
    modules = json.loads(modules_file.read_text())
    mode, normalize = "lasttoken", False
    for module in modules:
        kind = str(module.get("type", ""))
        if kind.endswith("Pooling"):
            settings = json.loads((root / module.get("path", "") / "config.json").read_text())
            mode = next((m.removeprefix("pooling_mode_").removesuffix("_token")
                         for m, on in settings.items() if m.startswith("pooling_mode_") and on), "lasttoken")
        elif kind.endswith("Normalize"):
            normalize = True
    return mode, normalize


class HfPoolingEngine(BatchQueue):
    name = "hf"

    def __init__(self, cfg: Config, max_model_len: int, *, batch_tokens: int, attempts: int = 3,
                 backoff_s: float = 2.0):
        super().__init__(attempts, backoff_s)
        self.cfg = cfg
        self.task = cfg.task
        self.max_model_len = max_model_len
        self.batch_tokens = batch_tokens
        self.model: Any = None
        self.pad_id = 0
        self.mode, self.normalize = embedding_pooling(cfg.model.path)
        if cfg.pooling.normalize is not None:
            self.normalize = cfg.pooling.normalize
        activation = cfg.pooling.activation
        self.activation = activation if activation is not None else self.task != "reward"

    def load(self) -> None:
        try:
            import torch
            import transformers
        except ImportError as exc:
            raise missing_dependency("torch and transformers", "hf", "CPU-only machine: pip install "
                                     "'shardinfer[cpu]'") from exc
        m = self.cfg.model
        auto = transformers.AutoModel if self.task == "embed" else transformers.AutoModelForSequenceClassification
        dtype = m.dtype if m.dtype == "auto" else getattr(torch, m.dtype)
        args = dict(m.engine_args)
        if "device_map" not in args and torch.cuda.is_available():
            args["device_map"] = "auto"
        log.info("loading %s %s (dtype %s, %s)", auto.__name__, m.path, m.dtype, args)
        try:
            self.model = auto.from_pretrained(m.path, dtype=dtype, **args).eval()
        except TypeError as exc:
            raise ConfigError(f"model.engine_args: {exc}. Remove or rename that argument.") from exc
        except OSError as exc:
            raise ConfigError(f"model.path: transformers cannot load {m.path!r}: {exc}") from exc
        tokenizer = transformers.AutoTokenizer.from_pretrained(m.tokenizer or m.path)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad or 0)

    def generate(self, prompts: list[Prompt]) -> list[Pooled]:
        """Every prompt's values, batch by batch (longest first)."""
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i].token_ids or ()))
        results: list[Pooled | None] = [None] * len(prompts)
        todo = self._batches(order, prompts)
        while todo:
            batch = todo.pop(0)
            try:
                done = self._forward([prompts[i] for i in batch])
            except Exception as exc:
                if not is_out_of_memory(exc) or len(batch) == 1:
                    raise
                self.batch_tokens = max(len(prompts[batch[0]].token_ids or ()) * len(batch) // 2, 1)
                log.warning("out of memory on a batch of %d rows: budget lowered to %d tokens", len(batch),
                            self.batch_tokens)
                todo = self._batches(batch, prompts) + todo
                continue
            for i, values in zip(batch, done):
                results[i] = values
        return results  # type: ignore[return-value]

    def _batches(self, order: list[int], prompts: list[Prompt]) -> list[list[int]]:
        batches: list[list[int]] = []
        current: list[int] = []
        for i in order:
            width = len(prompts[current[0]].token_ids or ()) if current else len(prompts[i].token_ids or ())
            if current and width * (len(current) + 1) > self.batch_tokens:
                batches.append(current)
                current = []
            current.append(i)
        return batches + ([current] if current else [])

    def _forward(self, batch: list[Prompt]) -> list[Pooled]:
        import torch

        width = max(len(p.token_ids or ()) for p in batch)
        ids = torch.tensor([[self.pad_id] * (width - len(p.token_ids or ())) + list(p.token_ids or ()) for p in batch])
        mask = (torch.arange(width)[None, :] >= torch.tensor([[width - len(p.token_ids or ())] for p in batch]))
        inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask.long()}
        if any(p.token_type_ids is not None for p in batch):
            inputs["token_type_ids"] = torch.tensor([[0] * (width - len(p.token_type_ids or ()))
                                                     + list(p.token_type_ids or ()) for p in batch])
        device = self.model.device
        with torch.inference_mode():
            out = self.model(**{k: v.to(device) for k, v in inputs.items()})
        values = self._embed(out.last_hidden_state, inputs["attention_mask"].to(device)) if self.task == "embed" \
            else self._scores(out.logits)
        return [Pooled(values=row) for row in values.float().cpu().numpy()]

    def _embed(self, hidden: Any, mask: Any) -> Any:
        import torch

        if self.mode == "mean":
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        elif self.mode == "cls":
            first = mask.float().argmax(dim=1)  # left padding: the first real token
            pooled = hidden[torch.arange(hidden.shape[0]), first]
        else:
            pooled = hidden[:, -1]  # left padding: the last position is every row's last token
        if self.cfg.pooling.dimensions:
            pooled = pooled[:, : self.cfg.pooling.dimensions]
        if self.normalize is not False:
            pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
        return pooled

    def _scores(self, logits: Any) -> Any:
        if not self.activation:
            return logits
        return logits.sigmoid() if logits.shape[-1] == 1 else logits.float().softmax(dim=-1)

    def versions(self) -> dict[str, str]:
        import torch
        import transformers

        return {"transformers": transformers.__version__, "torch": torch.__version__}


def is_out_of_memory(exc: Exception) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()
