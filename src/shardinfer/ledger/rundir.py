"""The run directory: every file the processes of a run share, and the filesystem operations on it.

```
run.json              resolved config of the latest launch, versions, layout, number of launches
fingerprint.json      model identity, chat template, engine version, input files: what resume checks
plan.json             files, units (with where each starts in its files), duplicates, token histogram
index/                seek indexes of gzipped input files, built when the run is planned
claims/SSSS/unit-N.json   a worker's claim on a unit (exclusive create); SSSS = N // 1000
parts/SSSS/unit-N.parquet a committed unit's results (written under a temporary name, then renamed)
done/SSSS/unit-N.json     the done record, written after the part: only then is the unit finished
coord/watcher.json    the lease of the one idle worker that watches for stale claims
coord/released/       units given back for anyone to claim (unit-N.aK), and `complete` at the end
metrics/              per-worker metrics, one file per worker and launch, rewritten on a timer
prometheus/           the same as Prometheus text files (worker-N.prom, run.prom) for node_exporter
logs/                 per-worker DEBUG logs
slurm/                rendered sbatch scripts and the jobs' output; jobs.json: every launch
results/              merged results (Parquet); report.json and report.md beside them
openai-batch-output.jsonl  the results as a Batch API output file (OpenAI batch input, output.openai_batch)
```

No directory holds more than about a thousand entries at 10^6 units. Run directories made before
the shards (layout 1: flat ``claims/``, ``parts/``, ``done/``) are read and continued as they are.

On a shared filesystem (Lustre, NFS, GPFS) every create, rename, unlink, open and stat is a request
to the metadata server, which all the jobs of a cluster share. :data:`FS` makes every such operation
of a process, counts it and times it, so a run reports what it asked of the filesystem.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from shardinfer.errors import disk_full, is_disk_full

LAYOUT = 2  # sharded claims/, parts/, done/ and the coord/ directory
SHARD_UNITS = 1000


class FileOps:
    """Metadata operations on the run directory: counted by kind, timed; ``latency_s`` is added to
    each (a simulation of a busy metadata server)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.fsyncs = 0
        self.seconds = 0.0
        self.latency_s = 0.0
        self._local = threading.local()  # the scope of the thread's operations

    @contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Count this thread's operations inside under ``name:<kind>`` (metrics files, apart from
        the ledger's)."""
        previous = getattr(self._local, "scope", "")
        self._local.scope = f"{name}:"
        try:
            yield
        finally:
            self._local.scope = previous

    @contextmanager
    def _op(self, kind: str, n: int = 1) -> Iterator[None]:
        start = time.perf_counter()
        if self.latency_s:
            time.sleep(self.latency_s * n)
        try:
            yield
        finally:
            self.counts[getattr(self._local, "scope", "") + kind] += n
            self.seconds += time.perf_counter() - start

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def create(self, path: Path, data: bytes) -> bool:
        """Create a file that must not exist yet (O_CREAT | O_EXCL); False when it does."""
        with self._op("create"):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            except OSError as exc:
                raise _disk_full_or(exc, path) from exc
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        except OSError as exc:  # a full disk: no half-written file stays behind
            path.unlink(missing_ok=True)
            raise _disk_full_or(exc, path) from exc
        return True

    def write_atomic(self, path: Path, write: Callable[[IO[bytes]], object], *, fsync: bool = True) -> None:
        """Write under a temporary name (flushed to disk), then rename into place; a write that fails
        (a full disk) leaves no temporary file. The writing and the fsync count in ``seconds``, not
        as metadata operations."""
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with self._op("create"):
                fh = tmp.open("wb")
            start = time.perf_counter()
            with fh:
                write(fh)
                fh.flush()
                if fsync:
                    os.fsync(fh.fileno())
                    self.fsyncs += 1
            self.seconds += time.perf_counter() - start
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _disk_full_or(exc, path) from exc
        with self._op("rename"):
            os.replace(tmp, path)

    def read(self, path: Path) -> bytes | None:
        with self._op("open"):
            try:
                return path.read_bytes()
            except FileNotFoundError:
                return None

    def mtime(self, path: Path) -> float | None:
        with self._op("stat"):
            try:
                return path.stat().st_mtime
            except FileNotFoundError:
                return None

    def rename(self, src: Path, dst: Path) -> bool:
        with self._op("rename"):
            try:
                os.rename(src, dst)
            except FileNotFoundError:
                return False
            return True

    def unlink(self, path: Path) -> None:
        with self._op("unlink"):
            path.unlink(missing_ok=True)

    def touch(self, path: Path, mtime: float | None = None) -> bool:
        """Set a file's modification time to now (or to ``mtime``)."""
        with self._op("utime"):
            try:
                os.utime(path, None if mtime is None else (mtime, mtime))
            except FileNotFoundError:
                return False
            return True

    def listdir(self, path: Path) -> list[str]:
        with self._op("listdir"):
            try:
                return os.listdir(path)
            except FileNotFoundError:
                return []


