"""The ``shardinfer`` command line: a thin layer over the modules."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from shardinfer import __version__
from shardinfer.errors import ConfigError, ShardinferError

log = logging.getLogger("shardinfer")


def _cmd_plan(args: argparse.Namespace) -> int:
    from shardinfer.config import dump_config, load_config
    from shardinfer.plan import default_workers, describe, make_plan

    cfg = load_config(args.config, args.overrides)
    workers = default_workers(cfg)
    print("# resolved config")
    print(dump_config(cfg))
    print(f"# plan for {workers} worker(s)")
    print(describe(make_plan(cfg, workers), cfg))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from shardinfer.config import load_config
    from shardinfer.launch.local import run_local

    cfg = load_config(args.config, args.overrides)
    if args.launcher == "mpi":
        return _run_mpi(args, cfg)
    run_dir, report = run_local(cfg)
    _print_report(run_dir, report)
    return 0


def _run_mpi(args: argparse.Namespace, cfg) -> int:  # type: ignore[no-untyped-def]
    import os
    import subprocess

    from shardinfer.launch.mpi import mpirun_command
    from shardinfer.plan import default_workers

    cmd = mpirun_command(args.config, args.overrides, default_workers(cfg))
    log.info("starting %s", " ".join(cmd))
    return subprocess.call(cmd, env={**os.environ, **cfg.run.env})


def _print_report(run_dir, report) -> None:  # type: ignore[no-untyped-def]
    rows, rate = report["rows"], report["tokens_per_s"]
    print(f"\nrows: {rows['in']} in, {rows['ok']} ok, {rows['truncated']} truncated, {rows['failed']} failed")
    print(f"throughput: {rate['total']:.0f} tokens/s ({rate['input']:.0f} in, {rate['output']:.0f} out) "
          f"over {report['time_s']['wall']:.1f} s")
    print(f"results: {run_dir.results.resolve()}")
    print(f"report:  {run_dir.report_md.resolve()} (and report.json)")


def _cmd_submit(args: argparse.Namespace) -> int:
    from shardinfer.config import load_config
    from shardinfer.launch.submit import dry_run, submit

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(dry_run(cfg, args.launcher))
        return 0
    submitted = submit(cfg, launcher=args.launcher)
    print(f"run:        {submitted.run_dir.path.resolve()}")
    print(f"worker job: {submitted.worker_job}")
    print(f"reduce job: {submitted.reduce_job} (after the worker job)")
    print(f"follow it:  shardinfer status {submitted.run_dir.path}")
    if args.wait:
        report = submitted.result()
        print(f"rows: {report['rows']}\nresults: {report['results']}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from shardinfer.rundir import RunDir
    from shardinfer.status import describe_status, run_status

    print(describe_status(run_status(RunDir(args.run_dir))))
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from shardinfer.resume import resume
    from shardinfer.rundir import RunDir

    run_dir = RunDir(args.run_dir)
    outcome = resume(run_dir, retry_failed=args.retry_failed, launcher=args.launcher)
    if isinstance(outcome, dict):
        _print_report(run_dir, outcome)
    else:
        print(f"worker job: {outcome.worker_job}\nreduce job: {outcome.reduce_job} (after the worker job)")
    return 0


def _cmd_reduce(args: argparse.Namespace) -> int:
    from shardinfer.reduce import reduce_run
    from shardinfer.rundir import RunDir

    run_dir = RunDir(args.run_dir)
    report = reduce_run(run_dir)
    print(f"{report['rows']}\nresults: {run_dir.results.resolve()}\nreport:  {run_dir.report_md.resolve()}")
    return 0


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from shardinfer.tiny_model import build_tiny_model

    print(build_tiny_model(args.out_dir, corpus_path=args.corpus))
    return 0


def _cmd_config_reference(args: argparse.Namespace) -> int:
    from shardinfer.config import field_help

    print("| key | default | meaning |\n|---|---|---|")
    for key, default, text in field_help():
        cell = text.replace("|", r"\|")
        print(f"| `{key}` | `{default}` | {cell} |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardinfer", description=__doc__)
    parser.add_argument("--version", action="version", version=f"shardinfer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, text in [("plan", _cmd_plan, "show the resolved config and the work units; loads no model"),
                           ("run", _cmd_run, "run the job with local worker processes, then reduce")]:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("config", help="YAML config file")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. run.workers=2")
        p.set_defaults(fn=fn)
        if name == "run":
            p.add_argument("--launcher", choices=["local", "mpi"], default="local",
                           help="mpi: one mpirun of run.workers ranks that plans, infers and reduces")
    p = sub.add_parser("submit", help="plan the run and submit it to SLURM: worker job(s) + a dependent reduce job")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. slurm.nodes=4")
    p.add_argument("--launcher", choices=["sbatch", "submitit", "mpi"], default="sbatch",
                   help="mpi: one job whose MPI ranks plan, infer and reduce (slurm.mpi_start: srun or mpirun)")
    p.add_argument("--dry-run", action="store_true", help="print the batch scripts; plan and submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the reduce job and print the outcome")
    p.set_defaults(fn=_cmd_submit)
    p = sub.add_parser("status", help="units done / running / pending, rows, tokens, speed, ETA, SLURM jobs")
    p.add_argument("run_dir")
    p.set_defaults(fn=_cmd_status)
    p = sub.add_parser("resume", help="run only what is not done in RUN_DIR, with its config and launcher")
    p.add_argument("run_dir")
    p.add_argument("--retry-failed", action="store_true", help="also redo the rows whose status is failed")
    p.add_argument("--launcher", choices=["local", "sbatch", "submitit", "mpi"],
                   help="default: the run's last launcher (local when it was never submitted)")
    p.set_defaults(fn=_cmd_resume)
    p = sub.add_parser("reduce", help="merge committed parts into results/ and write the report")
    p.add_argument("run_dir")
    p.set_defaults(fn=_cmd_reduce)
    p = sub.add_parser("tiny-model", help="build the tiny local test model (no download)")
    p.add_argument("out_dir")
    p.add_argument("--corpus", default=str(Path("jobs/data/python-docs.jsonl.gz")),
                   help="JSONL(.gz) whose texts train the tokenizer")
    p.set_defaults(fn=_cmd_tiny_model)
    p = sub.add_parser("config-reference", help="print every config key with its default and meaning")
    p.set_defaults(fn=_cmd_config_reference)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also follow options: `run CONFIG --launcher mpi run.workers=4`
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from shardinfer.logs import setup_logging

    setup_logging()
    try:
        return args.fn(args)
    except ConfigError as exc:
        print(f"shardinfer: config error: {exc}", file=sys.stderr)
        return 2
    except ShardinferError as exc:
        print(f"shardinfer: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("shardinfer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
