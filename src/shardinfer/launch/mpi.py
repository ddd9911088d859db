"""MPI launch mode (mpirun, or srun --mpi=pmix): one allocation plans, infers and reduces.

Two launchers start the same rank program: ``mpirun`` on this machine (``shardinfer run --launcher
mpirun``) and ``slurm-mpi``, one SLURM job whose ranks srun --mpi=pmix (or mpirun) starts
(``shardinfer submit --launcher slurm-mpi``); ``mpi``, their earlier name, still works for both.
Every rank is a worker started by :func:`shardinfer.worker.entry.start_worker`, with its rank from
``COMM_WORLD`` (:data:`shardinfer.launch.env.FROM_MPI`), on the same run directory and ledger as the
other launchers. When the ranks are started by a launcher, the launch was begun before them
(``--launch N``); when a user starts them by hand on a config or a run directory, rank 0 plans the
run (or reopens it) and begins the launch while the others wait. At the end the metrics are
gathered and rank 0 reduces in-process. A rank that fails aborts the whole communicator, with its
error in the log, so no rank is left waiting; `resume` works afterwards.

    mpirun -n 4 python -m shardinfer.launch.mpi CONFIG [overrides]
    srun --mpi=pmix python -m shardinfer.launch.mpi RUN_DIR --launch N --launcher slurm-mpi
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
from shardinfer.errors import ConfigError, RunError, ShardinferError, missing_dependency
from shardinfer.launch.base import Launcher, LaunchRecord, RunHandle
from shardinfer.launch.env import FROM_MPI, MpiRanks, RankEnv
from shardinfer.launch.local import replica_gpu_groups
from shardinfer.launch.lock import launch_lock
from shardinfer.launch.registry import get_launcher
from shardinfer.launch.running import ended_here, pid_alive, started_here
from shardinfer.launch.start import open_launch, record_launch
from shardinfer.ledger.rundir import RunDir, read_json
from shardinfer.ledger.runstate import load_run, run_dir_for
from shardinfer.planning.plan import Plan
from shardinfer.planning.validate import load_checked
from shardinfer.reduce.merge import reduce_run
from shardinfer.results import summary_line
from shardinfer.telemetry.metrics import WorkerMetrics
from shardinfer.worker.entry import WorkerHooks, WorkerStart, start_worker

log = logging.getLogger("shardinfer.mpi")

ENTRY = "shardinfer.launch.mpi"


class MpirunLauncher(Launcher):
    """``mpirun`` on this machine: one rank per model replica on the visible GPUs."""

    name = "mpirun"
    former_names = ("mpi",)  # `shardinfer run --launcher mpi`
    description = "mpirun on this machine: ranks share the ledger, rank 0 reduces in-process"
    on_cluster = False
    ranks = FROM_MPI

    def workers(self, cfg: Config) -> int:
        return len(replica_gpu_groups(cfg))

    def check(self, cfg: Config) -> None:
        if shutil.which("mpirun") is None:
            raise RunError("mpirun not found: install an MPI (e.g. apt-get install openmpi-bin) and "
                           f"pip install 'shardinfer[mpi]', or run without --launcher {self.name}")
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
                *rank_arguments(str(run_dir.path), launch, len(groups[0]), self.name)]


def rank_arguments(run_dir: str, launch: int, gpus_per_replica: int, launcher: str) -> list[str]:
    """The arguments of the rank program for the ranks of a launch begun by ``launcher``."""
    return [run_dir, "--launch", str(launch), "--gpus-per-replica", str(gpus_per_replica), "--launcher", launcher]


class MpirunHandle(RunHandle):
    def __init__(self, run_dir: RunDir, record: LaunchRecord, proc: subprocess.Popen):
        super().__init__(run_dir, record)
        self.proc = proc
        started_here(record)

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
        ended_here(self.record)
        if code != 0 or not self.run_dir.report_json.is_file():
            raise RunError(f"mpirun exited with code {code} before the run was reduced; the ranks' logs are in "
                           f"{self.run_dir.logs}. `shardinfer resume {self.run_dir.path}` finishes the run.")
        return dict(read_json(self.run_dir.report_json))


class RankHooks(WorkerHooks):
    """What the MPI rank program adds to a worker: rank 0 plans or reopens the run when no launcher
    began the launch, the ranks' metrics are gathered and rank 0 reduces, and a rank that fails
    aborts them all (the others would wait for it forever)."""

    def __init__(self, target: str, overrides: list[str], launch: int | None):
        from mpi4py import MPI

        self.comm = MPI.COMM_WORLD
        self.target, self.overrides, self.launch = target, overrides, launch
        self.nobody_waits = False  # every rank failed alike, or all are past the gather: nothing to abort

    def open(self, start: WorkerStart, rank_env: RankEnv) -> tuple[RunDir, int]:
        prepared = _prepare(self.target, self.overrides, self.comm.Get_size(), self.launch,
                            rank_env.launcher) if self.comm.Get_rank() == 0 else None
        status, value, launch = self.comm.bcast(prepared, root=0)
        if status == "ok":
            return RunDir(value), launch
        self.nobody_waits = True
        error = ConfigError if status == "config" else RunError
        raise error(value if self.comm.Get_rank() == 0 else "rank 0 could not plan or open the run (see its error)")

    def finished(self, run_dir: RunDir, rank_env: RankEnv, metrics: WorkerMetrics) -> int:
        gathered = self.comm.gather(metrics.to_json(), root=0)
        self.nobody_waits = True
        if self.comm.Get_rank() != 0:
            return 0
        return _reduce(run_dir, gathered or [])

    def failed(self, rank_env: RankEnv | None, code: int) -> None:
        if self.nobody_waits:
            return
        log.error("rank %d failed; aborting all %d ranks", self.comm.Get_rank(), self.comm.Get_size())
        logging.shutdown()
        sys.stderr.flush()
        self.comm.Abort(code)


def _prepare(target: str, overrides: list[str], world: int, launch: int | None,
             launcher: str) -> tuple[str, str, int]:
    """Rank 0: plan or reopen the run and begin the launch when no launcher did; returns
    ("ok", run dir, launch), or ("config" or "error", message, 0)."""
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
            record_launch(run_dir, LaunchRecord(launch=launch, launcher=launcher, pid=os.getppid()))
        return "ok", str(run_dir.path), launch
    except ConfigError as exc:
        return "config", str(exc), 0
    except ShardinferError as exc:
        return "error", str(exc), 0


def _reduce(run_dir: RunDir, gathered: list[dict[str, Any]]) -> int:
    if any(m.get("drained") for m in gathered):
        log.warning("ranks were drained by a signal: not reducing; the requeued job or `resume` goes on")
        return 0
    log.info("all %d ranks done (%d rows); reducing", len(gathered), sum(m["rows"] for m in gathered))
    report = reduce_run(run_dir)  # its errors are the worker's: logged, exit code 1
    log.info("%s", summary_line(report["rows"]))
    log.info("results: %s; report: %s", report["results"], run_dir.path.resolve() / "report.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {ENTRY}")
    parser.add_argument("target", help="config file (new or continued run) or run directory")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--launch", type=int, help="launch number begun by the launcher")
    parser.add_argument("--gpus-per-replica", type=int, default=0)
    parser.add_argument("--launcher", default=MpirunLauncher.name,
                        help=f"the launcher that started the ranks (default {MpirunLauncher.name}; "
                             f"the SLURM MPI job: slurm-mpi)")
    args = parser.parse_args(argv)
    if not isinstance(get_launcher(args.launcher).ranks, MpiRanks):
        parser.error(f"--launcher {args.launcher}: not a launcher of MPI ranks")
    try:
        hooks = RankHooks(args.target, args.overrides, args.launch)
    except ImportError as exc:
        raise missing_dependency("mpi4py", "mpi") from exc
    return start_worker(WorkerStart(run_dir=args.target, launcher=args.launcher, launch=args.launch or 0,
                                    gpus_per_replica=args.gpus_per_replica), hooks)


LAUNCHERS = [MpirunLauncher()]

if __name__ == "__main__":
    sys.exit(main())
