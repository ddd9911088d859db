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

import ast
import copy
import dataclasses
import importlib.util
import json
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardinfer.config import Config, ModelConfig, SamplingConfig
from shardinfer.engines.base import Completion, Finished, Pooled, Refused, TokenLogprob
from shardinfer.engines.registry import BenchSupport, Capabilities, EngineSpec, Span, unknown_arguments
from shardinfer.engines.retry import generate_with_retries
from shardinfer.engines.vllm_pooling import VLLM_TASK, pooled, pooling_engine_kwargs, pooling_params
from shardinfer.engines.vllm_stats import SchedulerStats, settings
from shardinfer.errors import ConfigError, missing_dependency
from shardinfer.requests.prompts import Prompt
from shardinfer.requests.row_options import RowOptions, base_options

log = logging.getLogger(__name__)


@dataclass
class _Request:
    batch: Any
    index: int
    prompt: Prompt
    tokens: int  # prompt and output tokens it may take in the KV cache
    item: Any = None  # the engine input rendered from the prompt (or why it cannot be)

    @property
    def adapter(self) -> str | None:
        return self.prompt.options.lora if self.prompt.options is not None else None


class VllmEngine:
    name = "vllm"

    def __init__(self, model: ModelConfig, sampling: SamplingConfig, max_model_len: int, *,
                 attempts: int = 3, backoff_s: float = 2.0, cfg: Config | None = None):
        self.cfg = cfg  # the run's config, for a pooling task (None: generate)
        self.pooling = cfg is not None and cfg.task != "generate"
        self._pooling_params: Any = None
        self.model = model
        self.sampling = sampling
        self.max_model_len = max_model_len
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.llm: Any = None
        self.base = base_options(sampling)
        self._params: dict[tuple[RowOptions, bool], Any] = {}  # SamplingParams by (options, streamed)
        self._adapters: dict[str, Any] = {}  # LoRARequest by adapter name
        self._in_flight: dict[str, _Request] = {}
        # vLLM on CPU applies a LoRA adapter to every request of a batch it is in: there, requests of
        # one adapter (or the base model) run at a time and the others wait here.
        self.one_adapter_at_a_time = False
        self._held: deque[_Request] = deque()
        self._in_flight_tokens = 0
        self._ready: list[Finished] = []  # rejected at submit or redone after a failed step
        self._next_id = 0
        self.max_requests = 256  # requests that keep the engine busy (set at load)
        self.stats: SchedulerStats | None = None
        self.max_tokens_queued: int | None = None
        # A replica across nodes: called before failed steps are retried (it holds them when the
        # failure is a lost node, which stops the replica instead)
        self.before_retry: Callable[[], None] | None = None

    def load(self) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise missing_dependency("vllm", SPEC.extra, SPEC.install_hint) from exc
        kwargs = llm_kwargs(self.model, self.sampling, self.max_model_len, vllm.EngineArgs, self.cfg)
        log.info("loading vLLM %s: %s", vllm.__version__, kwargs)
        try:
            self.llm = vllm.LLM(**kwargs)
        except (ValueError, TypeError) as exc:  # pydantic's validation errors are ValueErrors
            raise ConfigError(f"vLLM refused the engine settings: {_first_lines(exc)}. Fix model.* or "
                              f"model.engine_args.") from exc
        except OSError as exc:
            raise ConfigError(f"model.path: vLLM cannot load {self.model.path!r}: {_first_lines(exc)}") from exc
        self.max_requests, self.max_tokens_queued = _queue_limits(self.llm)
        if self.pooling:
            assert self.cfg is not None
            self._pooling_params = pooling_params(self.cfg)
        self.one_adapter_at_a_time = bool(self.model.lora) and not _on_gpu()
        self.stats = SchedulerStats(self.llm).start()
        log.info("keeping up to %d requests / %s tokens queued in the engine", self.max_requests,
                 self.max_tokens_queued or "unbounded")

    def params(self, options: RowOptions | None, *, streamed: bool = False) -> Any:
        """vLLM sampling parameters of a row's options (made once per distinct options)."""
        import vllm

        if self.pooling:
            return self._pooling_params
        key = (options or self.base, streamed)
        if key not in self._params:
            kwargs = sampling_kwargs(key[0])
            if key[0].temperature == 0:
                kwargs["n"] = 1  # greedy outputs are all the same: one is made, then repeated
            if streamed:
                from vllm.sampling_params import RequestOutputKind

                kwargs["output_kind"] = RequestOutputKind.FINAL_ONLY
            self._params[key] = vllm.SamplingParams(**kwargs)
        return self._params[key]

    def adapter(self, options: RowOptions | None) -> Any:
        """The LoRA request of a row's adapter (None: the base model)."""
        name = (options or self.base).lora
        if name is None:
            return None
        if name not in self._adapters:
            from vllm.lora.request import LoRARequest

            self._adapters[name] = LoRARequest(name, len(self._adapters) + 1, str(Path(self.model.lora[name])))
        return self._adapters[name]

    def generate(self, prompts: list[Prompt]) -> list[Completion]:
        """One blocking ``LLM.generate`` over all prompts (retries and benchmarks)."""
        if self.pooling:
            assert self.cfg is not None
            outputs = self.llm.encode([_tokens_prompt(p) for p in prompts], self._pooling_params, use_tqdm=False,
                                      pooling_task=VLLM_TASK[self.cfg.task])
            return [pooled(o) for o in outputs]  # type: ignore[misc]
        groups: dict[Any, list[int]] = {}
        for i, p in enumerate(prompts):  # one adapter at a time where the engine needs it
            groups.setdefault(self.adapter(p.options) if self.one_adapter_at_a_time else None, []).append(i)
        done: list[Completion | None] = [None] * len(prompts)
        for members in groups.values():
            chosen = [prompts[i] for i in members]
            adapters = [self.adapter(p.options) for p in chosen]
            outputs = self.llm.generate([_tokens_prompt(p) for p in chosen],
                                        [self.params(p.options) for p in chosen], use_tqdm=False,
                                        lora_request=adapters if any(adapters) else None)
            for i, o, p in zip(members, outputs, chosen):
                done[i] = _completion(o, p.options or self.base)
        return done  # type: ignore[return-value]

    def submit(self, batch: Any, prompts: list[Prompt]) -> None:
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i].token_ids or ()))
        inputs = self._engine_inputs([prompts[i] for i in order])
        for index, item in zip(order, inputs):
            prompt = prompts[index]
            options = prompt.options or self.base
            budget = 0 if self.pooling else options.budget_tokens
            request = _Request(batch, index, prompt, len(prompt.token_ids or ()) + budget, item)
            if self.one_adapter_at_a_time and (self._held or not self._runs_now(options.lora)):
                self._held.append(request)
                self._in_flight_tokens += request.tokens
                continue
            self._add(request)

    def _add(self, request: _Request, *, counted: bool = False) -> None:
        """Hand one request to the engine (``counted``: its tokens are counted already, it was held)."""
        request_id = f"shardinfer-{self._next_id}"
        self._next_id += 1
        options = request.prompt.options
        try:
            if isinstance(request.item, Exception):
                raise request.item
            self.llm.llm_engine.add_request(request_id, request.item, self.params(options, streamed=True),
                                            lora_request=self.adapter(options))
        except Exception as exc:  # noqa: BLE001 - a request the engine refuses fails its row only
            log.warning("the engine refused row %d of batch %s: %r", request.index, request.batch, exc)
            self._ready.append((request.batch, request.index, Refused(str(exc))))
            if counted:
                self._in_flight_tokens -= request.tokens
            return
        self._in_flight[request_id] = request
        if not counted:
            self._in_flight_tokens += request.tokens

    def _runs_now(self, adapter: str | None) -> bool:
        """Whether a request of this adapter may join the requests in flight (one adapter at a time)."""
        return not self._in_flight or next(iter(self._in_flight.values())).adapter == adapter

    def _admit_held(self) -> None:
        """Nothing in flight: hand the engine the held requests of the oldest one's adapter."""
        if self._in_flight or not self._held:
            return
        adapter = self._held[0].adapter
        keep: deque[_Request] = deque()
        for request in self._held:
            if request.adapter == adapter:
                self._add(request, counted=True)
            else:
                keep.append(request)
        self._held = keep

    def _engine_inputs(self, prompts: list[Prompt]) -> list[Any]:
        """Token prompts rendered the way ``LLM.generate`` renders them (when this vLLM has the
        renderer step), each one on its own if the batch fails, so a bad prompt fails alone."""
        raw = [_tokens_prompt(p) for p in prompts]
        render = getattr(self.llm, "_preprocess_cmpl", None)
        if render is None:
            return raw
        try:
            return list(render(raw))
        except Exception:  # noqa: BLE001 - isolate the prompts that cannot be rendered
            return [_render_one(render, r) for r in raw]

    def wants_more(self) -> bool:
        if len(self._in_flight) + len(self._held) >= self.max_requests:
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
        for request in [r for r in self._held if r.batch == batch]:
            self._held.remove(request)
            self._in_flight_tokens -= request.tokens
        self._admit_held()

    def poll(self) -> list[Finished]:
        """One engine step: the rows it finished (or, after a failed step, every row in flight)."""
        if self.stats is not None:
            self.stats.sample(min_gap_s=1.0)
        self._admit_held()
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
                done.append((request.batch, request.index, self._result(output, request)))
        return done

    def _result(self, output: Any, request: _Request) -> Completion | Pooled:
        if self.pooling:
            return pooled(output)
        return _completion(output, request.prompt.options or self.base)

    def _pop(self, request_id: str) -> _Request:
        request = self._in_flight.pop(request_id)
        self._in_flight_tokens -= request.tokens
        return request

    def _redo_in_flight(self, exc: Exception) -> list[Finished]:
        if self.before_retry is not None:
            self.before_retry()
        log.error("engine step failed with %d requests in flight: %r; redoing them with retries",
                  len(self._in_flight), exc)
        requests = list(self._in_flight.values())
        try:
            self.llm.llm_engine.abort_request(list(self._in_flight))
        except Exception as abort_exc:  # noqa: BLE001 - the engine may be dead; retries will tell
            log.warning("could not abort the requests in flight: %r", abort_exc)
        self._in_flight.clear()
        self._in_flight_tokens = sum(r.tokens for r in self._held)
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