FS = FileOps()  # this process's operations on run directories


def _disk_full_or(exc: OSError, path: Path) -> Exception:
    """A full disk as the error that says so (where, and what to do); other errors as they are."""
    return disk_full(path.parent) if is_disk_full(exc) else exc


class RunDir:
    def __init__(self, path: str | Path, layout: int | None = None):
        self.path = Path(path)
        self.layout = layout if layout is not None else self._saved_layout()

    def _saved_layout(self) -> int:
        try:
            return int(read_json(self.run_json).get("layout", 1))
        except FileNotFoundError:
            return LAYOUT

    run_json = property(lambda self: self.path / "run.json")
    plan_json = property(lambda self: self.path / "plan.json")
    claims = property(lambda self: self.path / "claims")
    parts = property(lambda self: self.path / "parts")
    done = property(lambda self: self.path / "done")
    coord = property(lambda self: self.path / "coord")
    released = property(lambda self: self.path / "coord" / "released")
    watcher = property(lambda self: self.path / "coord" / "watcher.json")
    metrics = property(lambda self: self.path / "metrics")
    prometheus = property(lambda self: self.path / "prometheus")
    logs = property(lambda self: self.path / "logs")
    results = property(lambda self: self.path / "results")
    openai_output = property(lambda self: self.path / "openai-batch-output.jsonl")
    report_json = property(lambda self: self.path / "report.json")
    report_md = property(lambda self: self.path / "report.md")
    throughput_png = property(lambda self: self.path / "throughput.png")
    jobs_json = property(lambda self: self.path / "jobs.json")
    fingerprint_json = property(lambda self: self.path / "fingerprint.json")
    slurm = property(lambda self: self.path / "slurm")
    index = property(lambda self: self.path / "index")  # seek indexes of gzipped input
    launch_lock = property(lambda self: self.path / ".launch.lock")  # one launching process at a time
    results_lock = property(lambda self: self.path / ".results.lock")  # reduces take turns

    def is_lock(self, path: Path) -> bool:
        """A lock file: held by the processes using the directory, never removed."""
        return path in (self.launch_lock, self.results_lock)

    def make(self, units: int = 0) -> None:
        for sub in (self.claims, self.parts, self.done, self.released, self.metrics, self.logs, self.slurm):
            sub.mkdir(parents=True, exist_ok=True)
        if self.layout >= 2:
            for shard in range(-(-units // SHARD_UNITS)):
                for top in (self.claims, self.parts, self.done):
                    (top / f"{shard:04d}").mkdir(exist_ok=True)

    def _shard(self, top: Path, unit: int) -> Path:
        return top / f"{unit // SHARD_UNITS:04d}" if self.layout >= 2 else top

    def part(self, unit: int) -> Path:
        return self._shard(self.parts, unit) / f"unit-{unit:06d}.parquet"

    def retry_source(self, unit: int) -> Path:
        """A committed part set aside by `resume --retry-failed`: its failed rows are redone."""
        return self._shard(self.parts, unit) / f"unit-{unit:06d}.retry-source.parquet"

    def done_record(self, unit: int) -> Path:
        return self._shard(self.done, unit) / f"unit-{unit:06d}.json"

    def claim(self, unit: int) -> Path:
        return self._shard(self.claims, unit) / f"unit-{unit:06d}.json"

    def shard_dirs(self, top: Path) -> list[Path]:
        """The directories holding ``top``'s unit files: its shards, or itself (layout 1)."""
        if self.layout < 2:
            return [top]
        return sorted(p for p in (top.iterdir() if top.is_dir() else []) if p.is_dir())

    def shard_of(self, top: Path, unit: int) -> Path:
        return self._shard(top, unit)

    def worker_log(self, rank: int) -> Path:
        return self.logs / f"worker-{rank:05d}.log"

    def worker_metrics(self, launch: int, rank: int, restart: int = 0) -> Path:
        again = f"-restart-{restart}" if restart else ""
        return self.metrics / f"launch-{launch:03d}{again}-worker-{rank:05d}.json"


def restrict_umask() -> None:
    """Files of a run are never group- or world-writable, whatever the umask (a stricter one stays):
    every process that writes to a run directory calls this first."""
    os.umask(os.umask(0) | 0o022)


def unit_of(name: str) -> int | None:
    """The unit number in a ledger file name (``unit-000123.json``), or None."""
    if not name.startswith("unit-"):
        return None
    digits = name[5:].split(".", 1)[0]
    return int(digits) if digits.isdigit() else None


def write_json_atomic(path: Path, data: Any, *, fsync: bool = True) -> None:
    """Write JSON under a temporary name, flush it to disk, then rename it into place."""
    text = json.dumps(data, indent=1, sort_keys=False, default=str).encode()
    FS.write_atomic(path, lambda fh: fh.write(text), fsync=fsync)


def read_json(path: Path) -> Any:
    with path.open() as fh:
        return json.load(fh)
