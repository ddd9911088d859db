"""MPI launch mode (mpirun, or srun --mpi=pmix): one allocation plans, infers and reduces.

Every rank runs the same worker on the same run directory and claims units through the same ledger
as the other launchers. Rank 0 plans the run (or reopens it) while the others wait for it; at the
end the metrics are gathered and rank 0 reduces in-process. A rank that fails aborts the whole
communicator, with its error in the log, so no rank is left waiting; `resume` works afterwards.

    mpirun -n 4 python -m shardinfer.launch.mpi CONFIG [overrides]
    srun --mpi=pmix python -m shardinfer.launch.mpi RUN_DIR --launch N
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from shardinfer.errors import ShardinferError, missing_dependency

log = logging.getLogger("shardinfer.mpi")


def _prepare(target: str, overrides: list[str], world: int, launch: int | None) -> tuple[str, str, int]:
    """Rank 0: plan or reopen the run; returns ("ok", run dir, launch) or ("error", message, 0)."""
    from shardinfer.config import load_config
    from shardinfer.ledger import Ledger
    from shardinfer.rundir import RunDir
    from shardinfer.runstate import check_fingerprint, load_run, next_launch, prepare_run

    try:
        if (Path(target) / "run.json").is_file():
            run_dir = RunDir(target)
            cfg, plan = load_run(run_dir)
            check_fingerprint(run_dir, cfg, plan)
        else:
            run_dir, plan = prepare_run(load_config(target, overrides), world)
        if launch is None:  # nobody prepared this launch yet (a submit does it on the login node)
            ledger = Ledger(run_dir)
            ledger.verify_committed({u.unit: u.rows for u in plan.units})
            ledger.release_unfinished_claims()
            launch = next_launch(run_dir)
        return "ok", str(run_dir.path), launch
    except ShardinferError as exc:
        return "error", str(exc), 0


def _work(run_dir: str, launch: int, rank_env: Any, gpus_per_replica: int) -> dict[str, Any]:
    from shardinfer.rundir import RunDir
    from shardinfer.worker import Worker, check_allocation

    check_allocation(rank_env, None, gpus_per_replica)
    worker = Worker(RunDir(run_dir), rank_env, launch=launch)
    worker.run()
    return worker.metrics.__dict__


def mpirun_command(config: str, overrides: list[str], ranks: int) -> list[str]:
    """The local command line: mpirun over this machine's cores (oversubscribed when needed)."""
    import os
    import shutil

    if shutil.which("mpirun") is None:
        raise ShardinferError("mpirun not found: install an MPI (e.g. apt-get install openmpi-bin) "
                              "and pip install 'shardinfer[mpi]', or run without --launcher mpi")
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    return ["mpirun", "-n", str(ranks), "--oversubscribe", *root, sys.executable, "-m", "shardinfer.launch.mpi",
            config, *overrides]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shardinfer.launch.mpi")
    parser.add_argument("target", help="config file (new or continued run) or run directory")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--launch", type=int, help="launch number prepared by `shardinfer submit`")
    parser.add_argument("--gpus-per-replica", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise missing_dependency("mpi4py", "mpi") from exc
    from shardinfer.env import from_mpi
    from shardinfer.logs import setup_logging
    from shardinfer.rundir import RunDir

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
    except BaseException:  # noqa: BLE001 - any failure must end every rank, not leave them waiting
        log.exception("rank %d failed; aborting all %d ranks", rank_env.rank, rank_env.world)
        sys.stderr.flush()
        comm.Abort(1)
    gathered = comm.gather(metrics, root=0)
    if comm.Get_rank() != 0:
        return 0
    return _reduce(value, gathered)


def _reduce(run_dir: str, gathered: list[dict[str, Any]]) -> int:
    from shardinfer.reduce import reduce_run
    from shardinfer.rundir import RunDir

    if any(m.get("drained") for m in gathered):
        log.warning("ranks were drained by a signal: not reducing; the requeued job or `resume` goes on")
        return 0
    log.info("all %d ranks done (%d rows); reducing", len(gathered), sum(m["rows"] for m in gathered))
    try:
        report = reduce_run(RunDir(run_dir))
    except ShardinferError as exc:
        print(f"shardinfer: {exc}", file=sys.stderr)
        return 1
    rows = report["rows"]
    print(f"rows: {rows['in']} in, {rows['ok']} ok, {rows['truncated']} truncated, {rows['failed']} failed")
    print(f"results: {report['results']}\nreport:  {Path(run_dir).resolve() / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
