"""Where this worker stands: rank, world size, local rank, node and GPUs, as its launcher says.

Each launcher names a :class:`RankSource` (``Launcher.ranks``), as submitit pairs each executor with
a job environment: :data:`FROM_ARGUMENTS` (the local launcher: the ``--rank``/``--world`` it starts each
worker with), :data:`FROM_SLURM` (sbatch and submitit: SLURM_PROCID/NTASKS/LOCALID/NODEID, or the task
of a job array, and the GPUs SLURM gave the step) and :data:`FROM_MPI` (mpirun and the SLURM MPI job:
``COMM_WORLD``, the local rank from the MPI launcher's variables). A worker process does not guess
which applies: it is told the name of the launcher that started it and asks the registry for that
launcher's source (:func:`shardinfer.launch.registry.worker_launcher`). Nothing else in shardinfer
reads launcher environment variables.
"""

from __future__ import annotations

import abc
import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from shardinfer.errors import RunError, missing_dependency

log = logging.getLogger(__name__)

GPU_VAR = "CUDA_VISIBLE_DEVICES"
LAUNCHER_VAR = "SHARDINFER_LAUNCHER"  # the launcher that started this worker, when not given as --launcher

# SLURM: a step started by srun (also under submitit), and the task of a job array
SLURM_STEP = {"rank": "SLURM_PROCID", "world": "SLURM_NTASKS", "local_rank": "SLURM_LOCALID",
              "node": "SLURM_NODEID", "job_id": "SLURM_JOB_ID"}
SLURM_ARRAY = {"task": "SLURM_ARRAY_TASK_ID", "count": "SLURM_ARRAY_TASK_COUNT", "min": "SLURM_ARRAY_TASK_MIN",
               "job_id": "SLURM_ARRAY_JOB_ID"}
SLURM_GPUS = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS")  # GPUs of the step or job, where SLURM does not set GPU_VAR
SLURM_RESTART = "SLURM_RESTART_COUNT"
# The local rank as MPI launchers set it for each rank: Open MPI's mpirun, MPICH and Intel MPI
# (Hydra), MVAPICH2. Not SLURM_LOCALID: under mpirun in a SLURM job the ranks inherit their daemon's.
MPI_LOCAL_RANK = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK")


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world: int
    local_rank: int
    node: int
    launcher: str  # the launcher that started this worker (its registered name)
    job_id: str | None = None  # the scheduler's job of the launch (an array's own job id)
    host: str = ""
    restart: int = 0  # SLURM_RESTART_COUNT: how often the job was requeued
    slurm_job_id: str | None = None  # SLURM_JOB_ID: the job this process runs in (an array task's own id)
    source: str = "arguments"  # how the rank was found: a RankSource's kind
    job_tasks: int | None = None  # workers in this process's scheduler job, when not all of them
    replica_nodes: int = 1  # nodes this worker's replica spans (slurm.nodes_per_replica)
    replica_node: int = 0  # this process's node within its replica: 0 leads (runs the worker)

    @property
    def tasks_in_job(self) -> int:
        """Workers in this SLURM job: all of them, or one per job of an array."""
        return self.world if self.job_tasks is None else self.job_tasks

    def describe(self) -> str:
        job = f", job {self.job_id}" if self.job_id else ""
        span = (f", replica node {self.replica_node} of {self.replica_nodes}"
                f"{' (leader)' if self.replica_node == 0 else ' (follower)'}" if self.replica_nodes > 1 else "")
        return (f"rank {self.rank}/{self.world} (local rank {self.local_rank}, node {self.node}, "
                f"{self.launcher} launcher, rank from {self.source}{job}{span})")


class RankSource(abc.ABC):
    """How a worker started by one launcher finds its rank, world size, local rank, node and GPUs."""

    kind: str  # recorded as RankEnv.source
    pins_devices: bool = True  # each worker takes its local rank's slice of the GPUs it sees

    @abc.abstractmethod
    def find(self, env: Mapping[str, str], *, launcher: str, rank: int | None = None,
             world: int | None = None, nodes_per_replica: int = 1) -> RankEnv:
        """This worker's place, from the environment and the ``--rank``/``--world`` it was given
        (``nodes_per_replica``: the tasks of one replica across nodes share its rank)."""

    def visible_devices(self, env: Mapping[str, str]) -> list[str]:
        """The GPU ids this worker's node shares among its workers."""
        return visible_gpu_ids(env) or []

    def devices(self, rank_env: RankEnv, per_replica: int, env: Mapping[str, str]) -> list[str] | None:
        """The GPUs this worker's replica uses, or None when the launcher pinned them already."""
        if not per_replica or not self.pins_devices:
            return None
        return gpu_slice(rank_env, self.visible_devices(env), per_replica)


def _common(env: Mapping[str, str]) -> dict[str, Any]:
    """What every source records of the scheduler job this process runs in, if any."""
    return {"host": socket.gethostname(), "restart": _int(env, SLURM_RESTART) if env.get(SLURM_RESTART) else 0,
            "slurm_job_id": env.get(SLURM_STEP["job_id"])}


class ArgumentRanks(RankSource):
    """The rank and world size the launcher put on the worker's command line (``--rank R --world W``);
    one worker of one when it gave neither. The launcher set CUDA_VISIBLE_DEVICES for each worker."""

    kind = "arguments"
    pins_devices = False

    def find(self, env: Mapping[str, str], *, launcher: str, rank: int | None = None,
             world: int | None = None, nodes_per_replica: int = 1) -> RankEnv:
        _one_node(launcher, nodes_per_replica)
        if rank is None and world is None:
            rank, world = 0, 1
        if rank is None or world is None or not 0 <= rank < world:
            raise RunError(f"the {launcher} launcher starts each worker with --rank R --world W (0 <= R < W); "
                           f"this one got --rank {rank} --world {world}")
        return RankEnv(rank, world, 0, 0, launcher, host=socket.gethostname(), source=self.kind)


