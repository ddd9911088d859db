"""Baselines a benchmark compares the pipeline with, each run in its own process.

``python -m shardinfer.bench.raw SPEC.json OUT.json`` where the spec names a mode:

- ``vllm``: raw vLLM, one ``LLM.generate`` over all prompts (what a hand-written script does), with
  the same engine arguments as the pipeline; for a pooling task one ``LLM.encode`` with the task's
  pooling parameters (what ``LLM.embed`` and ``LLM.classify`` run);
- ``hf-static``: the naive transformers loop, static batches of ``static_batch`` rows in input
  order, left-padded, one ``generate`` each;
- ``strategies``: one vLLM engine, the same prompts run one at a time, in static batches, and all
  at once (continuous batching).

Every run records when its rows finished (a :class:`~shardinfer.timeline.Timeline`).
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shardinfer.config import Config
from shardinfer.engines.vllm_engine import engine_kwargs, sampling_kwargs
from shardinfer.engines.vllm_pooling import VLLM_TASK, pooling_engine_kwargs, pooling_params
from shardinfer.engines.vllm_stats import SchedulerStats, settings
from shardinfer.planning.validate import checked_from_dict
from shardinfer.requests.row_options import base_options
from shardinfer.telemetry.timeline import Timeline

_SPEED = re.compile(r"input:\s*([0-9.]+)\s*toks/s,\s*output:\s*([0-9.]+)\s*toks/s")


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    cfg = checked_from_dict(spec["config"])
    prompts = json.loads(Path(spec["prompts"]).read_text())
    started = spec.get("started_at", time.time())
    if spec["mode"] == "hf-static":
        return _hf_static(cfg, spec, prompts, started)
    return _vllm(cfg, spec, prompts, started)


def _vllm(cfg: Config, spec: dict[str, Any], prompts: list[list[int]], started: float) -> dict[str, Any]:
    import vllm
    from vllm.inputs import TokensPrompt


    llm = vllm.LLM(**{"disable_log_stats": False, **pooling_engine_kwargs(cfg),
                      **engine_kwargs(cfg.model, cfg.sampling, spec["max_model_len"], vllm.EngineArgs)})
    params = vllm.SamplingParams(**sampling_kwargs(base_options(cfg.sampling)))
    loaded = time.time()
    requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]

    estimated = {"rows": 0}  # rows whose tokens vLLM's progress updates did not give

    def pool(batch: list[Any], timeline: Timeline) -> list[tuple[int, int]]:
        """A pooling task: one ``LLM.encode`` (what ``LLM.embed`` / ``LLM.classify`` run) over the batch."""
        outputs = llm.encode(batch, pooling_params(cfg), use_tqdm=False, pooling_task=VLLM_TASK[cfg.task])
        timeline.add(time.time(), sum(len(o.prompt_token_ids) for o in outputs), 0)
        return [(len(o.prompt_token_ids), 0) for o in outputs]

    def call(batch: list[Any], timeline: Timeline) -> list[tuple[int, int]]:
        if cfg.task != "generate":
            return pool(batch, timeline)
        mean_in = sum(len(r["prompt_token_ids"]) for r in batch) / len(batch)
        recorder = _recorder(timeline, mean_in, cfg.sampling.max_tokens, estimated)
        outputs = llm.generate(batch, params, use_tqdm=recorder)
        return [(len(o.prompt_token_ids), len(o.outputs[0].token_ids)) for o in outputs]

    startup = loaded - started
    out: dict[str, Any] = {"device": _device(), "versions": {"vllm": vllm.__version__, **_torch_version()},
                           "startup_s": round(startup, 3), "runs": {}, "engine_settings": settings(llm)}
    stats = SchedulerStats(llm, every_s=1.0)
    if spec["mode"] == "vllm":
        out["runs"]["raw vLLM"] = _timed(lambda tl: call(requests, tl), startup, stats)
        out["timeline_estimated_rows"] = estimated["rows"]
        return out
    subset = requests[: spec["strategy_docs"]]
    size = spec["static_batch"]
    out["runs"]["one at a time"] = _timed(lambda tl: _chunks(call, subset, 1, tl), startup, stats)
    out["runs"][f"static batches of {size}"] = _timed(lambda tl: _chunks(call, subset, size, tl), startup, stats)
    out["runs"]["continuous batching"] = _timed(lambda tl: call(subset, tl), startup, stats)
    out["timeline_estimated_rows"] = estimated["rows"]
    return out


def _chunks(call: Callable[[list[Any], Timeline], list[tuple[int, int]]], requests: list[Any], size: int,
            timeline: Timeline) -> list[tuple[int, int]]:
    outputs: list[tuple[int, int]] = []
    for i in range(0, len(requests), size):
        outputs += call(requests[i:i + size], timeline)
    return outputs


def _timed(run: Callable[[Timeline], list[tuple[int, int]]], startup_s: float,
           stats: Any = None) -> dict[str, Any]:
    """Run one measurement, which returns (prompt tokens, output tokens) per row and records when
    rows finished. Each measurement's clock starts ``startup_s`` (the engine's start-up) before its
    first request. With ``stats``, what the engine's scheduler did during it."""
    begin = time.time()
    timeline = Timeline(start=begin - startup_s)
    if stats is not None:
        stats.start()
    counts = run(timeline)
    end = time.time()
    prompt = sum(n for n, _ in counts)
    output = sum(n for _, n in counts)
    return {"rows": len(counts), "started_at": begin - startup_s, "first_request_at": begin, "end": end,
            "generate_s": round(end - begin, 3), "prompt_tokens": prompt, "output_tokens": output,
            "timeline": timeline.to_json(), "scheduler": stats.summary() if stats is not None else None}


