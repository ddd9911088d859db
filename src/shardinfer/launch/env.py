"""Where this worker stands: rank, world size, local rank, node and GPUs, from one table per launcher.

Nothing else in shardinfer reads launcher environment variables. Detection order: explicit
arguments (local launcher), a SLURM job array task, a SLURM step (srun, also under submitit), else
a single local process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shardinfer.errors import RunError

log = logging.getLogger(__name__)

# name -> environment variable, per launcher
SLURM_STEP = {"rank": "SLURM_PROCID", "world": "SLURM_NTASKS", "local_rank": "SLURM_LOCALID",
              "node": "SLURM_NODEID", "job_id": "SLURM_JOB_ID"}
SLURM_ARRAY = {"task": "SLURM_ARRAY_TASK_ID", "count": "SLURM_ARRAY_TASK_COUNT", "min": "SLURM_ARRAY_TASK_MIN",
               "job_id": "SLURM_ARRAY_JOB_ID"}
# mpirun (Open MPI); under srun --mpi=pmix the SLURM step variables say the same
OPEN_MPI = {"rank": "OMPI_COMM_WORLD_RANK", "world": "OMPI_COMM_WORLD_SIZE",
            "local_rank": "OMPI_COMM_WORLD_LOCAL_RANK", "node": "OMPI_COMM_WORLD_NODE_RANK"}
GPU_VAR = "CUDA_VISIBLE_DEVICES"


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world: int
    local_rank: int
    node: int
    launcher: str  # local | slurm | slurm-array | mpi
    job_id: str | None = None
    host: str = ""
    restart: int = 0  # SLURM_RESTART_COUNT: how often the job was requeued
    slurm_job_id: str | None = None  # SLURM_JOB_ID: the job this process runs in (an array task's own id)

    @property
    def tasks_in_job(self) -> int:
        """Workers in this SLURM job: all of them, or one per job of an array."""
        return 1 if self.launcher == "slurm-array" else self.world

    def describe(self) -> str:
        job = f", job {self.job_id}" if self.job_id else ""
        return f"rank {self.rank}/{self.world} (local rank {self.local_rank}, node {self.node}, {self.launcher}{job})"


def detect(env: Mapping[str, str] | None = None, *, rank: int | None = None, world: int | None = None) -> RankEnv:
    env = os.environ if env is None else env
    host = socket.gethostname()
    if rank is not None and world is not None:
        return RankEnv(rank, world, 0, 0, "local", host=host)
    if SLURM_ARRAY["task"] in env:
        found = _slurm_array(env, host)
    elif OPEN_MPI["rank"] in env and OPEN_MPI["world"] in env:
        found = dataclasses.replace(_open_mpi(env, host), job_id=env.get(SLURM_STEP["job_id"]))
    elif SLURM_STEP["rank"] in env and SLURM_STEP["world"] in env:
        found = _slurm_step(env, host)
    else:
        return RankEnv(0, 1, 0, 0, "local", host=host)
    return dataclasses.replace(found, restart=int(env.get("SLURM_RESTART_COUNT") or 0),
                               slurm_job_id=env.get(SLURM_STEP["job_id"]))


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except (KeyError, ValueError) as exc:
        raise RunError(f"environment variable {name}={env.get(name)!r} is not an integer") from exc


def _slurm_array(env: Mapping[str, str], host: str) -> RankEnv:
    first = _int(env, SLURM_ARRAY["min"]) if SLURM_ARRAY["min"] in env else 0
    return RankEnv(rank=_int(env, SLURM_ARRAY["task"]) - first, world=_int(env, SLURM_ARRAY["count"]),
                   local_rank=0, node=0, launcher="slurm-array", job_id=env.get(SLURM_ARRAY["job_id"]), host=host)


def _open_mpi(env: Mapping[str, str], host: str) -> RankEnv:
    local_rank, node = (_int(env, OPEN_MPI[k]) if OPEN_MPI[k] in env else 0 for k in ("local_rank", "node"))
    return RankEnv(rank=_int(env, OPEN_MPI["rank"]), world=_int(env, OPEN_MPI["world"]), local_rank=local_rank,
                   node=node, launcher="mpi", host=host)


def _slurm_step(env: Mapping[str, str], host: str) -> RankEnv:
    return RankEnv(rank=_int(env, SLURM_STEP["rank"]), world=_int(env, SLURM_STEP["world"]),
                   local_rank=_int(env, SLURM_STEP["local_rank"]) if SLURM_STEP["local_rank"] in env else 0,
                   node=_int(env, SLURM_STEP["node"]) if SLURM_STEP["node"] in env else 0,
                   launcher="slurm", job_id=env.get(SLURM_STEP["job_id"]), host=host)


def visible_gpu_ids(env: Mapping[str, str] | None = None) -> list[str] | None:
    """GPU ids in CUDA_VISIBLE_DEVICES, or None when it is not set."""
    env = os.environ if env is None else env
    value = env.get(GPU_VAR)
    if value is None:
        return None
    return [g.strip() for g in value.split(",") if g.strip() and g.strip() != "-1"]


def gpu_slice(rank_env: RankEnv, visible: list[str], per_replica: int) -> list[str]:
    """The GPUs of this worker's replica: the local rank's slice of the node's visible GPUs."""
    start = rank_env.local_rank * per_replica
    if len(visible) < start + per_replica:
        raise RunError(
            f"allocation mismatch on {rank_env.host}: {rank_env.describe()} needs GPUs "
            f"{start}..{start + per_replica - 1} ({per_replica} per replica: tensor_parallel_size x "
            f"pipeline_parallel_size), but only {len(visible)} are visible (CUDA_VISIBLE_DEVICES="
            f"{','.join(visible) or 'empty'}). Fix: request slurm.gpus_per_node = replicas per node x "
            f"{per_replica}, or lower model.engine_args.tensor_parallel_size."
        )
    return visible[start:start + per_replica]


