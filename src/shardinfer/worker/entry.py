"""How every worker process starts, whichever launcher started it: :func:`start_worker`.

    python -m shardinfer.worker RUN_DIR --launcher NAME [--rank R --world W] [--launch N]
                                [--expect-world W] [--gpus-per-replica G]

The local launcher and the sbatch scripts start this command; submitit calls :func:`start_worker`
in its task, and the MPI rank program (:mod:`shardinfer.launch.mpi`) with hooks that plan the run
on rank 0, gather the ranks' metrics and abort the other ranks when one fails. In that order:

1. a local worker stops when its launcher dies (:func:`~shardinfer.launch.lock.die_with_parent`);
2. no file it writes is group- or world-writable (:func:`~shardinfer.ledger.rundir.restrict_umask`);
3. the launcher named by ``--launcher`` (or SHARDINFER_LAUNCHER) says how this worker finds its
   rank, world size, local rank, node and GPUs (:mod:`shardinfer.launch.env`);
4. logging goes to the console and to ``logs/worker-RANK.log``;
5. the allocation is checked (worker count, this replica's GPUs pinned);
6. the worker runs until no unit is left, or a signal drains it;
7. the exit code: 0, 2 on a ConfigError, 1 on any other error shardinfer explains (no traceback),
   a full disk or an interrupt; anything else is logged with its traceback and raised.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from shardinfer.errors import (
    EXIT_CONFIG,
    EXIT_FAILED,
    ConfigError,
    RunError,
    ShardinferError,
    disk_full,
    is_disk_full,
)
from shardinfer.launch.env import RankEnv, check_allocation
from shardinfer.launch.lock import die_with_parent
from shardinfer.launch.registry import worker_launcher
from shardinfer.launch.replica import lead_own_group, start_reaper
from shardinfer.ledger.rundir import RunDir, restrict_umask
from shardinfer.telemetry.logs import setup_logging
from shardinfer.telemetry.metrics import WorkerMetrics
from shardinfer.worker.follower import log_path as follower_log_path
from shardinfer.worker.follower import run_follower
from shardinfer.worker.leader import run_leader
from shardinfer.worker.loop import run_worker

log = logging.getLogger("shardinfer.worker")


@dataclass(frozen=True)
class WorkerStart:
    """What a launcher tells a worker process (the arguments of ``python -m shardinfer.worker``)."""

    run_dir: str  # the run directory (MPI ranks started by hand: a config, opened by the hooks)
    launcher: str | None = None  # the launcher that started it; see registry.worker_launcher
    launch: int = 0
    rank: int | None = None  # launchers whose ranks come from arguments (local)
    world: int | None = None
    expect_world: int | None = None  # fail unless the job has this many workers
    gpus_per_replica: int = 0  # pin this worker to its local rank's slice of the node's GPUs
    nodes_per_replica: int = 1  # a replica spans this many tasks, one per node (the first leads)


class WorkerHooks:
    """What a launcher adds around the worker; these defaults add nothing."""

    def open(self, start: WorkerStart, rank_env: RankEnv) -> tuple[RunDir, int]:
        """The run directory and launch number this worker works on."""
        run_dir = RunDir(start.run_dir)
        if not run_dir.run_json.is_file():
            raise RunError(f"{run_dir.path} is not a run directory (no run.json): workers work on a run that "
                           f"`shardinfer run`, `submit` or `resume` planned")
        return run_dir, start.launch

    def finished(self, run_dir: RunDir, rank_env: RankEnv, metrics: WorkerMetrics) -> int:
        """After the worker ran out of units or was drained; returns the exit code."""
        return 0

    def failed(self, rank_env: RankEnv | None, code: int) -> None:
        """After the worker failed and its error was logged (``rank_env`` None: before it knew its rank)."""


def start_worker(start: WorkerStart, hooks: WorkerHooks | None = None) -> int:
    """Start up, find this worker's rank through its launcher, run it; returns the exit code."""
    hooks = hooks or WorkerHooks()
    die_with_parent()  # a no-op unless the launcher asked for it (the local launcher does)
    restrict_umask()
    setup_logging()
    rank_env: RankEnv | None = None
    run_dir: RunDir | None = None
    try:
        launcher = worker_launcher(start.launcher, ranked=start.rank is not None)
        rank_env = launcher.ranks.find(os.environ, launcher=launcher.name, rank=start.rank, world=start.world,
                                       nodes_per_replica=start.nodes_per_replica)
        if rank_env.replica_nodes > 1 and lead_own_group():  # no engine process outlives this one
            start_reaper()
        setup_logging(rank=rank_env.rank, world=rank_env.world)
        run_dir, launch = hooks.open(start, rank_env)
        if rank_env.replica_node > 0:
            setup_logging(rank=rank_env.rank, world=rank_env.world, log_file=follower_log_path(run_dir, rank_env))
            check_allocation(launcher.ranks, rank_env, start.expect_world, start.gpus_per_replica)
            return run_follower(run_dir, rank_env)
        setup_logging(rank=rank_env.rank, world=rank_env.world, log_file=run_dir.worker_log(rank_env.rank))
        check_allocation(launcher.ranks, rank_env, start.expect_world, start.gpus_per_replica)
        if rank_env.replica_nodes > 1:
            metrics = run_leader(run_dir, rank_env, launch=launch)
        else:
            metrics = run_worker(run_dir, rank_env, launch=launch)
        return hooks.finished(run_dir, rank_env, metrics)
    except (Exception, KeyboardInterrupt) as exc:
        code = exit_code(exc, run_dir.path if run_dir is not None else Path(start.run_dir))
        hooks.failed(rank_env, EXIT_FAILED if code is None else code)
        if code is None:
            raise
        return code


def exit_code(exc: BaseException, where: Path) -> int | None:
    """Log a worker's failure; its exit code, or None for an error shardinfer does not explain
    (logged with its traceback, to be raised)."""
    if isinstance(exc, ConfigError):
        log.error("config error: %s", exc)
        return EXIT_CONFIG
    if isinstance(exc, ShardinferError):
        log.error("%s", exc)
        return EXIT_FAILED
    if isinstance(exc, KeyboardInterrupt):  # before the signal handlers were set (model load)
        log.warning("interrupted")
        return EXIT_FAILED
    if is_disk_full(exc):
        log.error("%s", disk_full(getattr(exc, "filename", None) or where))
        return EXIT_FAILED
    log.error("worker failed", exc_info=exc)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shardinfer.worker")
    parser.add_argument("run_dir")
    parser.add_argument("--launcher", help="the launcher that started this worker: how it finds its rank "
                                           "(default: $SHARDINFER_LAUNCHER)")
    parser.add_argument("--rank", type=int, help="this worker's rank (launchers that give it: local)")
    parser.add_argument("--world", type=int, help="number of workers (launchers that give it: local)")
    parser.add_argument("--launch", type=int, default=0)
    parser.add_argument("--expect-world", type=int, help="fail unless the job has this many workers")
    parser.add_argument("--gpus-per-replica", type=int, default=0,
                        help="pin this worker to its local rank's slice of the node's GPUs")
    parser.add_argument("--nodes-per-replica", type=int, default=1,
                        help="a replica spans this many tasks, one per node: the first runs the worker, the "
                             "others the engine's followers")
    args = parser.parse_args(argv)
    return start_worker(WorkerStart(run_dir=args.run_dir, launcher=args.launcher, launch=args.launch,
                                    rank=args.rank, world=args.world, expect_world=args.expect_world,
                                    gpus_per_replica=args.gpus_per_replica,
                                    nodes_per_replica=args.nodes_per_replica))
