"""How many workers a cluster run has, and what each one gets: derived in one place from the config.

Nodes come from ``slurm.nodes``, GPUs from ``slurm.gpus_per_node``, GPUs per model replica from the
engine (vLLM: ``tensor_parallel_size x pipeline_parallel_size``; transformers: the whole node);
workers and tasks are computed from those, so the batch script, the plan and the workers' start-up
checks cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardinfer.config import Config
from shardinfer.engines.registry import get_engine
from shardinfer.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    shape: str
    nodes: int
    replicas_per_node: int
    gpus_per_replica: int  # 0 on CPU-only nodes
    gpus_per_node: int

    @property
    def workers(self) -> int:
        return self.nodes * self.replicas_per_node


def layout(cfg: Config) -> Layout:
    s = cfg.slurm
    if s.gpus_per_node == 0:
        return Layout(s.shape, s.nodes, s.cpu_workers_per_node, 0, 0)
    per_replica = get_engine(cfg.model.engine).replica_gpus(cfg.model, s.gpus_per_node)
    if per_replica < 1 or s.gpus_per_node % per_replica:
        raise ConfigError(
            f"slurm.gpus_per_node ({s.gpus_per_node}) is not a multiple of the GPUs per model replica "
            f"({per_replica} = tensor_parallel_size x pipeline_parallel_size for engine "
            f"{cfg.model.engine}). Fix one of them so each node holds whole replicas."
        )
    return Layout(s.shape, s.nodes, s.gpus_per_node // per_replica, per_replica, s.gpus_per_node)
