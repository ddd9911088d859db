"""How many workers a cluster run has, and what each one gets: derived in one place from the config.

Nodes come from ``slurm.nodes``, GPUs from ``slurm.gpus_per_node``, GPUs per model replica from the
engine (vLLM: ``tensor_parallel_size x pipeline_parallel_size``; transformers: the whole node), nodes
per replica from ``slurm.nodes_per_replica``; workers and tasks are computed from those, so the batch
script, the plan and the workers' start-up checks cannot disagree.

A replica that spans nodes (``nodes_per_replica`` > 1) is one worker: its first node (the leader)
runs the shardinfer worker and the engine's front, the others only the engine's followers.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardinfer.config import Config
from shardinfer.engines.registry import EngineSpec, get_engine
from shardinfer.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    shape: str
    nodes: int
    replicas_per_node: int  # 1 when a replica spans nodes
    gpus_per_replica: int  # 0 on CPU-only nodes
    gpus_per_node: int
    nodes_per_replica: int = 1

    @property
    def workers(self) -> int:
        return self.nodes * self.replicas_per_node // self.nodes_per_replica

    @property
    def tasks_per_node(self) -> int:
        """SLURM tasks per node: one per replica, or one per node of a replica spanning nodes."""
        return self.replicas_per_node

    @property
    def gpus_per_task(self) -> int:
        """GPUs each task pins: its replica's slice, or the whole node when a replica spans nodes."""
        return self.gpus_per_replica if self.nodes_per_replica == 1 else self.gpus_per_node


