"""vLLM engine: one in-process ``vllm.LLM`` per worker, fed continuously.

``submit`` adds requests straight to the engine (longest prompt first) and ``poll`` runs engine
steps, so the next unit's requests are already queued while the current one finishes: the batch
never drains between units. ``wants_more`` asks for work until the engine holds one and a half
times what it can run at once (by sequences and by KV-cache tokens): enough waiting requests to
refill the batch while the worker prepares the next unit, little enough to leave the rest of the
units to other workers. If a step fails (engine error, out of memory), the requests
in flight are aborted and redone through ``generate`` with retries and row isolation.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardinfer.config import Config, ModelConfig, SamplingConfig
from shardinfer.engines.base import Completion, Finished
from shardinfer.engines.registry import BenchSupport, Capabilities, EngineSpec
from shardinfer.engines.retry import generate_with_retries
from shardinfer.engines.vllm_stats import SchedulerStats, settings
from shardinfer.errors import ConfigError, missing_dependency

log = logging.getLogger(__name__)


@dataclass
class _Request:
    batch: Any
    index: int
    prompt: list[int]


class VllmEngine:
    name = "vllm"

    def __init__(self, model: ModelConfig, sampling: SamplingConfig, max_model_len: int, *,
                 attempts: int = 3, backoff_s: float = 2.0):
        self.model = model
        self.sampling = sampling
        self.max_model_len = max_model_len
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.llm: Any = None
        self.params: Any = None
        self.stream_params: Any = None
        self._in_flight: dict[str, _Request] = {}
        self._in_flight_tokens = 0
        self._ready: list[Finished] = []  # rejected at submit or redone after a failed step
        self._next_id = 0
        self.max_requests = 256  # requests that keep the engine busy (set at load)
        self.stats: SchedulerStats | None = None
        self.max_tokens_queued: int | None = None

    def load(self) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise missing_dependency("vllm", SPEC.extra, SPEC.install_hint) from exc
        kwargs = {"disable_log_stats": False,  # the scheduler's stats go into the worker's metrics
                  **engine_kwargs(self.model, self.sampling, self.max_model_len, vllm.EngineArgs)}
        log.info("loading vLLM %s: %s", vllm.__version__, kwargs)
        self.llm = vllm.LLM(**kwargs)
        self.params = vllm.SamplingParams(**sampling_kwargs(self.sampling))
        from vllm.sampling_params import RequestOutputKind

        self.stream_params = vllm.SamplingParams(**sampling_kwargs(self.sampling),
                                                 output_kind=RequestOutputKind.FINAL_ONLY)
        self.max_requests, self.max_tokens_queued = _queue_limits(self.llm)
        self.stats = SchedulerStats(self.llm).start()
        log.info("keeping up to %d requests / %s tokens queued in the engine", self.max_requests,
                 self.max_tokens_queued or "unbounded")

    def generate(self, prompts: list[list[int]]) -> list[Completion]:
        """One blocking ``LLM.generate`` over all prompts (retries and benchmarks)."""
        from vllm.inputs import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
        outputs = self.llm.generate(requests, self.params, use_tqdm=False)
        return [_completion(o) for o in outputs]

    def submit(self, batch: Any, prompts: list[list[int]]) -> None:
        engine = self.llm.llm_engine
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        inputs = self._engine_inputs([prompts[i] for i in order])
        for index, item in zip(order, inputs):
            request_id = f"shardinfer-{self._next_id}"
            self._next_id += 1
            try:
                if isinstance(item, Exception):
                    raise item
                engine.add_request(request_id, item, self.stream_params)
            except Exception as exc:  # noqa: BLE001 - a request the engine refuses fails its row only
                log.warning("the engine refused row %d of batch %s: %r", index, batch, exc)
                self._ready.append((batch, index, exc))
                continue
            self._in_flight[request_id] = _Request(batch, index, prompts[index])
            self._in_flight_tokens += len(prompts[index]) + self.sampling.max_tokens

    def _engine_inputs(self, prompts: list[list[int]]) -> list[Any]:
        """Token prompts rendered the way ``LLM.generate`` renders them (when this vLLM has the
        renderer step), each one on its own if the batch fails, so a bad prompt fails alone."""
        from vllm.inputs import TokensPrompt

        raw = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
        render = getattr(self.llm, "_preprocess_cmpl", None)
        if render is None:
            return raw
        try:
            return list(render(raw))
        except Exception:  # noqa: BLE001 - isolate the prompts that cannot be rendered
            return [_render_one(render, r) for r in raw]

    def wants_more(self) -> bool:
        if len(self._in_flight) >= self.max_requests:
            return False
        return self.max_tokens_queued is None or self._in_flight_tokens < self.max_tokens_queued

    def cancel(self, batch: Any) -> None:
        """Abort a batch's requests (a draining worker gives its unit back)."""
        ids = [rid for rid, r in self._in_flight.items() if r.batch == batch]
        if ids:
            self.llm.llm_engine.abort_request(ids)
        for rid in ids:
            self._pop(rid)
        self._ready = [f for f in self._ready if f[0] != batch]

    def poll(self) -> list[Finished]:
        """One engine step: the rows it finished (or, after a failed step, every row in flight)."""
        if self.stats is not None:
            self.stats.sample(min_gap_s=1.0)
        if self._ready:
            ready, self._ready = self._ready, []
            return ready
        if not self._in_flight:
            return []
        try:
            outputs = self.llm.llm_engine.step()
        except Exception as exc:  # noqa: BLE001 - redo what was in flight with retries
            return self._redo_in_flight(exc)
        done: list[Finished] = []
        for output in outputs:
            if output.finished and output.request_id in self._in_flight:
                request = self._pop(output.request_id)
                done.append((request.batch, request.index, _completion(output)))
        return done

    def _pop(self, request_id: str) -> _Request:
        request = self._in_flight.pop(request_id)
        self._in_flight_tokens -= len(request.prompt) + self.sampling.max_tokens
        return request

    def _redo_in_flight(self, exc: Exception) -> list[Finished]:
        log.error("engine step failed with %d requests in flight: %r; redoing them with retries",
                  len(self._in_flight), exc)
        requests = list(self._in_flight.values())
        try:
            self.llm.llm_engine.abort_request(list(self._in_flight))
        except Exception as abort_exc:  # noqa: BLE001 - the engine may be dead; retries will tell
            log.warning("could not abort the requests in flight: %r", abort_exc)
        self._in_flight.clear()
        self._in_flight_tokens = 0
        results = generate_with_retries(self, [r.prompt for r in requests], attempts=self.attempts,
                                        backoff_s=self.backoff_s)
        return [(r.batch, r.index, result) for r, result in zip(requests, results)]

    def report(self) -> dict[str, Any]:
        if self.stats is None or self.llm is None:
            return {}
        return {"settings": settings(self.llm), "scheduler": self.stats.summary()}

    def versions(self) -> dict[str, str]:
        import torch
        import vllm

        return {"vllm": vllm.__version__, "torch": torch.__version__}


