"""A run while it runs: each worker's recent pace and last sign of life, stalled workers, and the
Prometheus text files a cluster's monitoring scrapes.

Workers rewrite their metrics on a timer (``run.metrics_interval_s``) and, with them, a
``prometheus/worker-RRRRR.prom`` file; rank 0 also writes ``prometheus/run.prom`` (units by state).
Point node_exporter's textfile collector (``--collector.textfile.directory``) at
``<run dir>/prometheus``. Files are replaced atomically, as the collector requires.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardinfer.ledger.rundir import FS, RunDir
from shardinfer.telemetry.metrics import WorkerMetrics

RECENT_S = 300.0  # the window of a worker's recent tokens/s
STALL_INTERVALS = 3  # a working worker silent for this many metrics intervals (and a minute) is stalled


@dataclass
class WorkerLive:
    rank: int
    host: str
    gpus: str | None
    device: str
    units: int
    rows: int
    tokens: int
    tokens_per_s_recent: float
    last_seen_s: float  # seconds since the worker last rewrote its metrics
    state: str  # loading | working | finished | drained | stalled


def recent_rate(timeline: dict[str, Any], now: float, window_s: float = RECENT_S) -> float:
    """Tokens per second finished over the last ``window_s`` (or since the worker started)."""
    if not timeline or not timeline.get("prompt"):
        return 0.0
    start, width = timeline["start"], timeline["bin_s"]
    since = max(now - window_s, start)
    tokens = sum(p + o for i, (p, o) in enumerate(zip(timeline["prompt"], timeline["output"]))
                 if start + (i + 1) * width > since)
    span = now - since
    return tokens / span if span > 0 else 0.0


def worker_live(m: WorkerMetrics, now: float, interval_s: float) -> WorkerLive:
    seen = now - (m.saved_at or m.started_at)
    if m.finished_at:
        state = "drained" if m.drained else "finished"
    elif seen > STALL_INTERVALS * interval_s + 60:
        state = "stalled"
    else:
        state = "working" if m.first_generate_at else "loading"
    return WorkerLive(rank=m.rank, host=m.host, gpus=m.gpus, device=m.device or "", units=m.units, rows=m.rows,
                      tokens=m.total_tokens, tokens_per_s_recent=round(recent_rate(m.timeline, now), 1),
                      last_seen_s=round(seen, 1), state=state)


# ---- Prometheus text format -----------------------------------------------------------------

def worker_values(m: WorkerMetrics, now: float) -> dict[str, float]:
    """What a worker reports to monitoring (Prometheus files, trackers)."""
    return {"units": m.units, "rows": m.rows, "prompt_tokens": m.prompt_tokens, "output_tokens": m.output_tokens,
            "tokens_per_s": round(recent_rate(m.timeline, now), 3), "last_update": round(now, 3),
            "finished": int(bool(m.finished_at))}


# (Prometheus name, type, help, key of worker_values)
_WORKER_METRICS = (
    ("shardinfer_units_total", "counter", "units the worker committed in this launch", "units"),
    ("shardinfer_rows_total", "counter", "rows the worker committed in this launch", "rows"),
    ("shardinfer_prompt_tokens_total", "counter", "prompt tokens of the committed rows", "prompt_tokens"),
    ("shardinfer_output_tokens_total", "counter", "output tokens of the committed rows", "output_tokens"),
    ("shardinfer_tokens_per_second", "gauge", f"tokens/s finished over the last {RECENT_S:.0f} s", "tokens_per_s"),
    ("shardinfer_last_update_timestamp_seconds", "gauge", "when the worker last wrote its metrics", "last_update"),
    ("shardinfer_worker_finished", "gauge", "1 once the worker has finished (or drained)", "finished"),
)


def write_worker_prom(run_dir: RunDir, m: WorkerMetrics, run_name: str, now: float) -> None:
    labels = {"run": run_name, "rank": str(m.rank), "launch": str(m.launch), "host": m.host,
              "device": m.device or "", "gpus": m.gpus or ""}
    values = worker_values(m, now)
    lines = []
    for name, kind, text, key in _WORKER_METRICS:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name}{_labels(labels)} {values[key]}"]
    _write(run_dir.prometheus / f"worker-{m.rank:05d}.prom", lines)


def write_run_prom(run_dir: RunDir, run_name: str, units: int, done: int, claimed: int) -> None:
    lines = ["# HELP shardinfer_units units of the run by state", "# TYPE shardinfer_units gauge"]
    for state, count in (("done", done), ("running", claimed), ("pending", max(units - done - claimed, 0))):
        lines.append(f"shardinfer_units{_labels({'run': run_name, 'state': state})} {count}")
    lines += ["# HELP shardinfer_run_updated_timestamp_seconds when these counts were taken",
              "# TYPE shardinfer_run_updated_timestamp_seconds gauge",
              f"shardinfer_run_updated_timestamp_seconds{_labels({'run': run_name})} {time.time():.3f}"]
    _write(run_dir.prometheus / "run.prom", lines)


def _labels(labels: dict[str, str]) -> str:
    escaped = (f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34)).replace(chr(10), " ")}"'
               for k, v in labels.items())
    return "{" + ",".join(escaped) + "}"


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with FS.scope("metrics"):
        FS.write_atomic(path, lambda fh: fh.write(("\n".join(lines) + "\n").encode()), fsync=False)
