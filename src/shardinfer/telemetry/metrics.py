"""Worker metrics: one typed record per worker and launch, saved in ``<run dir>/metrics/``.

Written by the worker (at start, after the model loads, on a timer while it works and at the end),
read by the report, ``status`` and the benchmark. A record is checked (pydantic) as it is read.
Files written by older versions load too: a missing field takes its default, a field no longer
written is ignored. A damaged file (not JSON, a field of the wrong type) is left out with a warning,
so that ``status`` and the report still show the other workers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from shardinfer.ledger.rundir import FS, RunDir, read_json, write_json_atomic
from shardinfer.records import describe_errors

log = logging.getLogger(__name__)


@dataclass
class WorkerMetrics:
    rank: int
    world: int
    launch: int
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    started_at: float = field(default_factory=time.time)
    model_load_s: float = 0.0
    generation_s: float = 0.0
    first_generate_at: float | None = None
    last_generate_end: float | None = None
    finished_at: float | None = None
    units: int = 0
    rows: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    engine: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    launcher: str = "local"
    job_id: str | None = None
    gpus: str | None = None  # CUDA_VISIBLE_DEVICES of the worker
    device: str | None = None  # what it ran on: the GPUs' names (nvidia-smi), else "cpu"
    saved_at: float | None = None  # when this record was last written: the worker's last sign of life
    drained: bool = False  # stopped early on SIGUSR2/SIGTERM
    drained_by: str | None = None  # the signal's name
    restart: int = 0  # requeues of the SLURM job before this start
    timeline: dict[str, Any] = field(default_factory=dict)  # tokens finished per time bin
    fs_ops: dict[str, int] = field(default_factory=dict)  # metadata operations on the run directory, by kind
    fs_seconds: float = 0.0  # time spent in them (fsyncs included)
    fsyncs: int = 0
    idle_s: float = 0.0  # time spent with nothing to claim, waiting for given-back units or the end
    idle_fs_ops: int = 0  # metadata operations while idle (watching included)
    watch_s: float = 0.0  # of the idle time, as the run's watcher
    watch_fs_ops: int = 0
    engine_report: dict[str, Any] = field(default_factory=dict)  # the engine's settings and scheduler stats
    units_held_max: int = 0  # most units claimed and not yet committed at once
    peak_rss_mb: float = 0.0  # the worker process's peak resident memory
    replica_hosts: list[str] = field(default_factory=list)  # a replica across nodes: its nodes, leader first

    @property
    def end(self) -> float:
        """When the worker finished (or last generated, or started: a worker that died early)."""
        return self.finished_at or self.last_generate_end or self.started_at

    @property
    def busy_s(self) -> float:
        return self.end - self.started_at

    @property
    def gpu_count(self) -> int:
        return len([g for g in (self.gpus or "").split(",") if g.strip()])

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens

    @property
    def key(self) -> tuple[int, int]:
        """Launch and SLURM restart: workers started together share it."""
        return self.launch, self.restart

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> WorkerMetrics:
        """A saved record, checked: raises pydantic's ValidationError (a ValueError) naming the wrong fields."""
        return _metrics_adapter().validate_python(data)

    def save(self, run_dir: RunDir) -> None:
        self.saved_at = time.time()
        with FS.scope("metrics"):
            write_json_atomic(run_dir.worker_metrics(self.launch, self.rank, self.restart), self.to_json(), fsync=False)


@cache
def _metrics_adapter() -> TypeAdapter[WorkerMetrics]:
    return TypeAdapter(WorkerMetrics)  # unknown fields are ignored (a dataclass's default)


_warned: set[Path] = set()  # damaged files already warned about (status reads them again and again)


def load_metrics(run_dir: RunDir) -> list[WorkerMetrics]:
    """The records of every worker and launch; damaged ones are left out, with a warning."""
    loaded = (read_metrics(p) for p in sorted(run_dir.metrics.glob("launch-*-worker-*.json")))
    return [m for m in loaded if m is not None]


def read_metrics(path: Path) -> WorkerMetrics | None:
    """One worker's record, or None (and a warning, once) when the file is damaged."""
    try:
        return WorkerMetrics.from_json(read_json(path))
    except FileNotFoundError:
        return None  # removed since it was listed
    except ValidationError as exc:
        problem = describe_errors(exc)
    except (ValueError, OSError) as exc:  # not JSON (json.JSONDecodeError), not UTF-8, unreadable
        problem = f"not JSON: {exc}" if isinstance(exc, json.JSONDecodeError) else str(exc)
    if path not in _warned:
        _warned.add(path)
        log.warning("worker metrics %s are damaged (%s): left out of the status and report", path, problem)
    return None
