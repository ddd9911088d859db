"""The ``shardinfer`` command line: a thin layer over the modules."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shardinfer import __version__
from shardinfer.bench.measure import BenchOptions, replot, run_bench
from shardinfer.bench.simulate import SimOptions, run_simulation
from shardinfer.bench.synth import bundled_corpus
from shardinfer.config import apply_override, dump_config, field_help
from shardinfer.engines.registry import engine_names
from shardinfer.errors import ConfigError, ShardinferError, disk_full, is_disk_full
from shardinfer.launch.layout import layout, node_map, replica_lines
from shardinfer.launch.registry import get_launcher, launcher_choices, launcher_type
from shardinfer.launch.start import dry_run, launch, resume
from shardinfer.ledger.rundir import RunDir, restrict_umask
from shardinfer.models.tiny import build_tiny_lora, build_tiny_model
from shardinfer.models.tiny_heads import CAUSAL, KINDS
from shardinfer.planning.estimate import estimate
from shardinfer.planning.examples import example_requests
from shardinfer.planning.plan import describe, make_plan
from shardinfer.planning.preflight import describe as describe_checks
from shardinfer.planning.preflight import preflight
from shardinfer.planning.validate import load_checked, reference_notes
from shardinfer.reduce.merge import reduce_run
from shardinfer.results import summary_line
from shardinfer.telemetry.console import choose_mode, follow
from shardinfer.telemetry.logs import setup_logging
from shardinfer.telemetry.status import describe_status, run_status

if TYPE_CHECKING:
    from shardinfer.launch.base import RunHandle

log = logging.getLogger("shardinfer")


def _cmd_plan(args: argparse.Namespace) -> int:
    cfg = load_checked(args.config, args.overrides)
    launcher = get_launcher(args.launcher)
    # how nodes become workers, on a cluster or when a replica spans nodes (refused here if it cannot work)
    lay = layout(cfg) if launcher.on_cluster or cfg.slurm.nodes_per_replica > 1 else None
    workers = launcher.workers(cfg)
    print("# resolved config")
    print(dump_config(cfg))
    checks = preflight(cfg)
    print(describe_checks(checks))
    if any(c.status == "fail" for c in checks):
        print("shardinfer: config error: pre-flight checks failed; fix the lines marked [fail]", file=sys.stderr)
        return 2
    if lay is not None:
        print("\n".join(replica_lines(cfg, lay) + node_map(lay)))
    print(f"# plan for {workers} worker(s) ({args.launcher} launcher)")
    plan = make_plan(cfg, workers)
    print(describe(plan, cfg))
    print("\n".join(estimate(cfg, plan).lines()))
    print(example_requests(cfg, plan))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    choose_mode(verbose=args.verbose)
    handle = launch(args.config, launcher=args.launcher, overrides=args.overrides, on_cluster=False)
    _print_report(handle.run_dir, follow(handle))
    return 0


def _print_report(run_dir: RunDir, report: dict[str, Any]) -> None:
    rate = report["tokens_per_s"]
    print(f"\n{summary_line(report['rows'])}")
    rows_per_s = (report.get("throughput") or {}).get("rows_per_s", 0.0)
    print(f"throughput: {rate['total']:.0f} tokens/s ({rate['input']:.0f} in, {rate['output']:.0f} out), "
          f"{rows_per_s:.1f} rows/s over {report['time_s']['wall']:.1f} s")
    print(f"results: {run_dir.results.absolute()}")
    print(f"report:  {run_dir.report_md.resolve()} (and report.json)")


def _cmd_submit(args: argparse.Namespace) -> int:
    choose_mode(verbose=args.verbose)
    cfg = load_checked(args.config, args.overrides)
    if args.dry_run:
        print(dry_run(cfg, args.launcher, on_cluster=True))
        return 0
    handle = launch(cfg, launcher=args.launcher, on_cluster=True)
    _print_jobs(handle)
    if args.wait:
        report = follow(handle)
        print(f"rows: {report['rows']}\nresults: {report['results']}")
    return 0


def _print_jobs(handle: RunHandle) -> None:
    ids = handle.job_ids
    print(f"run:        {handle.run_dir.path.resolve()}")
    print(f"worker job: {ids[0]}")
    print(f"reduce job: {ids[-1]}" + (" (after the worker job)" if len(ids) > 1 else " (the same job: rank 0 reduces)"))
    print(f"follow it:  shardinfer status {handle.run_dir.path}")


def _cmd_status(args: argparse.Namespace) -> int:
    run_dir = RunDir(args.run_dir)
    if args.json:
        print(json.dumps(run_status(run_dir).to_json()))
        return 0
    if args.watch is None:
        print(describe_status(run_status(run_dir)))
        return 0
    interactive = sys.stdout.isatty()
    try:
        while True:
            status = run_status(run_dir)
            text = describe_status(status)
            print(("\x1b[H\x1b[2J" if interactive else "") + time.strftime("%H:%M:%S ") + text, flush=True)
            if status.finished:
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    choose_mode(verbose=args.verbose)
    handle = resume(RunDir(args.run_dir), retry_failed=args.retry_failed, launcher=args.launcher)
    if get_launcher(handle.launcher).on_cluster:
        _print_jobs(handle)
    else:
        _print_report(handle.run_dir, follow(handle))
    return 0


def _cmd_reduce(args: argparse.Namespace) -> int:
    run_dir = RunDir(args.run_dir)
    report = reduce_run(run_dir)
    print(f"{summary_line(report['rows'])}\nresults: {run_dir.results.absolute()}\nreport:  {run_dir.report_md.resolve()}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.simulate:
        return _simulate(args)
    if args.replot:
        replot(Path(args.out))
        print((Path(args.out) / "bench.md").read_text())
        return 0
    engine_args: dict = {}
    for item in args.engine_arg:
        apply_override(engine_args, item)
    opts = BenchOptions(out=Path(args.out), config=args.config, model=args.model, tokenizer=args.tokenizer,
                        engine=args.engine, dummy_weights=args.dummy_weights, docs=args.docs,
                        input_len=_length_range(args.input_len), output_len=args.output_len,
                        max_model_len=args.max_model_len, engine_args=engine_args, workers=args.workers,
                        overrides=args.overrides, text_source=args.text_source, seed=args.seed,
                        skip_raw=args.skip_raw, skip_pipeline=args.skip_pipeline, prompt_kind=args.prompt_kind,
                        strategies=args.strategies, static_batch=args.static_batch,
                        strategy_docs=args.strategy_docs)
    result = run_bench(opts, args.command_line[1:])
    print((Path(args.out) / "bench.md").read_text())
    print(f"results: {Path(args.out).resolve()}/bench.json, bench.md" +
          "".join(f", {p}" for p in result.get("plots", {}).values()))
    return 0


def _simulate(args: argparse.Namespace) -> int:
    run_simulation(SimOptions(out=Path(args.out), workers=args.sim_workers, units=args.sim_units, rows=args.sim_rows,
                              tokens_per_s=args.sim_tokens_per_s, fs_latency_ms=args.fs_latency_ms,
                              lease_timeout_s=args.sim_lease_timeout_s, kill=args.sim_kill))
    print((Path(args.out) / "sim.md").read_text())
    return 0


def _length_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    try:
        return (int(lo), int(hi)) if sep else (int(lo), int(lo))
    except ValueError:
        raise ConfigError(f"--input-len {text!r}: give MIN-MAX prompt tokens, e.g. 2000-4000") from None


def _add_bench_parser(sub: Any, engines: list[str]) -> None:
    text = ("throughput of the full pipeline against raw vLLM (or the naive transformers loop) on a "
            "synthetic corpus of real text; JSON, Markdown and plots")
    p = sub.add_parser("bench", help=text, description=text)
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of --config")
    p.add_argument("--config", help="YAML config whose model, prompt, engine and run settings are benchmarked")
    p.add_argument("--model", help="model directory (instead of, or overriding, the config's)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    p.add_argument("--engine", choices=engines, help="default: the config's, else vllm")
    p.add_argument("--dummy-weights", action="store_true",
                   help="random weights from the model's config.json (vLLM load_format=dummy)")
    p.add_argument("--docs", type=int, default=1024, help="documents in the synthetic corpus (default 1024)")
    p.add_argument("--input-len", default="2000-4000", help="prompt tokens, MIN-MAX, uniform (default 2000-4000)")
    p.add_argument("--output-len", type=int, default=200, help="output tokens per document (default 200)")
    p.add_argument("--max-model-len", type=int, help="default: MAX + output rounded up to 1024, within the model's")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="engine argument (vllm.LLM or from_pretrained), value parsed as YAML; repeatable")
    p.add_argument("--workers", type=int, help="pipeline workers (default: one per GPU replica, else 1)")
    p.add_argument("--out", default="bench-out", help="output directory (default bench-out)")
    p.add_argument("--text-source", help="corpus file (Parquet, JSONL, CSV) with a 'text' column (default: the bundled documentation)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic corpus")
    p.add_argument("--skip-raw", action="store_true", help="measure the pipeline only")
    p.add_argument("--skip-pipeline", action="store_true", help="measure the baseline only (engine-setting sweeps)")
    p.add_argument("--prompt-kind", choices=["text", "random"], default="text",
                   help="text: real text through the chat template (default); random: random token ids "
                        "(raw engine only, with --skip-pipeline)")
    p.add_argument("--strategies", action="store_true",
                   help="also compare one-at-a-time, static batches and continuous batching (vLLM)")
    p.add_argument("--static-batch", type=int, default=16, help="rows per static batch (default 16)")
    p.add_argument("--strategy-docs", type=int, default=64,
                   help="documents for the strategy comparison (default 64: one at a time is slow)")
    p.add_argument("--replot", action="store_true",
                   help="only redraw the plots and bench.md of --out from its bench.json")
    s = p.add_argument_group("scale simulation (--simulate): real ledger, parts and reduce; the GPU only sleeps")
    s.add_argument("--simulate", action="store_true", help="run the scale simulation instead of a benchmark")
    s.add_argument("--sim-workers", type=int, default=200, help="worker processes (default 200)")
    s.add_argument("--sim-units", type=int, default=4000, help="work units (default 4000)")
    s.add_argument("--sim-rows", type=int, default=100_000, help="rows of the synthetic corpus (default 100000)")
    s.add_argument("--sim-tokens-per-s", type=float, default=4000.0, help="tokens/s of one simulated worker")
    s.add_argument("--fs-latency-ms", type=float, default=0.0,
                   help="added to every metadata operation, as on a busy Lustre (e.g. 5)")
    s.add_argument("--sim-lease-timeout-s", type=float, default=30.0, help="run.lease_timeout_s of the simulated run")
    s.add_argument("--sim-kill", type=int, default=0, help="workers to kill with SIGKILL mid-run")
    p.set_defaults(fn=_cmd_bench)


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    if args.lora and args.kind != CAUSAL:
        print(f"shardinfer: --lora needs --kind {CAUSAL} (the adapter is for the causal model)", file=sys.stderr)
        return 2
    if args.corpus:
        model = build_tiny_model(args.out_dir, corpus_path=args.corpus, kind=args.kind)
    else:
        with bundled_corpus() as corpus:
            model = build_tiny_model(args.out_dir, corpus_path=corpus, kind=args.kind)
    print(model)
    if args.lora:
        print(build_tiny_lora(model, args.lora))
    return 0


def _cmd_config_reference(args: argparse.Namespace) -> int:
    print("| key | default | meaning |\n|---|---|---|")
    for key, default, text in field_help(notes=reference_notes()):
        cell = text.replace("|", r"\|")
        print(f"| `{key}` | `{default}` | {cell} |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    here, cluster = launcher_choices(on_cluster=False), launcher_choices(on_cluster=True)
    parser = argparse.ArgumentParser(prog="shardinfer", description=__doc__)
    parser.add_argument("--version", action="version", version=f"shardinfer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = _config_command(sub, "plan", _cmd_plan, "show the resolved config and the work units; loads no model")
    p.add_argument("--launcher", choices=[*here, *cluster], type=launcher_type(), default="local",
                   help="cut the plan for this launcher's workers (default local)")
    p = _config_command(sub, "run", _cmd_run, "run the job here (local worker processes or mpirun), then reduce")
    p.add_argument("--launcher", choices=here, type=launcher_type(on_cluster=False), default="local",
                   help="local: worker processes; mpirun: one mpirun of run.workers ranks that plans, infers and "
                        "reduces")
    _verbose_option(p)
    p = _config_command(sub, "submit", _cmd_submit,
                        "plan the run and submit it to SLURM: worker job(s) + a dependent reduce job")
    p.add_argument("--launcher", choices=cluster, type=launcher_type(on_cluster=True), default="sbatch",
                   help="sbatch scripts, submitit, or slurm-mpi: one job whose MPI ranks plan, infer and reduce "
                        "(slurm.mpi_start: srun or mpirun)")
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted; plan and submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the reduce job and print the outcome")
    _verbose_option(p)
    p = sub.add_parser("status", help="units done / running / pending, rows, tokens, speed, ETA, SLURM jobs, "
                                      "workers (recent tok/s, last seen, stalled)")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="print the status as one JSON object")
    p.add_argument("--watch", type=float, nargs="?", const=5.0, metavar="SECONDS",
                   help="refresh every SECONDS (default 5) until the run is finished")
    p.set_defaults(fn=_cmd_status)
    p = sub.add_parser("resume", help="run only what is not done in RUN_DIR, with its config and launcher")
    p.add_argument("run_dir")
    p.add_argument("--retry-failed", action="store_true", help="also redo the rows whose status is failed")
    p.add_argument("--launcher", choices=launcher_choices(), type=launcher_type(),
                   help="default: the run's last launcher (local when it was never launched)")
    _verbose_option(p)
    p.set_defaults(fn=_cmd_resume)
    p = sub.add_parser("reduce", help="merge committed parts into results/ and write the report")
    p.add_argument("run_dir")
    p.set_defaults(fn=_cmd_reduce)
    _add_bench_parser(sub, engine_names())
    p = sub.add_parser("tiny-model", help="build the tiny local test model (no download)")
    p.add_argument("out_dir")
    p.add_argument("--corpus", help="JSONL(.gz) whose texts train the tokenizer (default: the bundled documentation)")
    p.add_argument("--kind", choices=KINDS, default=CAUSAL,
                   help="causal (default): a language model; classifier: 3 labels (negative/neutral/positive); "
                        "embed: last-token pooled, normalised embeddings; cross-encoder: one relevance logit "
                        "(sigmoid) for a (query, document) pair; reward: one raw reward logit for a chat")
    p.add_argument("--lora", metavar="DIR", help="also write a random LoRA adapter for it into DIR (model.lora)")
    p.set_defaults(fn=_cmd_tiny_model)
    p = sub.add_parser("config-reference", help="print every config key with its default and meaning")
    p.set_defaults(fn=_cmd_config_reference)
    return parser


def _verbose_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="the workers' own output (engine start-up, library warnings) on the console as it comes, "
                        "instead of in logs/worker-N.log under a live display or progress lines")


def _config_command(sub: Any, name: str, fn: Any, text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=text, description=text)
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. run.workers=2")
    p.set_defaults(fn=fn)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, docker, systemd): handled like Ctrl-C, the workers drain."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    restrict_umask()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        args = _parse(list(sys.argv[1:] if argv is None else argv))
        return int(args.fn(args))
    except ConfigError as exc:
        print(f"shardinfer: config error: {exc}", file=sys.stderr)
        return 2
    except ShardinferError as exc:
        print(f"shardinfer: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        print(f"shardinfer: {disk_full(getattr(exc, 'filename', None) or Path.cwd())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        stopped = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"shardinfer: {stopped}; committed units are kept: `shardinfer resume RUN_DIR` continues a run",
              file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()  # reads the registries: plugins load here
    args, extra = parser.parse_known_args(argv)
    args.command_line = argv
    # overrides may also follow options: `run CONFIG --launcher mpirun run.workers=4`
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


if __name__ == "__main__":
    sys.exit(main())