class SlurmRanks(RankSource):
    """A task of a SLURM step (srun, or submitit's tasks), or the task of a job array (one worker per
    array job: the rank is its index in the array). A replica across k nodes is k tasks, one per
    node: in a job, tasks r*k .. r*k+k-1 are replica r; in an array, the k tasks of one array job."""

    kind = "slurm"

    def find(self, env: Mapping[str, str], *, launcher: str, rank: int | None = None,
             world: int | None = None, nodes_per_replica: int = 1) -> RankEnv:
        k = nodes_per_replica
        if SLURM_ARRAY["task"] in env:
            first = _int(env, SLURM_ARRAY["min"]) if SLURM_ARRAY["min"] in env else 0
            return RankEnv(rank=_int(env, SLURM_ARRAY["task"]) - first, world=_int(env, SLURM_ARRAY["count"]),
                           local_rank=0, node=0, launcher=launcher, job_id=env.get(SLURM_ARRAY["job_id"]),
                           source="slurm-array", job_tasks=1, replica_nodes=k,
                           replica_node=_int(env, SLURM_STEP["rank"]) if k > 1 else 0, **_common(env))
        for key in ("rank", "world"):
            if SLURM_STEP[key] not in env:
                raise RunError(f"{SLURM_STEP[key]} is not set: the {launcher} launcher's workers are SLURM tasks "
                               f"(srun in a batch job), and this process is not one. Start a worker here with "
                               f"--launcher local --rank R --world W.")
        task, tasks = _int(env, SLURM_STEP["rank"]), _int(env, SLURM_STEP["world"])
        if tasks % k:
            raise RunError(f"allocation mismatch: {tasks} tasks cannot hold replicas of {k} nodes (one task per "
                           f"node); submit with `shardinfer submit`, which asks for slurm.nodes tasks")
        return RankEnv(rank=task // k, world=tasks // k,
                       local_rank=_int(env, SLURM_STEP["local_rank"]) if SLURM_STEP["local_rank"] in env else 0,
                       node=_int(env, SLURM_STEP["node"]) if SLURM_STEP["node"] in env else 0,
                       launcher=launcher, job_id=env.get(SLURM_STEP["job_id"]), source=self.kind,
                       replica_nodes=k, replica_node=task % k, **_common(env))

    def visible_devices(self, env: Mapping[str, str]) -> list[str]:
        visible = visible_gpu_ids(env)
        if visible is not None:
            return visible
        for name in SLURM_GPUS:  # no CUDA_VISIBLE_DEVICES (no device cgroup): the GPUs SLURM allocated
            if env.get(name):
                return [g.strip() for g in env[name].split(",") if g.strip()]
        return []


class MpiRanks(RankSource):
    """An MPI rank: rank and world size from ``COMM_WORLD``; the local rank from the variables the MPI
    launcher sets (else from the ranks sharing this node's memory); the node index from the ranks
    that share a node. Every rank of the communicator must call :meth:`find` (it is collective)."""

    kind = "mpi"

    def __init__(self, communicator: Callable[[], tuple[Any, Any]] | None = None):
        self._communicator = communicator or _comm_world  # () -> (COMM_WORLD, COMM_TYPE_SHARED)

    def find(self, env: Mapping[str, str], *, launcher: str, rank: int | None = None,
             world: int | None = None, nodes_per_replica: int = 1) -> RankEnv:
        _one_node(launcher, nodes_per_replica)
        comm, shared = self._communicator()
        node_comm = comm.Split_type(shared)
        leaders = comm.allgather(comm.Get_rank() if node_comm.Get_rank() == 0 else None)
        node = sorted(r for r in leaders if r is not None).index(node_comm.bcast(comm.Get_rank(), root=0))
        named = next((name for name in MPI_LOCAL_RANK if name in env), None)
        local_rank = _int(env, named) if named else node_comm.Get_rank()
        return RankEnv(rank=comm.Get_rank(), world=comm.Get_size(), local_rank=local_rank, node=node,
                       launcher=launcher, job_id=env.get(SLURM_STEP["job_id"]), source=self.kind, **_common(env))


def _one_node(launcher: str, nodes_per_replica: int) -> None:
    if nodes_per_replica != 1:
        raise RunError(f"the {launcher} launcher runs each replica on one node (slurm.nodes_per_replica="
                       f"{nodes_per_replica}): submit with --launcher sbatch or submitit")


def _comm_world() -> tuple[Any, Any]:
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise missing_dependency("mpi4py", "mpi") from exc
    return MPI.COMM_WORLD, MPI.COMM_TYPE_SHARED


FROM_ARGUMENTS = ArgumentRanks()
FROM_SLURM = SlurmRanks()
FROM_MPI = MpiRanks()


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except (KeyError, ValueError) as exc:
        raise RunError(f"environment variable {name}={env.get(name)!r} is not an integer") from exc


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


def check_allocation(source: RankSource, rank_env: RankEnv, expect_world: int | None, gpus_per_replica: int,
                     env: Mapping[str, str] | None = None) -> None:
    """The job matches the config, and this worker sees only its replica's GPUs (pinned here)."""
    check_world(rank_env, expect_world)
    mine = source.devices(rank_env, gpus_per_replica, os.environ if env is None else env)
    if mine is not None:
        os.environ[GPU_VAR] = ",".join(mine)
        log.info("pinned to GPUs %s", ",".join(mine))
