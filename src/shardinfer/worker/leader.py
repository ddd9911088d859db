"""The leader of a replica across nodes: node 0 runs the shardinfer worker and the engine's front.

It waits until every follower node said hello, then works exactly as a one-node worker does, with
the engine told where its other nodes meet it. When a follower is lost (its process died, its node
fell silent, or its engine failed), the leader gives its units back at once, tells the other
followers, stops its own engine processes and exits: the replica stops as one worker.
"""

from __future__ import annotations

import logging
import os

from shardinfer.engines import get_engine
from shardinfer.errors import EXIT_FAILED, RunError
from shardinfer.launch.env import RankEnv
from shardinfer.launch.replica import Leader, Place, cancel_step, heartbeat_s, node_names, stop_group
from shardinfer.ledger.claims import Ledger
from shardinfer.ledger.rundir import RunDir
from shardinfer.ledger.runstate import load_run
from shardinfer.telemetry.metrics import WorkerMetrics
from shardinfer.worker.loop import Spanning, run_worker, worker_name

log = logging.getLogger("shardinfer.worker")


def place_of(rank_env: RankEnv) -> Place:
    return Place(replica=rank_env.rank, node=rank_env.replica_node, nodes=rank_env.replica_nodes,
                 job=f"{rank_env.slurm_job_id or 'local'}-{rank_env.restart}")


def replica_hosts(rank_env: RankEnv) -> list[str]:
    """The replica's nodes, leader first: the job's nodes of this replica (an array task's own)."""
    names = node_names()
    first = 0 if rank_env.source == "slurm-array" else rank_env.rank * rank_env.replica_nodes
    return names[first:first + rank_env.replica_nodes]


def run_leader(run_dir: RunDir, rank_env: RankEnv, *, launch: int) -> WorkerMetrics:
    cfg, _ = load_run(run_dir)
    os.environ.update(cfg.run.env)  # SHARDINFER_REPLICA_START_S may come from there, whatever the launcher
    spec = get_engine(cfg.model.engine)
    assert spec.span_args is not None  # the layout refused engines that cannot span nodes
    hosts = replica_hosts(rank_env)
    leader = Leader(run_dir, place_of(rank_env), hosts)
    ledger = Ledger(run_dir, worker=worker_name(rank_env.rank), lease_timeout_s=cfg.run.lease_timeout_s)
    leader.on_lost = lambda reason: _stop_replica(leader, ledger, reason)
    span = leader.open()
    try:
        _wait_followers(leader)
        spanning = Spanning(engine_args=spec.span_args(span), env={"VLLM_HOST_IP": span.master_addr},
                            before_retry=leader.hold_if_lost, hosts=hosts)
        return run_worker(run_dir, rank_env, launch=launch, spanning=spanning)
    finally:
        if not leader.bye(wait_s=leader.silence_s + heartbeat_s()):  # a frozen follower holds the step
            stop_group()
            cancel_step()


def _wait_followers(leader: Leader) -> None:
    try:
        leader.wait_followers()
    except RunError as exc:
        if leader.unreachable:  # a follower that never came up would hold the job step forever
            log.error("%s", exc)
            leader.bye()
            stop_group()
            cancel_step()
        raise


def _stop_replica(leader: Leader, ledger: Ledger, reason: str) -> None:
    """A follower is lost (called from the link's thread: the main one may be stuck in the engine)."""
    log.error("replica %d: %s; stopping the replica, giving its units back", leader.place.replica, reason)
    try:
        given = ledger.expire_claims_of(ledger.worker)
        log.error("replica %d: units given back: %s", leader.place.replica, given or "none")
    finally:
        leader.bye()
        stop_group()
        if leader.unreachable:  # a silent follower may still hold its node: SLURM stops the step
            cancel_step()
        logging.shutdown()
        os._exit(EXIT_FAILED)
