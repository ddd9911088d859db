"""Run a benchmark: synthetic corpus, raw baseline, the full pipeline, optional strategy comparison;
then ``bench.json``, ``bench.md`` and plots in the output directory."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardinfer import __version__
from shardinfer.bench.report import render_markdown, write_plots
from shardinfer.bench.synth import make_docs, random_prompts, source_texts
from shardinfer.config import Config, ModelConfig, config_to_dict
from shardinfer.engines.registry import BenchSupport, EngineSpec, engines, get_engine
from shardinfer.errors import ConfigError, RunError
from shardinfer.launch.start import launch
from shardinfer.ledger.rundir import RunDir, write_json_atomic
from shardinfer.models.info import check_model_path, load_tokenizer, model_config_json, resolve_max_model_len
from shardinfer.planning.validate import checked_from_dict, load_checked
from shardinfer.reduce.report import run_timeline
from shardinfer.requests.prompts import PromptBuilder
from shardinfer.telemetry.metrics import load_metrics
from shardinfer.telemetry.timeline import Timeline, phases, rates

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Summarize the following document in a few sentences.\n\n{text}"


@dataclass
class BenchOptions:
    out: Path
    config: str | None = None
    model: str | None = None
    tokenizer: str | None = None
    engine: str | None = None
    dummy_weights: bool = False
    docs: int = 1024
    input_len: tuple[int, int] = (2000, 4000)
    output_len: int = 200
    max_model_len: int | None = None
    engine_args: dict[str, Any] = field(default_factory=dict)
    workers: int | None = None
    overrides: list[str] = field(default_factory=list)
    text_source: str | None = None
    seed: int = 0
    skip_raw: bool = False
    skip_pipeline: bool = False
    prompt_kind: str = "text"  # text: windows of real text through the chat template; random: random token ids
    strategies: bool = False
    static_batch: int = 16
    strategy_docs: int = 64


def bench_config(opts: BenchOptions) -> Config:
    """The pipeline's config: the user's (or a default one) with the benchmark's corpus, sampling
    and engine arguments; the raw baseline is built from the very same config."""
    if opts.config:
        raw = config_to_dict(load_checked(opts.config, opts.overrides))
    elif opts.model:
        raw = {"model": {"path": opts.model}, "prompt": {"user": DEFAULT_PROMPT}}
    else:
        raise ConfigError("shardinfer bench needs --model PATH or --config YAML")
    model = raw["model"]
    if opts.model:
        model["path"] = opts.model
    if opts.tokenizer:
        model["tokenizer"] = opts.tokenizer
    if opts.engine and opts.engine != model.get("engine", "vllm"):
        if model.get("engine_args"):  # the config's engine arguments are its own engine's
            log.info("--engine %s: model.engine_args of the config (engine %s) are left out", opts.engine,
                     model.get("engine", "vllm"))
        model["engine"], model["engine_args"] = opts.engine, {}
    check_model_path(ModelConfig(path=model["path"]))
    spec, support = _bench_engine(model.get("engine", "vllm"))
    model["engine_args"] = {**model.get("engine_args", {}), **opts.engine_args}
    if opts.dummy_weights:
        if support.dummy_weights is None:
            raise ConfigError(f"--dummy-weights: engine {spec.name} cannot load random weights")
        support.dummy_weights(model, opts.out)
    raw["input"] = {"path": str(opts.out / "corpus.jsonl"), "id_column": "id"}
    raw["sampling"] = {**raw.get("sampling", {}), "max_tokens": opts.output_len, "ignore_eos": True,
                       "temperature": 0.0, "stop": []}
    raw["run"] = {**raw.get("run", {}), "directory": str(opts.out / "pipeline-run")}
    if opts.workers:
        raw["run"]["workers"] = opts.workers
    raw["name"] = "bench"
    model["max_model_len"] = opts.max_model_len or model.get("max_model_len")
    cfg = checked_from_dict(raw)
    if cfg.model.max_model_len is None:
        cfg.model.max_model_len = min(resolve_max_model_len(cfg.model), _round_up(opts.input_len[1] + opts.output_len))
    return cfg


def _bench_engine(name: str) -> tuple[EngineSpec, BenchSupport]:
    spec = get_engine(name)
    if spec.bench is None:
        raise ConfigError(f"engine {name} has no benchmark baseline; shardinfer bench measures engines that "
                          f"declare one: {', '.join(n for n, e in engines().items() if e.bench)}")
    return spec, spec.bench


def _round_up(n: int, step: int = 1024) -> int:
    return -(-n // step) * step


def run_bench(opts: BenchOptions, argv: list[str]) -> dict[str, Any]:
    opts.out.mkdir(parents=True, exist_ok=True)
    cfg = bench_config(opts)
    check_model_path(cfg.model)
    prompts = _write_corpus(cfg, opts)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": "shardinfer bench " + " ".join(argv),
        "shardinfer": __version__, "python": sys.version.split()[0],
        "shape": _shape(prompts, opts), "engine": cfg.model.engine, "model": cfg.model.path,
        "engine_args": get_engine(cfg.model.engine).args(cfg.model),
        "max_model_len": cfg.model.max_model_len, "runs": {},
    }
    if not opts.skip_raw:
        result.update(_baseline(cfg, opts, _bench_engine(cfg.model.engine)[1].baseline))
    if not opts.skip_pipeline:
        result["runs"]["pipeline"] = _pipeline(cfg)
    result["ratio"] = _ratios(result["runs"])
    if opts.strategies:
        if not _bench_engine(cfg.model.engine)[1].strategies:
            raise ConfigError(f"--strategies compares batching strategies of a continuous engine such as vllm; "
                              f"engine {cfg.model.engine} has none to compare")
        strategies = _baseline(cfg, opts, "strategies")
        result["strategies"] = strategies["runs"]
        result["strategies_timeline_estimated_rows"] = strategies["baseline_timeline_estimated_rows"]
    write_json_atomic(opts.out / "bench.json", result)
    result["plots"] = write_plots(opts.out, result)
    write_json_atomic(opts.out / "bench.json", result)
    (opts.out / "bench.md").write_text(render_markdown(result))
    return result


def replot(out: Path) -> dict[str, Any]:
    """Plots and Markdown again from ``out/bench.json`` (e.g. measured where matplotlib was missing)."""
    path = out / "bench.json"
    if not path.is_file():
        raise ConfigError(f"--replot: {path} does not exist; give the --out directory of a benchmark")
    result = json.loads(path.read_text())
    result["plots"] = write_plots(out, result)
    write_json_atomic(path, result)
    (out / "bench.md").write_text(render_markdown(result))
    return result


def _write_corpus(cfg: Config, opts: BenchOptions) -> list[list[int]]:
    if opts.prompt_kind == "random":
        if not opts.skip_pipeline:
            raise ConfigError("--prompt-kind random gives the engine random token ids, which the pipeline (text in) "
                              "cannot reproduce: add --skip-pipeline")
        vocab = model_config_json(cfg.model.path).get("vocab_size") or 32000
        prompts = random_prompts(opts.docs, opts.input_len, int(vocab), opts.seed)
        (opts.out / "prompts.json").write_text(json.dumps(prompts))
        return prompts
    tokenizer = load_tokenizer(cfg.model)
    builder = PromptBuilder(cfg.prompt, tokenizer, max_model_len=resolve_max_model_len(cfg.model),
                            max_tokens=cfg.sampling.max_tokens)
    start = time.time()
    docs = make_docs(builder, tokenizer, source_texts(opts.text_source), docs=opts.docs,
                     lengths=opts.input_len, seed=opts.seed)
    with (opts.out / "corpus.jsonl").open("w") as fh:
        for i, doc in enumerate(docs):
            fh.write(json.dumps({"id": f"doc-{i:07d}", "text": doc.text}) + "\n")
    prompts = [d.prompt_ids for d in docs]
    (opts.out / "prompts.json").write_text(json.dumps(prompts))
    log.info("synthetic corpus: %d documents, %d prompt tokens in %.1f s", len(docs),
             sum(map(len, prompts)), time.time() - start)
    return prompts


def _shape(prompts: list[list[int]], opts: BenchOptions) -> dict[str, Any]:
    lengths = [len(p) for p in prompts]
    return {"docs": len(prompts), "input_len": list(opts.input_len), "output_len": opts.output_len,
            "prompt_tokens": sum(lengths), "prompt_len_min": min(lengths), "prompt_len_max": max(lengths),
            "prompt_len_mean": round(sum(lengths) / len(lengths), 1)}


def _baseline(cfg: Config, opts: BenchOptions, mode: str) -> dict[str, Any]:
    """Run a baseline in its own process (so engines never share the accelerator)."""
    spec = {"mode": mode, "config": config_to_dict(cfg), "prompts": str(opts.out / "prompts.json"),
            "max_model_len": cfg.model.max_model_len, "static_batch": opts.static_batch,
            "strategy_docs": opts.strategy_docs, "env": cfg.run.env, "started_at": time.time()}
    spec_path, out_path, log_path = (opts.out / f"{mode}.{s}" for s in ("spec.json", "out.json", "log"))
    spec_path.write_text(json.dumps(spec))
    log.info("running the %s baseline (log: %s)", mode, log_path)
    with log_path.open("w") as fh:
        code = subprocess.call([sys.executable, "-m", "shardinfer.bench.raw", str(spec_path), str(out_path)],
                               stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **cfg.run.env})
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise RunError(f"the {mode} baseline failed (exit {code}); last lines of {log_path}:\n{tail}")
    raw = json.loads(out_path.read_text())
    runs = {name: {**_summary(run["prompt_tokens"], run["output_tokens"], run["rows"],
                              Timeline(**run["timeline"]), run["started_at"], run["first_request_at"], run["end"]),
                   **_engine(raw.get("engine_settings"), run.get("scheduler"))}
            for name, run in raw["runs"].items()}
    return {"device": raw["device"], "versions": raw["versions"], "runs": runs,
            "baseline_timeline_estimated_rows": raw.get("timeline_estimated_rows", 0)}


def _engine(settings: dict[str, Any] | None, scheduler: dict[str, Any] | None) -> dict[str, Any]:
    """The engine's settings in effect and its scheduler's stats, when the engine tells them."""
    return {"engine": {"settings": settings, "scheduler": scheduler}} if settings or scheduler else {}


def _pipeline(cfg: Config) -> dict[str, Any]:
    run_dir = RunDir(cfg.run.directory or "bench-run")
    if run_dir.path.exists():
        shutil.rmtree(run_dir.path)  # a benchmark always measures a fresh run
    started = time.time()
    report = launch(cfg, launcher="local").result()
    metrics = load_metrics(run_dir)
    timeline, first, end = run_timeline(metrics, start=started)
    summary = _summary(report["tokens"]["prompt"], report["tokens"]["output"], report["rows"]["in"],
                       timeline, started, first or started, end)
    summary.update(workers=len({m.rank for m in metrics}), rows_failed=report["rows"]["failed"],
                   run_dir=str(run_dir.path), versions=report["versions"])
    reports = [m.engine_report for m in metrics if m.engine_report]
    if reports:  # one worker's (the first), and each worker's in engine_by_worker
        summary.update(_engine(reports[0].get("settings"), reports[0].get("scheduler")))
        summary["engine_by_worker"] = reports
    return summary


def _summary(prompt: int, output: int, rows: int, timeline: Timeline, started: float, first: float,
             end: float) -> dict[str, Any]:
    """Throughput of one measurement: start-up is ``started`` to ``first`` (the first request),
    generation ``first`` to ``end``."""
    generation = max(end - first, 1e-9)
    wall = max(end - started, 1e-9)
    return {
        "rows": rows, "tokens": {"input": prompt, "output": output, "total": prompt + output},
        "startup_s": round(first - started, 3), "generation_s": round(generation, 3), "wall_s": round(wall, 3),
        "tokens_per_s": {"input": round(prompt / generation, 1), "output": round(output / generation, 1),
                         "total": round((prompt + output) / generation, 1)},
        "end_to_end_tokens_per_s": round((prompt + output) / wall, 1),
        "phases": phases(timeline, first, end),
        "timeline": {"bin_s": timeline.bin_s, "points": [[round(t, 3), round(i + o, 1)] for t, i, o in rates(timeline)]},
    }


def _ratios(runs: dict[str, Any]) -> dict[str, float] | None:
    """Pipeline over baseline: generation throughput (per replica) and end to end."""
    base = next((r for name, r in runs.items() if name != "pipeline"), None)
    if base is None:
        return None
    pipe = runs.get("pipeline")
    if pipe is None:
        return None
    replicas = max(pipe.get("workers", 1), 1)
    return {"generation_per_replica": round(pipe["tokens_per_s"]["total"] / replicas / base["tokens_per_s"]["total"], 4),
            "end_to_end_per_replica": round(pipe["end_to_end_tokens_per_s"] / replicas / base["end_to_end_tokens_per_s"], 4)}