def engine_kwargs(model: ModelConfig, sampling: SamplingConfig, max_model_len: int,
                  engine_args_cls: type) -> dict[str, Any]:
    """The ``vllm.LLM`` arguments of a config (checked against ``vllm.EngineArgs``)."""
    check_engine_args(model.vllm_args, engine_args_cls)
    return {
        "model": model.path,
        "tokenizer": model.tokenizer or model.path,
        "dtype": model.dtype,
        "max_model_len": max_model_len,
        **({"seed": sampling.seed} if sampling.seed is not None else {}),
        **model.vllm_args,
    }


def sampling_kwargs(s: SamplingConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p,
        "ignore_eos": s.ignore_eos,
    }
    if s.top_k is not None:
        kwargs["top_k"] = s.top_k
    if s.seed is not None:
        kwargs["seed"] = s.seed
    if s.stop:
        kwargs["stop"] = list(s.stop)
    return kwargs


def check_engine_args(engine_args: dict[str, Any], engine_args_cls: type) -> None:
    """Unknown vLLM engine arguments fail before loading, with the closest valid names."""
    valid = {f.name for f in dataclasses.fields(engine_args_cls)}
    for key in engine_args:
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=3)
            raise ConfigError(
                f"model.vllm_args.{key}: not an argument of this vLLM version"
                + (f". Did you mean {', '.join(close)}?" if close else ". See vllm.EngineArgs for the list.")
            )


def _render_one(render: Any, prompt: Any) -> Any:
    try:
        return render([prompt])[0]
    except Exception as exc:  # noqa: BLE001 - this prompt's row fails with the error
        return exc


QUEUE_FACTOR = 1.5


def _queue_limits(llm: Any) -> tuple[int, int | None]:
    """Requests and tokens to keep in the engine: ``QUEUE_FACTOR`` times what it can run at once."""
    config = getattr(llm.llm_engine, "vllm_config", None)
    max_seqs = getattr(getattr(config, "scheduler_config", None), "max_num_seqs", None) or 256
    cache = getattr(config, "cache_config", None)
    blocks, block_size = getattr(cache, "num_gpu_blocks", None), getattr(cache, "block_size", None)
    kv_tokens = blocks * block_size if blocks and block_size else None
    return int(QUEUE_FACTOR * max_seqs), (int(QUEUE_FACTOR * kv_tokens) if kv_tokens else None)


def _completion(output: Any) -> Completion:
    best = output.outputs[0]
    return Completion(token_ids=list(best.token_ids), text=best.text, finish_reason=best.finish_reason or "length")


def _replica_gpus(model: ModelConfig, node_gpus: int) -> int:
    """tensor_parallel_size x pipeline_parallel_size: independent replicas, never coupled."""
    args = model.vllm_args
    return int(args.get("tensor_parallel_size", 1)) * int(args.get("pipeline_parallel_size", 1))


def _dummy_weights(model: dict[str, Any], out: Path) -> None:
    model.setdefault("vllm_args", {})["load_format"] = "dummy"


def _create(cfg: Config, max_model_len: int) -> VllmEngine:
    return VllmEngine(cfg.model, cfg.sampling, max_model_len, attempts=cfg.run.max_attempts)


SPEC = EngineSpec(
    name="vllm", description="vllm.LLM in-process, fed continuously", create=_create, modules=("vllm",),
    extra="vllm", install_hint="CPU-only machine: pip install 'shardinfer[cpu]'", args_field="vllm_args",
    replica_gpus=_replica_gpus, capabilities=Capabilities(continuous=True),
    bench=BenchSupport(baseline="vllm", strategies=True, dummy_weights=_dummy_weights),
)
