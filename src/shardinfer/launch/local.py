"""Local launcher: N worker processes on this machine, then the reduce step."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from shardinfer.config import Config
from shardinfer.engines import check_installed
from shardinfer.errors import ConfigError, RunError
from shardinfer.gpus import gpu_groups, visible_gpus
from shardinfer.ledger import Ledger
from shardinfer.model_info import check_model_path
from shardinfer.plan import default_workers
from shardinfer.reduce import reduce_run
from shardinfer.rundir import RunDir
from shardinfer.runstate import next_launch, prepare_run

log = logging.getLogger(__name__)


def run_local(cfg: Config) -> tuple[RunDir, dict[str, Any]]:
    """Plan (or reopen) the run, run the workers until no unit is left, reduce, return the report."""
    check_model_path(cfg.model)
    check_installed(cfg.model.engine)
    workers = default_workers(cfg)
    groups = _gpu_groups(workers)
    run_dir, plan = prepare_run(cfg, workers)
    return run_dir, execute_local(cfg, run_dir, plan, groups)


def execute_local(cfg: Config, run_dir: RunDir, plan: Any, groups: list[list[str]] | None = None) -> dict[str, Any]:
    """Run local workers on the units not done yet, then reduce; returns the report."""
    if groups is None:
        check_installed(cfg.model.engine)
        groups = _gpu_groups(default_workers(cfg))
    workers = len(groups)
    ledger = Ledger(run_dir)
    ledger.verify_committed({u.unit: u.rows for u in plan.units})
    released = ledger.release_unfinished_claims()
    if released:
        log.info("units %s were claimed by workers that did not finish them; they will be redone", released)
    todo = [u for u in plan.units if not ledger.is_done(u.unit)]
    failures: dict[int, int] = {}
    if todo:
        launch = next_launch(run_dir)
        n = min(workers, len(todo))
        log.info("%d units to do (%d rows in the run); starting %d worker(s)", len(todo), plan.total_rows, n)
        failures = _run_workers(run_dir, cfg, groups[:n], launch)
    if failures:
        log.warning("some workers died%s; the others finished their units", _failure_text(run_dir, failures))
    try:
        return reduce_run(run_dir)
    except RunError as exc:
        raise RunError(f"{exc}{_failure_text(run_dir, failures)}") from exc


def _gpu_groups(workers: int) -> list[list[str]]:
    try:
        return gpu_groups(visible_gpus(), workers)
    except ValueError as exc:
        raise ConfigError(f"run.workers: {exc}. Lower run.workers or make more GPUs visible.") from exc


def _run_workers(run_dir: RunDir, cfg: Config, groups: list[list[str]], launch: int) -> dict[int, int]:
    """Start one process per rank and wait for all; returns {rank: exit code} of those that failed."""
    world = len(groups)
    procs = [_spawn(run_dir, cfg, rank, world, gpus, launch) for rank, gpus in enumerate(groups)]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait()
        raise
    return {rank: code for rank, code in enumerate(codes) if code != 0}


def _spawn(run_dir: RunDir, cfg: Config, rank: int, world: int, gpus: list[str], launch: int) -> subprocess.Popen:
    env = {**os.environ, **cfg.run.env, "PYTHONUNBUFFERED": "1"}
    if rank > 0:  # one rank shows the engine's start-up details; the others only its warnings
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    cmd = [sys.executable, "-m", "shardinfer.worker", str(run_dir.path), "--rank", str(rank),
           "--world", str(world), "--launch", str(launch)]
    log.debug("starting worker %d: %s", rank, " ".join(cmd))
    return subprocess.Popen(cmd, env=env)


def _failure_text(run_dir: RunDir, failures: dict[int, int]) -> str:
    if not failures:
        return ""
    parts = [f"rank {rank} exited with {_exit_text(code)}{_last_error(run_dir.worker_log(rank))} "
             f"(log: {run_dir.worker_log(rank)})" for rank, code in sorted(failures.items())]
    return " Workers that failed: " + "; ".join(parts) + "."


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def _last_error(log_file: Path) -> str:
    """The first line of the last ERROR record in a worker's log, if any."""
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line for line in lines if " ERROR " in line]
    if not errors:
        return ""
    message = errors[-1].split(": ", 1)[-1]
    following = lines[lines.index(errors[-1]) + 1:]
    detail = next((l for l in reversed(following) if l and not l.startswith(" ")), "")
    return f": {message}" + (f" ({detail})" if detail and detail != errors[-1] else "")
