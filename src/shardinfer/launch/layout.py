"""How many workers a cluster run has, and what each one gets: derived in one place from the config.

Nodes come from ``slurm.nodes``, GPUs from ``slurm.gpus_per_node``, GPUs per model replica from
``tensor_parallel_size x pipeline_parallel_size``; workers and tasks are computed from those, so the
sbatch script, the plan and the workers' start-up checks cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardinfer.config import Config
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


def gpus_per_replica(cfg: Config) -> int:
    if cfg.model.engine == "hf":  # one process spreads the model over all GPUs of its node
        return cfg.slurm.gpus_per_node
    args = cfg.model.vllm_args
    return int(args.get("tensor_parallel_size", 1)) * int(args.get("pipeline_parallel_size", 1))


def layout(cfg: Config) -> Layout:
    s = cfg.slurm
    if s.gpus_per_node == 0:
        return Layout(s.shape, s.nodes, s.cpu_workers_per_node, 0, 0)
    per_replica = gpus_per_replica(cfg)
    if per_replica < 1 or s.gpus_per_node % per_replica:
        raise ConfigError(
            f"slurm.gpus_per_node ({s.gpus_per_node}) is not a multiple of the GPUs per model replica "
            f"({per_replica} = tensor_parallel_size x pipeline_parallel_size). Fix one of them so each "
            f"node holds whole replicas."
        )
    return Layout(s.shape, s.nodes, s.gpus_per_node // per_replica, per_replica, s.gpus_per_node)
