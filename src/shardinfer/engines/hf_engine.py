"""Hugging Face transformers engine: ``generate`` on length-sorted, left-padded batches.

Batches are filled under a token budget (longest prompt + max_tokens, times rows) rather than a fixed
row count, so short documents go in wide batches and long ones in narrow ones. The budget defaults to
what the free GPU memory holds after loading (KV cache plus working memory per token); a batch that
still runs out of memory is split and the budget halved, so the run slows down instead of dying.
``device_map`` (default ``auto`` when GPUs are visible) spreads a model too big for one GPU over all
of them.
"""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path
from typing import Any

from shardinfer.bench.dummy import random_weights_copy
from shardinfer.config import Config, ModelConfig, SamplingConfig
from shardinfer.engines.base import BatchQueue, Completion
from shardinfer.engines.hf_pooling import HfPoolingEngine, is_out_of_memory
from shardinfer.engines.registry import BenchSupport, Capabilities, EngineSpec
from shardinfer.errors import ConfigError, missing_dependency
from shardinfer.requests.prompts import Prompt
from shardinfer.requests.row_options import RowOptions, base_options

log = logging.getLogger(__name__)

CPU_BATCH_TOKENS = 32768
_MEMORY_FRACTION = 0.8  # of the free GPU memory after loading, for the batches


class HfEngine(BatchQueue):
    name = "hf"

    def __init__(self, model: ModelConfig, sampling: SamplingConfig, max_model_len: int, *,
                 attempts: int = 3, backoff_s: float = 2.0):
        super().__init__(attempts, backoff_s)
        self.model_cfg = model
        self.sampling = sampling
        self.base = base_options(sampling)
        self.max_model_len = max_model_len
        self.model: Any = None
        self.tokenizer: Any = None
        self.batch_tokens = model.hf_batch_tokens or CPU_BATCH_TOKENS
        self.out_of_memory = 0  # batches split after running out of memory

    def load(self) -> None:
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:
            raise missing_dependency("torch and transformers", SPEC.extra, SPEC.install_hint) from exc
        args = dict(self.model_cfg.engine_args)
        if "device_map" not in args and torch.cuda.is_available():
            args["device_map"] = "auto"
        dtype = self.model_cfg.dtype if self.model_cfg.dtype == "auto" else getattr(torch, self.model_cfg.dtype)
        log.info("loading transformers model %s (dtype %s, %s)", self.model_cfg.path, self.model_cfg.dtype, args)
        try:
            self.model = AutoModelForCausalLM.from_pretrained(self.model_cfg.path, dtype=dtype, **args).eval()
        except TypeError as exc:
            raise ConfigError(f"model.engine_args: {exc}. Remove or rename that argument.") from exc
        except OSError as exc:  # no such directory or hub model, no weights
            raise ConfigError(f"model.path: transformers cannot load {self.model_cfg.path!r}: {exc}") from exc
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_cfg.tokenizer or self.model_cfg.path)
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        if self.model_cfg.hf_batch_tokens is None and torch.cuda.is_available():
            self.batch_tokens = _gpu_batch_tokens(self.model, torch)
        log.info("batch token budget %d", self.batch_tokens)

    def generate(self, prompts: list[Prompt]) -> list[Completion]:
        """Rows with the same options go through ``generate`` together."""
        groups: dict[RowOptions, list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(prompt.options or self.base, []).append(i)
        results: list[Completion | None] = [None] * len(prompts)
        for options, members in groups.items():
            done = self._generate_group([prompts[i].token_ids or [] for i in members], options)
            for i, completion in zip(members, done):
                results[i] = completion
        return results  # type: ignore[return-value]

    def _generate_group(self, prompts: list[list[int]], options: RowOptions) -> list[Completion]:
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        results: list[Completion | None] = [None] * len(prompts)
        todo = deque(self._batches(order, prompts, options))
        while todo:
            batch = todo.popleft()
            try:
                done = self._generate_batch([prompts[i] for i in batch], options)
            except Exception as exc:
                if not is_out_of_memory(exc) or len(batch) == 1:
                    raise
                todo.extendleft(reversed(self._back_off(batch, prompts, options)))
                continue
            for i, completion in zip(batch, done):
                results[i] = completion
        return results  # type: ignore[return-value]

    def _back_off(self, batch: list[int], prompts: list[list[int]], options: RowOptions) -> list[list[int]]:
        """Out of memory: halve the budget below this batch's size and split the batch under it."""
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        size = (len(prompts[batch[0]]) + options.max_tokens) * len(batch) * options.n
        self.batch_tokens = max(size // 2, 1)
        self.out_of_memory += 1
        log.warning("out of memory on a batch of %d rows (%d tokens): budget lowered to %d tokens, "
                    "splitting the batch", len(batch), size, self.batch_tokens)
        return self._batches(batch, prompts, options)

    def _batches(self, order: list[int], prompts: list[list[int]], options: RowOptions) -> list[list[int]]:
        """Consecutive rows (longest first) while (longest + max_tokens) * rows * n fits the budget."""
        batches: list[list[int]] = []
        current: list[int] = []
        for i in order:
            width = len(prompts[current[0]]) if current else len(prompts[i])
            rows = (len(current) + 1) * options.n
            if current and (width + options.max_tokens) * rows > self.batch_tokens:
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches

    def _generate_batch(self, batch: list[list[int]], options: RowOptions) -> list[Completion]:
        """One padded ``generate``; n > 1 samples come as n sequences per row (greedy: one, repeated)."""
        import torch

        width = max(len(p) for p in batch)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        device = self.model.device
        if options.seed is not None:
            torch.manual_seed(options.seed)
        sampled = options.temperature > 0
        per_row = options.n if sampled else 1
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                      num_return_sequences=per_row, **self._generate_kwargs(options))
        samples = [self._completion(row[width:].tolist(), options) for row in out]
        completions = []
        for r in range(len(batch)):
            mine = samples[r * per_row:(r + 1) * per_row] if sampled else [samples[r]] * options.n
            first = Completion(mine[0].token_ids, mine[0].text, mine[0].finish_reason)
            first.more = [Completion(m.token_ids, m.text, m.finish_reason) for m in mine[1:]]
            completions.append(first)
        return completions

    def _generate_kwargs(self, s: RowOptions) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": s.max_tokens, "pad_token_id": self.pad_id,
                                  "do_sample": s.temperature > 0}
        # ignore_eos: EOS may be chosen and generation goes on, as in vLLM (min_new_tokens would
        # forbid EOS instead and change the greedy tokens).
        kwargs["eos_token_id"] = None if s.ignore_eos else self.eos_ids
        if s.temperature > 0:
            kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or 0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if s.stop:
            kwargs.update(stop_strings=list(s.stop), tokenizer=self.tokenizer)
        return kwargs

    def _completion(self, tokens: list[int], options: RowOptions) -> Completion:
        """Cut at the first EOS (kept, as vLLM does) and at the first stop string (dropped)."""
        finish = "length"
        if not options.ignore_eos:
            for j, t in enumerate(tokens):
                if t in self.eos_ids:
                    tokens, finish = tokens[: j + 1], "stop"
                    break
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for stop in options.stop:
            if stop in text:
                text, finish = text[: text.index(stop)], "stop"
        return Completion(token_ids=tokens, text=text, finish_reason=finish)

    def versions(self) -> dict[str, str]:
        import torch
        import transformers

        return {"transformers": transformers.__version__, "torch": torch.__version__}



