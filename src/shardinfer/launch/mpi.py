"""MPI launch mode (mpirun, or srun --mpi=pmix): one allocation plans, infers and reduces.

Every rank runs the same worker on the same run directory and claims units through the same ledger
as the other launchers. When the ranks are started by a launcher (``shardinfer run --launcher mpi``,
``shardinfer submit --launcher mpi``), the launch was begun before them (``--launch N``); when a user
starts them by hand on a config or a run directory, rank 0 plans the run (or reopens it) and begins
the launch while the others wait. At the end the metrics are gathered and rank 0 reduces in-process.
A rank that fails aborts the whole communicator, with its error in the log, so no rank is left
waiting; `resume` works afterwards.

    mpirun -n 4 python -m shardinfer.launch.mpi CONFIG [overrides]
    srun --mpi=pmix python -m shardinfer.launch.mpi RUN_DIR --launch N
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from shardinfer.config import Config
from shardinfer.engines.registry import get_engine
from shardinfer.errors import EXIT_CONFIG, ConfigError, RunError, ShardinferError, missing_dependency
from shardinfer.launch.base import Launcher, LaunchRecord, RunHandle
from shardinfer.launch.env import from_mpi
from shardinfer.launch.local import _RUNNING_HERE, pid_alive, replica_gpu_groups
from shardinfer.launch.lock import launch_lock
from shardinfer.launch.start import open_launch, record_launch
from shardinfer.ledger.rundir import RunDir, read_json, restrict_umask
from shardinfer.ledger.runstate import load_run, run_dir_for
from shardinfer.planning.plan import Plan
from shardinfer.planning.validate import load_checked
from shardinfer.reduce.merge import reduce_run
from shardinfer.results import summary_line
from shardinfer.telemetry.logs import setup_logging
from shardinfer.worker.loop import run_worker

log = logging.getLogger("shardinfer.mpi")

ENTRY = "shardinfer.launch.mpi"


class MpirunLauncher(Launcher):
    """``mpirun`` on this machine: one rank per model replica on the visible GPUs."""

    name = "mpirun"
    aliases = ("mpi",)  # `shardinfer run --launcher mpi`
    description = "mpirun on this machine: ranks share the ledger, rank 0 reduces in-process"
    on_cluster = False

    def workers(self, cfg: Config) -> int:
        return len(replica_gpu_groups(cfg))

    def check(self, cfg: Config) -> None:
        if shutil.which("mpirun") is None:
            raise RunError("mpirun not found: install an MPI (e.g. apt-get install openmpi-bin) and "
                           "pip install 'shardinfer[mpi]', or run without --launcher mpi")
        if importlib.util.find_spec("mpi4py") is None:
            raise missing_dependency("mpi4py", "mpi")
        get_engine(cfg.model.engine).check_installed()

    def preview(self, cfg: Config, run_dir: RunDir) -> str:
        return "# one mpirun; rank 0 reduces at the end\n" + shlex.join(self._command(cfg, run_dir, 0))

    def start(self, cfg: Config, run_dir: RunDir, plan: Plan, launch: int) -> RunHandle:
        cmd = self._command(cfg, run_dir, launch)
        log.info("starting %s", shlex.join(cmd))
        proc = subprocess.Popen(cmd, env={**os.environ, **cfg.run.env, "PYTHONUNBUFFERED": "1"})
        return MpirunHandle(run_dir, LaunchRecord(launch=launch, launcher=self.name), proc)

    def active(self, record: LaunchRecord) -> bool:
        return pid_alive(record)

    def _command(self, cfg: Config, run_dir: RunDir, launch: int) -> list[str]:
        groups = replica_gpu_groups(cfg)
        root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
        return ["mpirun", "-n", str(len(groups)), "--oversubscribe", *root, sys.executable, "-m", ENTRY,
                str(run_dir.path), "--launch", str(launch), "--gpus-per-replica", str(len(groups[0]))]


class MpirunHandle(RunHandle):
    def __init__(self, run_dir: RunDir, record: LaunchRecord, proc: subprocess.Popen):
        super().__init__(run_dir, record)
        self.proc = proc

        _RUNNING_HERE.add(record.submitted_at)

    def states(self) -> dict[str, str]:
        code = self.proc.poll()
        return {"mpirun": "RUNNING" if code is None else ("COMPLETED" if code == 0 else f"FAILED (code {code})")}

    def done(self) -> bool:
        return self.proc.poll() is not None

    def result(self, timeout_s: float | None = None) -> dict[str, Any]:
        try:
            code = self.proc.wait(timeout=timeout_s)
        except KeyboardInterrupt:
            self.proc.terminate()
            self.proc.wait()
            raise
        _RUNNING_HERE.discard(self.record.submitted_at)
        if code != 0 or not self.run_dir.report_json.is_file():
            raise RunError(f"mpirun exited with code {code} before the run was reduced; the ranks' logs are in "
                           f"{self.run_dir.logs}. `shardinfer resume {self.run_dir.path}` finishes the run.")
        return dict(read_json(self.run_dir.report_json))


def _prepare(target: str, overrides: list[str], world: int, launch: int | None) -> tuple[str, str, int]:
    """Rank 0: plan or reopen the run and begin the launch when no launcher did; returns
    ("ok", run dir, launch) or ("error", message, 0)."""
    try:
        if launch is not None:
            return "ok", target, launch
        if (Path(target) / "run.json").is_file():
            cfg, _ = load_run(RunDir(target))
            cfg.run.directory = target
        else:
            cfg = load_checked(target, overrides)
        with launch_lock(run_dir_for(cfg)):
            run_dir, _, launch = open_launch(cfg, world)
            # The launch lasts as long as the process that started the ranks (mpirun, or srun's step).
            record_launch(run_dir, LaunchRecord(launch=launch, launcher=MpirunLauncher.name, pid=os.getppid()))
        return "ok", str(run_dir.path), launch
    except ShardinferError as exc:
        return "error", str(exc), 0


def _work(run_dir: str, launch: int, rank_env: Any, gpus_per_replica: int) -> dict[str, Any]:
    return run_worker(RunDir(run_dir), rank_env, launch=launch, gpus_per_replica=gpus_per_replica).to_json()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {ENTRY}")
    parser.add_argument("target", help="config file (new or continued run) or run directory")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--launch", type=int, help="launch number begun by the launcher")
    parser.add_argument("--gpus-per-replica", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise missing_dependency("mpi4py", "mpi") from exc

    restrict_umask()
    comm = MPI.COMM_WORLD
    rank_env = from_mpi(comm)
    setup_logging(rank=rank_env.rank, world=rank_env.world)
    status, value, launch = comm.bcast(
        _prepare(args.target, args.overrides, comm.Get_size(), args.launch) if comm.Get_rank() == 0 else None, root=0)
    if status == "error":
        if comm.Get_rank() == 0:
            print(f"shardinfer: {value}", file=sys.stderr)
        return 2
    setup_logging(rank=rank_env.rank, world=rank_env.world, log_file=RunDir(value).worker_log(rank_env.rank))
    try:
        metrics = _work(value, launch, rank_env, args.gpus_per_replica)
    except BaseException as exc:
        log.exception("rank %d failed; aborting all %d ranks", rank_env.rank, rank_env.world)
        sys.stderr.flush()
        comm.Abort(EXIT_CONFIG if isinstance(exc, ConfigError) else 1)
    gathered = comm.gather(metrics, root=0)
    if comm.Get_rank() != 0:
        return 0
    return _reduce(value, gathered or [])


def _reduce(run_dir: str, gathered: list[dict[str, Any]]) -> int:
    if any(m.get("drained") for m in gathered):
        log.warning("ranks were drained by a signal: not reducing; the requeued job or `resume` goes on")
        return 0
    log.info("all %d ranks done (%d rows); reducing", len(gathered), sum(m["rows"] for m in gathered))
    try:
        report = reduce_run(RunDir(run_dir))
    except ShardinferError as exc:
        print(f"shardinfer: {exc}", file=sys.stderr)
        return 1
    log.info("%s", summary_line(report["rows"]))
    log.info("results: %s; report: %s", report["results"], Path(run_dir).resolve() / "report.md")
    return 0


LAUNCHERS = [MpirunLauncher()]

if __name__ == "__main__":
    sys.exit(main())
