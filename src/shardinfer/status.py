"""``shardinfer status RUN_DIR``: how far a run is, how fast it goes, and its SLURM jobs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from shardinfer.ledger import Ledger
from shardinfer.report import load_metrics
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
    rows_done: int
    by_status: dict[str, int]
    prompt_tokens: int
    output_tokens: int
    tokens_per_s: float
    eta_s: float | None
    jobs: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False


def run_status(run_dir: RunDir) -> RunStatus:
    _, plan = load_run(run_dir)
    ledger = Ledger(run_dir)
    done = ledger.done_units()
    claimed = {int(p.stem.split("-")[1]) for p in run_dir.claims.glob("unit-*.json")}
    running = len(claimed - set(done))
    totals = {k: sum(r.get(k, 0) for r in done.values())
              for k in ("rows", "ok", "truncated", "failed", "prompt_tokens", "output_tokens")}
    rate, eta = _speed(run_dir, plan, done)
    return RunStatus(
        run_dir=str(run_dir.path), units=len(plan.units), done=len(done), running=running,
        pending=len(plan.units) - len(done) - running, rows=plan.total_rows, rows_done=totals["rows"],
        by_status={k: totals[k] for k in ("ok", "truncated", "failed")}, prompt_tokens=totals["prompt_tokens"],
        output_tokens=totals["output_tokens"], tokens_per_s=rate, eta_s=eta, jobs=_jobs(run_dir),
        finished=run_dir.report_json.is_file() and len(done) == len(plan.units),
    )


def _speed(run_dir: RunDir, plan: Any, done: dict[int, Any]) -> tuple[float, float | None]:
    """Tokens per second of the latest launch, and the time left at that pace (by estimated cost)."""
    metrics = load_metrics(run_dir)
    if not metrics:
        return 0.0, None
    launch = max(m["launch"] for m in metrics)
    current = [m for m in metrics if m["launch"] == launch]
    elapsed = max(time.time() if not m.get("finished_at") else m["finished_at"] for m in current) - min(
        m["started_at"] for m in current)
    tokens = sum(m["prompt_tokens"] + m["output_tokens"] for m in current)
    rate = tokens / elapsed if elapsed > 0 else 0.0
    cost_done_now = sum(u.cost for u in plan.units if done.get(u.unit, {}).get("launch") == launch)
    cost_left = sum(u.cost for u in plan.units if u.unit not in done)
    if not cost_left:
        return rate, 0.0
    cost_rate = cost_done_now / elapsed if elapsed > 0 else 0.0
    return rate, (cost_left / cost_rate if cost_rate > 0 else None)


def _jobs(run_dir: RunDir) -> list[dict[str, Any]]:
    from shardinfer.launch.sbatch import SubmitError, job_states
    from shardinfer.launch.submit import recorded_jobs

    jobs = recorded_jobs(run_dir)
    if not jobs:
        return []
    ids = [j for rec in jobs for j in (rec["worker_job"], rec["reduce_job"])]
    try:
        states = job_states(ids)
    except (OSError, SubmitError):
        states = {}
    return [{**rec, "worker_state": states.get(rec["worker_job"], "UNKNOWN"),
             "reduce_state": states.get(rec["reduce_job"], "UNKNOWN")} for rec in jobs]


def describe_status(s: RunStatus) -> str:
    eta = "done" if s.eta_s == 0 else ("unknown" if s.eta_s is None else _duration(s.eta_s))
    lines = [
        f"run: {s.run_dir}{'  (finished: results and report written)' if s.finished else ''}",
        f"units: {s.done} done, {s.running} running, {s.pending} pending, of {s.units}",
        f"rows: {s.rows_done} of {s.rows} done ({s.by_status['ok']} ok, {s.by_status['truncated']} truncated, "
        f"{s.by_status['failed']} failed)",
        f"tokens: {s.prompt_tokens} prompt + {s.output_tokens} output; {s.tokens_per_s:,.0f} tokens/s "
        f"(latest launch); ETA {eta}",
    ]
    for job in s.jobs:
        lines.append(f"launch {job['launch']} ({job['launcher']}): worker job {job['worker_job']} "
                     f"{job['worker_state']}, reduce job {job['reduce_job']} {job['reduce_state']}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"