def _gpu_batch_tokens(model: Any, torch: Any) -> int:
    """Tokens whose KV cache and working memory fit in most of the free memory of the emptiest GPU."""
    free = min(torch.cuda.mem_get_info(d)[0] for d in range(torch.cuda.device_count()))
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    width = next(model.parameters()).element_size()
    kv = 2 * c.num_hidden_layers * kv_heads * head_dim * width
    working = (4 * c.hidden_size + 3 * getattr(c, "intermediate_size", 4 * c.hidden_size)) * width
    return max(int(free * _MEMORY_FRACTION / (kv + working)), 1024)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def _replica_gpus(model: ModelConfig, node_gpus: int) -> int:
    """One process spreads the model over every GPU of its node (device_map)."""
    return node_gpus


def _dummy_weights(model: dict[str, Any], out: Path) -> None:
    """transformers needs weights on disk: a random-weight copy, written once, loaded normally."""
    model["tokenizer"] = model.get("tokenizer") or model["path"]
    model["path"] = str(random_weights_copy(model["path"], out / "random-weights", model.get("dtype", "auto")))


def _create(cfg: Config, max_model_len: int) -> HfEngine | HfPoolingEngine:
    if cfg.task != "generate":
        return HfPoolingEngine(cfg, max_model_len, batch_tokens=cfg.model.hf_batch_tokens or CPU_BATCH_TOKENS,
                               attempts=cfg.run.max_attempts)
    return HfEngine(cfg.model, cfg.sampling, max_model_len, attempts=cfg.run.max_attempts)


SPEC = EngineSpec(
    name="hf", description="transformers generate on length-sorted batches; device_map over all GPUs",
    create=_create, modules=("torch", "transformers"), extra="hf",
    install_hint="CPU-only machine: pip install 'shardinfer[cpu]'",
    replica_gpus=_replica_gpus, capabilities=Capabilities(samples=True), bench=BenchSupport(baseline="hf-static", dummy_weights=_dummy_weights),
    tasks=("generate", "embed", "classify", "score", "reward"),
)
