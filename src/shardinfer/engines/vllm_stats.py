"""What a vLLM engine was set to and what its scheduler did, from vLLM's own stats.

``settings(llm)`` reads the configuration vLLM resolved (its defaults depend on the GPU: the same
arguments give different batch sizes on different machines). :class:`SchedulerStats` takes the
counters at the start of a measurement, samples the gauges (running and waiting requests, KV-cache
use) while it runs, and at the end gives preemptions, prefix-cache hits, mean and peak running and
waiting requests, and the time requests spent in prefill, in decode and queued. The engine must be
built with ``disable_log_stats=False``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

_COUNTERS = {
    "preemptions": "vllm:num_preemptions",
    "prefix_cache_queries": "vllm:prefix_cache_queries",
    "prefix_cache_hits": "vllm:prefix_cache_hits",
    "prompt_tokens": "vllm:prompt_tokens",
    "prompt_tokens_cached": "vllm:prompt_tokens_cached",
    "generation_tokens": "vllm:generation_tokens",
}
_TIMES = {  # histograms: the sum of the observed seconds over requests
    "prefill_s": "vllm:request_prefill_time_seconds",
    "decode_s": "vllm:request_decode_time_seconds",
    "queue_s": "vllm:request_queue_time_seconds",
}
_GAUGES = {
    "running": "vllm:num_requests_running",
    "waiting": "vllm:num_requests_waiting",
    "kv_cache_usage": "vllm:kv_cache_usage_perc",
}


def settings(llm: Any) -> dict[str, Any]:
    """The scheduler and cache settings in effect (what vLLM chose where it was not told)."""
    config = llm.llm_engine.vllm_config
    sched, cache, model = config.scheduler_config, config.cache_config, config.model_config
    blocks = cache.num_gpu_blocks or 0
    return {
        "max_num_seqs": sched.max_num_seqs,
        "max_num_batched_tokens": sched.max_num_batched_tokens,
        "chunked_prefill": getattr(sched, "enable_chunked_prefill", None),
        "prefix_caching": cache.enable_prefix_caching,
        "kv_cache_tokens": blocks * cache.block_size,
        "kv_cache_dtype": str(cache.cache_dtype),
        "block_size": cache.block_size,
        "gpu_memory_utilization": cache.gpu_memory_utilization,
        "max_model_len": model.max_model_len,
        "dtype": str(model.dtype),
        "quantization": model.quantization,
        "enforce_eager": model.enforce_eager,
    }


def _snapshot(llm: Any) -> dict[str, float]:
    values: dict[str, float] = {}
    for metric in llm.get_metrics():
        value = getattr(metric, "value", None)
        if value is None and hasattr(metric, "sum"):
            value = metric.sum
        if isinstance(value, (int, float)):
            values[metric.name] = values.get(metric.name, 0.0) + float(value)
    return values


class SchedulerStats:
    """Counters between ``start()`` and ``summary()``, gauges sampled by ``sample()`` in between
    (or by a background thread with ``every_s``, for a blocking ``LLM.generate``)."""

    def __init__(self, llm: Any, every_s: float | None = None):
        self.llm = llm
        self.begin: dict[str, float] = {}
        self.samples: list[dict[str, float]] = []
        self.last_sample = 0.0
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> SchedulerStats:
        self.begin, self.samples = _snapshot(self.llm), []
        if self.every_s:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="vllm-stats", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def sample(self, min_gap_s: float = 0.0) -> None:
        now = time.monotonic()
        if now - self.last_sample < min_gap_s:
            return
        self.last_sample = now
        values = _snapshot(self.llm)
        self.samples.append({key: values.get(name, 0.0) for key, name in _GAUGES.items()})

    def summary(self) -> dict[str, Any]:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        end = _snapshot(self.llm)
        delta = {key: end.get(name, 0.0) - self.begin.get(name, 0.0) for key, name in {**_COUNTERS, **_TIMES}.items()}
        out: dict[str, Any] = {k: (round(v, 3) if k in _TIMES else int(v)) for k, v in delta.items()}
        queries = delta["prefix_cache_queries"]
        out["prefix_cache_hit_rate"] = round(delta["prefix_cache_hits"] / queries, 4) if queries else None
        for key in _GAUGES:
            values = [s[key] for s in self.samples]
            out[f"{key}_mean"] = round(sum(values) / len(values), 2) if values else None
            out[f"{key}_max"] = max(values) if values else None
        out["samples"] = len(self.samples)
        return out