def llm_kwargs(model: ModelConfig, sampling: SamplingConfig, max_model_len: int, engine_args_cls: type,
               cfg: Config | None = None) -> dict[str, Any]:
    """Everything a ``vllm.LLM`` of this run is given: the followers of a replica across nodes
    build their part of the engine from the same arguments."""
    return {"disable_log_stats": False,  # the scheduler's stats go into the worker's metrics
            **(pooling_engine_kwargs(cfg) if cfg is not None else {}),
            **engine_kwargs(model, sampling, max_model_len, engine_args_cls)}


def engine_kwargs(model: ModelConfig, sampling: SamplingConfig, max_model_len: int,
                  engine_args_cls: type) -> dict[str, Any]:
    """The ``vllm.LLM`` arguments of a config (checked against ``vllm.EngineArgs``)."""
    check_engine_args(model.engine_args, engine_args_cls)
    return {
        "model": model.path,
        "tokenizer": model.tokenizer or model.path,
        "dtype": model.dtype,
        "max_model_len": max_model_len,
        **({"seed": sampling.seed} if sampling.seed is not None else {}),
        **lora_kwargs(model),
        **model.engine_args,
    }


def lora_kwargs(model: ModelConfig) -> dict[str, Any]:
    """LoRA serving for the adapters of ``model.lora``: as many slots as adapters, the largest rank."""
    if not model.lora:
        return {}
    return {"enable_lora": True, "max_loras": len(model.lora), "max_lora_rank": max(map(adapter_rank, model.lora.values()))}