def _recorder(timeline: Timeline, mean_in: float, max_tokens: int, estimated: dict[str, int]) -> Callable[..., Any]:
    """A progress-bar class for ``LLM.generate(use_tqdm=...)`` that writes nowhere and records when
    rows finish: vLLM updates it once per finished row, after setting its running token speeds
    (where that text cannot be read, the row's tokens are estimated and counted in ``estimated``)."""
    from tqdm import tqdm

    class FinishRecorder(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.update(file=open(os.devnull, "w"), disable=False, mininterval=3600)  # noqa: SIM115 - closed in close()
            super().__init__(*args, **kwargs)
            self.seen = (0.0, 0.0)

        def update(self, n: float | None = 1) -> bool | None:
            now = time.time()
            totals = _cumulative(str(self.postfix or ""), self.format_dict["elapsed"])
            if totals is None:
                timeline.add(now, int(mean_in * (n or 1)), max_tokens * int(n or 1))
                estimated["rows"] += int(n or 1)
            else:
                timeline.add(now, round(totals[0] - self.seen[0]), round(totals[1] - self.seen[1]))
                self.seen = totals
            return super().update(n)

        def close(self) -> None:
            super().close()
            self.fp.close()

    return FinishRecorder


def _cumulative(postfix: str, elapsed: float) -> tuple[float, float] | None:
    match = _SPEED.search(postfix)
    if not match:
        return None
    return float(match.group(1)) * elapsed, float(match.group(2)) * elapsed


def _hf_static(cfg: Config, spec: dict[str, Any], prompts: list[list[int]], started: float) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = {"device_map": "auto"} if torch.cuda.is_available() else {}
    dtype = cfg.model.dtype if cfg.model.dtype == "auto" else getattr(torch, cfg.model.dtype)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=dtype, **args).eval()
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    startup = time.time() - started
    size = spec["static_batch"]

    def run(timeline: Timeline) -> list[tuple[int, int]]:
        counts = []
        for i in range(0, len(prompts), size):
            batch = prompts[i:i + size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=model.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=cfg.sampling.max_tokens,
                                     do_sample=False, pad_token_id=pad,
                                     eos_token_id=None if cfg.sampling.ignore_eos else tokenizer.eos_token_id)
            new = [row[width:].tolist() for row in out]
            timeline.add(time.time(), sum(len(p) for p in batch), sum(len(n) for n in new))
            counts += [(len(p), len(n)) for p, n in zip(batch, new)]
        return counts

    return {"device": _device(), "versions": {"transformers": transformers.__version__, **_torch_version()},
            "startup_s": round(startup, 3),
            "runs": {f"naive transformers loop, static batches of {size}": _timed(run, startup)}}


def _device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def _torch_version() -> dict[str, str]:
    import torch

    return {"torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    os.environ.update(spec.get("env", {}))
    result = run_spec(spec)
    Path(argv[1]).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