def layout(cfg: Config) -> Layout:
    s = cfg.slurm
    spec = get_engine(cfg.model.engine)
    if spec.span_check is not None:
        problem = spec.span_check(cfg.model, s.nodes_per_replica, s.gpus_per_node)
        if problem:
            raise ConfigError(problem)
    if s.nodes_per_replica > 1:
        _check_spanning(cfg, spec)
    if s.gpus_per_node == 0:
        per_node = s.cpu_workers_per_node
        return Layout(s.shape, s.nodes, per_node, 0, 0, s.nodes_per_replica)
    per_replica = spec.replica_gpus(cfg.model, s.gpus_per_node)
    if s.nodes_per_replica == 1:
        _check_one_node(cfg, per_replica)
        return Layout(s.shape, s.nodes, s.gpus_per_node // per_replica, per_replica, s.gpus_per_node)
    _check_nodes_per_replica(cfg, per_replica)
    return Layout(s.shape, s.nodes, 1, per_replica, s.gpus_per_node, s.nodes_per_replica)


def _split(cfg: Config, per_replica: int) -> str:
    return (f"{per_replica} GPUs (tensor_parallel_size x pipeline_parallel_size for engine {cfg.model.engine})"
            if cfg.model.engine == "vllm" else f"{per_replica} GPUs (engine {cfg.model.engine})")


def _check_one_node(cfg: Config, per_replica: int) -> None:
    g = cfg.slurm.gpus_per_node
    if per_replica > g and per_replica % g == 0:
        raise ConfigError(
            f"slurm.nodes_per_replica: a replica takes {_split(cfg, per_replica)} = {per_replica // g} nodes of "
            f"{g} GPUs: set slurm.nodes_per_replica={per_replica // g}")
    if per_replica > g:
        raise ConfigError(_not_whole_nodes(cfg, per_replica))
    if per_replica < 1 or g % per_replica:
        raise ConfigError(
            f"slurm.gpus_per_node ({g}) is not a multiple of the GPUs per model replica "
            f"({per_replica} = tensor_parallel_size x pipeline_parallel_size for engine "
            f"{cfg.model.engine}). Fix one of them so each node holds whole replicas."
        )


def _not_whole_nodes(cfg: Config, per_replica: int) -> str:
    g = cfg.slurm.gpus_per_node
    fits = sorted({g * (per_replica // g), g * (per_replica // g + 1)} - {0})
    return (f"GPUs per replica ({per_replica}) is not a multiple of slurm.gpus_per_node ({g}): a replica spanning "
            f"nodes takes whole nodes; make tensor_parallel_size x pipeline_parallel_size "
            f"{' or '.join(map(str, fits))}")


def _check_nodes_per_replica(cfg: Config, per_replica: int) -> None:
    s = cfg.slurm
    if per_replica % s.gpus_per_node:
        raise ConfigError(_not_whole_nodes(cfg, per_replica))
    if per_replica != s.nodes_per_replica * s.gpus_per_node:
        right = per_replica // s.gpus_per_node
        raise ConfigError(
            f"slurm.nodes_per_replica ({s.nodes_per_replica}) x slurm.gpus_per_node ({s.gpus_per_node}) is "
            f"{s.nodes_per_replica * s.gpus_per_node} GPUs, but a replica takes {_split(cfg, per_replica)}: "
            f"set slurm.nodes_per_replica={right}")


def _check_spanning(cfg: Config, spec: EngineSpec) -> None:
    s = cfg.slurm
    k = s.nodes_per_replica
    if spec.follower is None:
        raise ConfigError(f"slurm.nodes_per_replica={k}: engine {spec.name} cannot span nodes "
                          f"(one {spec.name} process uses one node's GPUs); set model.engine=vllm, or "
                          f"slurm.nodes_per_replica=1")
    if s.nodes % k:
        near = sorted({max(k, s.nodes // k * k), (s.nodes // k + 1) * k})
        raise ConfigError(f"slurm.nodes ({s.nodes}) is not a multiple of slurm.nodes_per_replica ({k}): use "
                          f"{' or '.join(map(str, near))}")
    if s.gpus_per_node == 0 and s.cpu_workers_per_node != 1:
        raise ConfigError(f"slurm.cpu_workers_per_node ({s.cpu_workers_per_node}): a replica spanning nodes "
                          f"takes whole nodes; set it to 1")


def replica_lines(cfg: Config, lay: Layout) -> list[str]:
    """What the plan says of the layout: a replica's size, and workers from nodes."""
    k = lay.nodes_per_replica
    if lay.gpus_per_node:
        size = f"{_split(cfg, lay.gpus_per_replica)}"
        size += f" = {k} nodes of {lay.gpus_per_node}" if k > 1 else f" on one node of {lay.gpus_per_node}"
    else:
        size = f"{k} CPU node(s)" if k > 1 else "one CPU node's share"
    shape = (f"array shape: {lay.workers} array task(s) of {k} node(s)" if lay.shape == "array"
             else f"job shape: one job of {lay.nodes} node(s)")
    return [f"# layout: a replica takes {size} (slurm.nodes_per_replica {k}); {lay.nodes} node(s) -> "
            f"{lay.workers} worker(s); {shape}"]


def node_map(lay: Layout) -> list[str]:
    """Which node of a job runs what, when a replica spans nodes (the dry run's map)."""
    k = lay.nodes_per_replica
    gpus = f", GPUs 0-{lay.gpus_per_node - 1}" if lay.gpus_per_node else ""
    if k == 1:
        return []
    nodes = k if lay.shape == "array" else lay.nodes
    lines = []
    for node in range(nodes):
        replica, i = divmod(node, k)
        who = "array index" if lay.shape == "array" else f"{replica}"
        if i == 0:
            lines.append(f"# job node {node}: replica {who} leader   - shardinfer worker rank {who}, engine "
                         f"node_rank 0 (LLM, scheduler){gpus}")
        else:
            lines.append(f"# job node {node}: replica {who} follower - engine node_rank {i}{gpus}; stops with "
                         f"its leader")
    if lay.shape == "array":
        lines.insert(0, f"# array shape: each of the {lay.workers} array task(s) is one replica of {k} nodes")
    return lines
