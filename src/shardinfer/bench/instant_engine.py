"""The ``instant`` engine: answers every prompt at once, so a run measures the pipeline's own cost.

Everything around it is real: the model's tokenizer (loaded the normal way, so the chat template,
tokenization and truncation are what a real run does), reading, the ledger, the parts. Each prompt
gets a one-token :class:`Completion` at once. ``jobs/scale_bench.py pipeline`` runs it to measure the
rows and prompt tokens per second one worker can prepare and commit. Importing this module
registers the engine (``SHARDINFER_PLUGINS=shardinfer.bench.instant_engine``). With
``SHARDINFER_INSTANT_PROFILE=PATH`` set, each worker profiles itself (cProfile) from its engine's load to
its exit and writes the stats to ``PATH.<pid>``.
"""

from __future__ import annotations

import atexit
import contextlib
import cProfile
import gc
import os
import time
from typing import Any

import numpy

from shardinfer.config import TASKS, Config
from shardinfer.engines.base import BatchQueue, Completion, Pooled
from shardinfer.engines.registry import EngineSpec, register_engine
from shardinfer.models.tasks import pooled_shape
from shardinfer.requests.prompts import Prompt

ANSWER_TOKEN = 0
ANSWER_TEXT = "."
PROFILE_ENV = "SHARDINFER_INSTANT_PROFILE"


class InstantEngine(BatchQueue):
    """A blocking engine (``generate``) that does no work: the worker's cost is all there is."""

    name = "instant"

    def __init__(self, cfg: Config, max_model_len: int):
        super().__init__(attempts=cfg.run.max_attempts)
        self.shape = pooled_shape(cfg)  # a pooling task's values (None: generate)
        self.cpu_at_load = 0.0
        self.gc_s = 0.0  # time in the garbage collector after the load
        self._gc_start = 0.0

    def load(self) -> None:
        """Nothing to load but transformers (the worker loads the tokenizer with it right after
        this: imported here, the tokenizer's own load is all that comes after); then note the CPU
        time so far (the report gives the worker's CPU time after the load, which the machine's
        other work does not inflate as wall time) and start the worker's profile when asked."""
        with contextlib.suppress(ImportError):
            from transformers import AutoTokenizer  # noqa: F401

        self.cpu_at_load = _cpu_s()
        gc.callbacks.append(self._time_gc)
        path = os.environ.get(PROFILE_ENV)
        if path:
            profile = cProfile.Profile(time.process_time)  # CPU time: robust to a busy machine
            atexit.register(lambda: profile.dump_stats(f"{path}.{os.getpid()}"))
            profile.enable()

    def generate(self, prompts: list[Prompt]) -> list[Completion] | list[Pooled]:
        if self.shape is not None:
            return [self.pooled() for _ in prompts]
        return [self.answer(p) for p in prompts]

    def answer(self, prompt: Prompt) -> Completion:
        """One prompt's answer: one token, whatever it asked for."""
        return Completion([ANSWER_TOKEN], ANSWER_TEXT, "length")

    def pooled(self) -> Pooled:
        """A pooling task's answer: an embedding of the run's size, even class probabilities, a score."""
        assert self.shape is not None
        if self.shape.task == "embed":  # a float32 array, as the engines give embeddings
            return Pooled(numpy.zeros(self.shape.dim or 1, dtype=numpy.float32))
        if self.shape.task == "classify":
            return Pooled([1.0 / max(len(self.shape.labels), 1)] * max(len(self.shape.labels), 1))
        return Pooled([0.0])

    def versions(self) -> dict[str, str]:
        return {"instant": "answers at once"}

    def report(self) -> dict[str, Any]:
        return {"cpu_s_after_load": round(_cpu_s() - self.cpu_at_load, 3), "gc_s": round(self.gc_s, 3)}

    def _time_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.gc_s += time.perf_counter() - self._gc_start


def _cpu_s() -> float:
    """CPU seconds of this process, all its threads (the tokenizer's included)."""
    times = os.times()
    return times.user + times.system


SPEC = register_engine(EngineSpec(
    name="instant", description="benchmark: answers every prompt at once with one token (the model's tokenizer)",
    create=InstantEngine, modules=(), extra="", takes_args=False, replica_gpus=lambda model, node_gpus: 1,
    tasks=TASKS))
