"""The run directory: every file the processes of a run share, and atomic writes into it.

```
run.json            resolved config, versions, the worker count the plan was cut for
fingerprint.json    model identity, chat template, engine version, input files: what resume checks
plan.json           files, units, duplicates, token histogram
claims/unit-N.json  a worker's claim on a unit (exclusive create)
parts/unit-N.parquet  a committed unit's results (written under a temporary name, then renamed)
done/unit-N.json    the done record, written after the part: only then is the unit finished
metrics/            per-worker metrics, one file per worker and launch
logs/               per-worker DEBUG logs
slurm/              rendered sbatch scripts and the jobs' output; jobs.json: submitted job ids
results/            merged results (Parquet); report.json and report.md beside them
```
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    run_json = property(lambda self: self.path / "run.json")
    plan_json = property(lambda self: self.path / "plan.json")
    claims = property(lambda self: self.path / "claims")
    parts = property(lambda self: self.path / "parts")
    done = property(lambda self: self.path / "done")
    metrics = property(lambda self: self.path / "metrics")
    logs = property(lambda self: self.path / "logs")
    results = property(lambda self: self.path / "results")
    report_json = property(lambda self: self.path / "report.json")
    report_md = property(lambda self: self.path / "report.md")
    throughput_png = property(lambda self: self.path / "throughput.png")
    jobs_json = property(lambda self: self.path / "jobs.json")
    fingerprint_json = property(lambda self: self.path / "fingerprint.json")
    slurm = property(lambda self: self.path / "slurm")

    def make(self) -> None:
        for sub in (self.claims, self.parts, self.done, self.metrics, self.logs, self.slurm):
            sub.mkdir(parents=True, exist_ok=True)

    def part(self, unit: int) -> Path:
        return self.parts / f"unit-{unit:06d}.parquet"

    def retry_source(self, unit: int) -> Path:
        """A committed part set aside by `resume --retry-failed`: its failed rows are redone."""
        return self.parts / f"unit-{unit:06d}.retry-source.parquet"

    def done_record(self, unit: int) -> Path:
        return self.done / f"unit-{unit:06d}.json"

    def claim(self, unit: int) -> Path:
        return self.claims / f"unit-{unit:06d}.json"

    def worker_log(self, rank: int) -> Path:
        return self.logs / f"worker-{rank:05d}.log"

    def worker_metrics(self, launch: int, rank: int, restart: int = 0) -> Path:
        again = f"-restart-{restart}" if restart else ""
        return self.metrics / f"launch-{launch:03d}{again}-worker-{rank:05d}.json"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON under a temporary name, flush it to disk, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as fh:
        json.dump(data, fh, indent=1, sort_keys=False, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    with path.open() as fh:
        return json.load(fh)
