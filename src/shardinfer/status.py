"""``shardinfer status RUN_DIR``: how far a run is, how fast it goes, and its launches' jobs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from shardinfer.errors import ConfigError
from shardinfer.launch.registry import get_launcher
from shardinfer.launch.start import launch_records
from shardinfer.ledger import Ledger
from shardinfer.metrics import load_metrics
from shardinfer.plan import Plan
from shardinfer.results import RowCounts
from shardinfer.rundir import RunDir
from shardinfer.runstate import load_run


@dataclass
class RunStatus:
    run_dir: str
    units: int
    done: int
    running: int
    pending: int
    rows: int
    counts: RowCounts
    tokens_per_s: float
    eta_s: float | None
    jobs: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False


def run_status(run_dir: RunDir) -> RunStatus:
    _, plan = load_run(run_dir)
    done = Ledger(run_dir).done_units()
    running = len(set(Ledger(run_dir).claims()) - set(done))
    counts = sum((RowCounts.from_record(r) for r in done.values()), RowCounts())
    rate, eta = _speed(run_dir, plan, done)
    return RunStatus(
        run_dir=str(run_dir.path), units=len(plan.units), done=len(done), running=running,
        pending=len(plan.units) - len(done) - running, rows=plan.total_rows, counts=counts,
        tokens_per_s=rate, eta_s=eta, jobs=_jobs(run_dir),
        finished=run_dir.report_json.is_file() and len(done) == len(plan.units),
    )


def _speed(run_dir: RunDir, plan: Plan, done: dict[int, Any]) -> tuple[float, float | None]:
    """Tokens per second of the latest launch, and the time left at that pace (by estimated cost)."""
    metrics = load_metrics(run_dir)
    if not metrics:
        return 0.0, None
    launch = max(m.launch for m in metrics)
    current = [m for m in metrics if m.launch == launch]
    elapsed = max(m.finished_at or time.time() for m in current) - min(m.started_at for m in current)
    tokens = sum(m.total_tokens for m in current)
    rate = tokens / elapsed if elapsed > 0 else 0.0
    cost_done_now = sum(u.cost for u in plan.units if done.get(u.unit, {}).get("launch") == launch)
    cost_left = sum(u.cost for u in plan.units if u.unit not in done)
    if not cost_left:
        return rate, 0.0
    cost_rate = cost_done_now / elapsed if elapsed > 0 else 0.0
    return rate, (cost_left / cost_rate if cost_rate > 0 else None)


def _jobs(run_dir: RunDir) -> list[dict[str, Any]]:
    """Each launch's record with the states its launcher reports (SLURM jobs; none for local ones)."""
    out = []
    for record in launch_records(run_dir):
        try:
            states = get_launcher(record.launcher).states(record)
        except ConfigError:
            states = {}
        out.append({**record.to_json(), "states": states})
    return out


def describe_status(s: RunStatus) -> str:
    eta = "done" if s.eta_s == 0 else ("unknown" if s.eta_s is None else _duration(s.eta_s))
    c = s.counts
    lines = [
        f"run: {s.run_dir}{'  (finished: results and report written)' if s.finished else ''}",
        f"units: {s.done} done, {s.running} running, {s.pending} pending, of {s.units}",
        f"rows: {c.rows} of {s.rows} done (" + ", ".join(f"{n} {k}" for k, n in c.by_status().items()) + ")",
        f"tokens: {c.prompt_tokens} prompt + {c.output_tokens} output; {s.tokens_per_s:,.0f} tokens/s "
        f"(latest launch); ETA {eta}",
    ]
    for job in s.jobs:
        lines.append(f"launch {job['launch']} ({job['launcher']}): " + _job_states(job))
    return "\n".join(lines)


def _job_states(job: dict[str, Any]) -> str:
    ids, states = job["job_ids"], job["states"]
    if not ids:
        return f"process {job['pid']} on {job['host']}"
    if len(ids) == 2:
        return (f"worker job {ids[0]} {states.get(ids[0], 'UNKNOWN')}, "
                f"reduce job {ids[1]} {states.get(ids[1], 'UNKNOWN')}")
    return ", ".join(f"job {j} {states.get(j, 'UNKNOWN')}" for j in ids)


def _duration(seconds: float) -> str:
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"