def adapter_rank(path: str) -> int:
    """An adapter's rank, from its adapter_config.json (PEFT layout)."""
    config = Path(path).expanduser() / "adapter_config.json"
    try:
        return int(json.loads(config.read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"model.lora: {config} is missing or has no rank 'r' ({exc}); give the directory of a "
                          f"PEFT LoRA adapter (adapter_config.json and adapter_model.safetensors)") from exc


def sampling_kwargs(o: RowOptions) -> dict[str, Any]:
    """``vllm.SamplingParams`` arguments of a row's options."""
    kwargs: dict[str, Any] = {
        "max_tokens": o.max_tokens, "temperature": o.temperature, "top_p": o.top_p, "ignore_eos": o.ignore_eos,
        "n": o.n, "presence_penalty": o.presence_penalty, "frequency_penalty": o.frequency_penalty,
    }
    optional = {"top_k": o.top_k, "seed": o.seed, "stop": list(o.stop) or None, "logprobs": o.logprobs}
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    if o.structured is not None:
        from vllm.sampling_params import StructuredOutputsParams

        kwargs["structured_outputs"] = StructuredOutputsParams(**o.structured.engine_kwargs())
    return kwargs


def check_engine_args(engine_args: dict[str, Any], engine_args_cls: type | set[str]) -> None:
    """Unknown vLLM engine arguments fail before loading, with the closest valid names."""
    valid = engine_args_cls if isinstance(engine_args_cls, set) else {f.name for f in dataclasses.fields(engine_args_cls)}
    unknown = unknown_arguments(engine_args, valid)
    if unknown:
        raise ConfigError(f"model.engine_args: not arguments of this vLLM version: {'; '.join(unknown)}. "
                          f"See vllm.EngineArgs for the list.")


def argument_names() -> set[str] | None:
    """The fields of the installed vLLM's ``EngineArgs``, read from its source (importing vLLM takes
    seconds and wants the GPU libraries); None when that file is not where it is expected."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(next(iter(spec.submodule_search_locations))) / "engine" / "arg_utils.py"
    try:
        tree = ast.parse(source.read_text())
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "EngineArgs":
            names = {s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
            return names or None
    return None


def _first_lines(exc: BaseException, lines: int = 4) -> str:
    return " ".join(str(exc).strip().splitlines()[:lines])


def _tokens_prompt(prompt: Prompt) -> Any:
    """The engine input of a row: its token ids (and a cross-encoder pair's token type ids)."""
    from vllm.inputs import TokensPrompt

    item = TokensPrompt(prompt_token_ids=prompt.token_ids or [])
    if prompt.token_type_ids is not None:
        item["token_type_ids"] = prompt.token_type_ids
    return item


def _on_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


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


def _completion(output: Any, options: RowOptions) -> Completion:
    """A request's outputs, in index order: the first, with the others as ``more``; greedy requests
    for n outputs made one, repeated here."""
    top = options.logprobs or 0
    samples = [_sample(o, top) for o in sorted(output.outputs, key=lambda o: o.index)]
    first = samples[0]
    first.more = samples[1:] if len(samples) > 1 else [copy.copy(first) for _ in range(options.n - 1)]
    return first


def _sample(out: Any, top: int) -> Completion:
    logprobs = None
    if out.logprobs is not None:
        logprobs = [_token_logprob(token, alternatives, top)
                    for token, alternatives in zip(out.token_ids, out.logprobs)]
    return Completion(token_ids=list(out.token_ids), text=out.text, finish_reason=out.finish_reason or "length",
                      logprobs=logprobs)


def _token_logprob(token: int, alternatives: dict[int, Any], top: int) -> TokenLogprob:
    """The chosen token and the ``top`` best-ranked alternatives (vLLM also gives the chosen token
    when it is not among them)."""
    chosen = alternatives[token]
    ranked = sorted((lp for lp in alternatives.values() if lp.rank is not None and lp.rank <= top),
                    key=lambda lp: lp.rank)
    return TokenLogprob(chosen.decoded_token or "", float(chosen.logprob),
                        [(lp.decoded_token or "", float(lp.logprob)) for lp in ranked])


def _replica_gpus(model: ModelConfig, node_gpus: int) -> int:
    """tensor_parallel_size x pipeline_parallel_size: independent replicas, never coupled."""
    args = model.engine_args
    return int(args.get("tensor_parallel_size", 1)) * int(args.get("pipeline_parallel_size", 1))


# Set by shardinfer for a replica across nodes (slurm.nodes_per_replica), never in model.engine_args.
SPAN_ARGS = ("nnodes", "node_rank", "master_addr", "master_port", "headless", "distributed_executor_backend")


def _span_args(span: Span) -> dict[str, Any]:
    return {"nnodes": span.nodes, "node_rank": span.node, "master_addr": span.master_addr,
            "master_port": span.master_port, "distributed_executor_backend": "mp"}


def _span_check(model: ModelConfig, nodes_per_replica: int, gpus_per_node: int) -> str | None:
    """Why vLLM cannot run a replica over ``nodes_per_replica`` nodes as configured, or None."""
    taken = [k for k in SPAN_ARGS if k in model.engine_args]
    if taken:
        return (f"model.engine_args.{taken[0]} is set by shardinfer for a replica across nodes: remove it and "
                f"use slurm.nodes_per_replica")
    if nodes_per_replica == 1:
        return None
    names = argument_names()
    if names is not None and "nnodes" not in names:
        return (f"slurm.nodes_per_replica={nodes_per_replica}: the installed vLLM cannot span nodes (no nnodes "
                f"argument); install vLLM >= 0.18")
    per_replica = _replica_gpus(model, gpus_per_node)
    if gpus_per_node == 0 and per_replica != nodes_per_replica:
        return (f"slurm.nodes_per_replica={nodes_per_replica} on CPU nodes runs one vLLM process per node: set "
                f"model.engine_args.tensor_parallel_size={nodes_per_replica} (now tensor_parallel_size x "
                f"pipeline_parallel_size = {per_replica})")
    if gpus_per_node == 0 and int(model.engine_args.get("pipeline_parallel_size", 1)) > 1:
        return ("model.engine_args.pipeline_parallel_size: vLLM's CPU build cannot run pipeline stages in "
                "separate processes (its CPU model runner keeps no intermediate tensors); on CPU nodes use "
                "tensor_parallel_size instead")
    return None


def _follower(cfg: Config, max_model_len: int, span: Span) -> None:
    """This node's part of a replica across nodes: what ``vllm serve --headless`` runs on a follower
    node. Returns when one of this node's vLLM processes stopped."""
    try:
        import vllm
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.executor.multiproc_executor import MultiprocExecutor
    except ImportError as exc:
        raise missing_dependency("vllm", SPEC.extra, SPEC.install_hint) from exc
    kwargs = {**llm_kwargs(cfg.model, cfg.sampling, max_model_len, vllm.EngineArgs, cfg), **_span_args(span)}
    log.info("starting vLLM %s node %d of %d: %s", vllm.__version__, span.node, span.nodes, kwargs)
    # the leader's LLM's context: its defaults (max_num_batched_tokens...) must be the follower's too
    config = vllm.EngineArgs(**kwargs).create_engine_config(usage_context=UsageContext.LLM_CLASS, headless=True)
    executor = MultiprocExecutor(config, monitor_workers=False)  # returns once its workers joined the leader's
    log.info("vLLM processes of node %d joined the replica", span.node)
    executor.start_worker_monitor(inline=True)  # returns when one of them stops


def _dummy_weights(model: dict[str, Any], out: Path) -> None:
    model.setdefault("engine_args", {})["load_format"] = "dummy"


def _create(cfg: Config, max_model_len: int) -> VllmEngine:
    return VllmEngine(cfg.model, cfg.sampling, max_model_len, attempts=cfg.run.max_attempts, cfg=cfg)


SPEC = EngineSpec(
    name="vllm", description="vllm.LLM in-process, fed continuously", create=_create, modules=("vllm",),
    extra="vllm", install_hint="CPU-only machine: pip install 'shardinfer[cpu]'",
    replica_gpus=_replica_gpus,
    capabilities=Capabilities(continuous=True, structured_output=True, lora=True, samples=True, logprobs=True,
                              penalties=True),
    bench=BenchSupport(baseline="vllm", strategies=True, dummy_weights=_dummy_weights),
    argument_names=argument_names,
    tasks=("generate", "embed", "classify", "score", "reward"),
    follower=_follower, span_args=_span_args, span_check=_span_check,
)
