"""A follower node of a replica across nodes: it runs only the engine's part of this node.

It never touches the ledger: the replica is one worker, its leader's. It joins the leader named in
the rendezvous file, then runs the engine's follower until the leader says ``bye`` (the worker
ended: exit 0) or is lost (exit 1); either way it first stops this node's engine processes. Drain
signals (USR2, TERM) are for the leader: the follower keeps serving until the leader's unit is done.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from shardinfer.engines import get_engine
from shardinfer.errors import EXIT_FAILED, RunError
from shardinfer.launch.env import RankEnv
from shardinfer.launch.replica import Follower, follower_log, node_address, stop_group
from shardinfer.ledger.rundir import RunDir
from shardinfer.ledger.runstate import load_run
from shardinfer.worker.leader import place_of

log = logging.getLogger("shardinfer.worker")
_ending = threading.Event()  # the link's thread is stopping this process: the main thread waits for it


def log_path(run_dir: RunDir, rank_env: RankEnv) -> Path:
    return follower_log(run_dir, rank_env.rank, rank_env.replica_node)


def run_follower(run_dir: RunDir, rank_env: RankEnv) -> int:
    cfg, plan = load_run(run_dir)
    os.environ.update(cfg.run.env)  # before the engine is imported, as on the leader
    spec = get_engine(cfg.model.engine)
    assert spec.follower is not None  # the layout refused engines that cannot span nodes
    follower = Follower(run_dir, place_of(rank_env), log_path(run_dir, rank_env))
    # SLURM forwards the drain signal to every process of the step: here (and in the engine's processes,
    # which inherit the mask) it stays blocked; the leader drains, then says bye
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _leave_to_leader)
    try:
        span = follower.connect()
        os.environ["VLLM_HOST_IP"] = node_address()  # this node's own address, whatever run.env says
        follower.watch(on_bye=lambda: _end(0, "the leader ended its worker"),
                       on_lost=lambda reason: _end(EXIT_FAILED, f"{reason}: stopping this node's engine"))
        spec.follower(cfg, plan.max_model_len, span)
        _wait_if_ending()
        raise RunError(f"replica {rank_env.rank} node {rank_env.replica_node}: this node's engine processes "
                       f"stopped")
    except Exception as exc:
        _wait_if_ending()
        follower.failed(f"{type(exc).__name__}: {exc}")
        stop_group()
        raise


def _leave_to_leader(signum: int, _frame: Any = None) -> None:
    log.warning("signal %s: the replica's leader stops it; this follower serves until it says bye",
                signal.Signals(signum).name)


def _end(code: int, why: str) -> None:
    """From the link's thread: stop this node's engine processes and exit."""
    _ending.set()
    (log.info if code == 0 else log.error)("%s", why)
    stop_group()
    logging.shutdown()
    os._exit(code)


def _wait_if_ending() -> None:
    """The engine returned because the link's thread is stopping it: let that thread exit."""
    if _ending.is_set():
        while True:
            time.sleep(60)