def check_world(rank_env: RankEnv, expected: int | None) -> None:
    """The job must have as many workers as the config asked for."""
    if expected is not None and rank_env.world != expected:
        raise RunError(
            f"allocation mismatch: the config asks for {expected} workers, the job has {rank_env.world} "
            f"({rank_env.launcher}). Fix: submit with `shardinfer submit` (it derives the task count from "
            f"slurm.nodes, slurm.gpus_per_node and tensor_parallel_size), or change those settings."
        )


def check_allocation(rank_env: RankEnv, expect_world: int | None, gpus_per_replica: int) -> None:
    """The job matches the config, and this worker sees only its replica's GPUs (pinned here)."""
    check_world(rank_env, expect_world)
    if gpus_per_replica and rank_env.launcher != "local":
        mine = gpu_slice(rank_env, visible_gpu_ids() or [], gpus_per_replica)
        os.environ[GPU_VAR] = ",".join(mine)
        log.info("pinned to GPUs %s", ",".join(mine))


def from_mpi(comm: Any) -> RankEnv:
    """Rank and world from an mpi4py communicator; local rank from the ranks sharing this node."""
    from mpi4py import MPI

    node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED)
    leaders = comm.allgather(comm.Get_rank() if node_comm.Get_rank() == 0 else None)
    node = sorted(r for r in leaders if r is not None).index(node_comm.bcast(comm.Get_rank(), root=0))
    return RankEnv(rank=comm.Get_rank(), world=comm.Get_size(),
                   local_rank=node_comm.Get_rank(), node=node, launcher="mpi",
                   job_id=os.environ.get(SLURM_STEP["job_id"]), host=socket.gethostname(),
                   restart=int(os.environ.get("SLURM_RESTART_COUNT") or 0),
                   slurm_job_id=os.environ.get(SLURM_STEP["job_id"]))
