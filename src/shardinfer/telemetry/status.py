"""``shardinfer status RUN_DIR``: how far a run is, how fast it goes, and its launches' jobs."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from shardinfer.errors import ConfigError
from shardinfer.launch.registry import launcher_of
from shardinfer.launch.start import launch_records
from shardinfer.ledger.claims import Ledger
from shardinfer.ledger.rundir import RunDir
from shardinfer.ledger.runstate import load_run
from shardinfer.planning.plan import Plan
from shardinfer.reduce.result_set import published_problem
from shardinfer.results import RowCounts
from shardinfer.telemetry.live import WorkerLive, worker_live
from shardinfer.telemetry.metrics import WorkerMetrics, load_metrics


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
    workers: list[WorkerLive] = field(default_factory=list)  # of the latest launch
    stalled: list[int] = field(default_factory=list)  # ranks of workers silent too long
    results_problem: str | None = None  # every unit done, but results/ is not the complete set

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["counts"] = {**self.counts.to_record()}
        return data


def run_status(run_dir: RunDir) -> RunStatus:
    cfg, plan = load_run(run_dir)
    ledger = Ledger(run_dir)
    done = ledger.done_units(repair=False)  # status only looks
    running = len(set(ledger.claims()) - set(done))
    counts = sum((RowCounts.from_record(r) for r in done.values()), RowCounts())
    metrics = load_metrics(run_dir)  # read once: the pace and the workers both come from it
    rate, eta = _speed(metrics, plan, done)
    workers = _workers(metrics, cfg.run.metrics_interval_s)
    all_done = len(done) == len(plan.units)
    problem = published_problem(run_dir, plan.total_rows) if all_done else None
    return RunStatus(
        run_dir=str(run_dir.path), units=len(plan.units), done=len(done), running=running,
        pending=len(plan.units) - len(done) - running, rows=plan.total_rows, counts=counts,
        tokens_per_s=rate, eta_s=eta, jobs=_jobs(run_dir),
        finished=all_done and problem is None and run_dir.report_json.is_file(),
        results_problem=problem, workers=workers, stalled=[w.rank for w in workers if w.state == "stalled"],
    )


def _workers(metrics: list[WorkerMetrics], interval_s: float) -> list[WorkerLive]:
    """The workers of the latest launch (and SLURM restart), as they are now."""
    if not metrics:
        return []
    latest = max(m.key for m in metrics)
    now = time.time()
    return [worker_live(m, now, interval_s) for m in sorted(metrics, key=lambda m: m.rank) if m.key == latest]


def _speed(metrics: list[WorkerMetrics], plan: Plan, done: dict[int, Any]) -> tuple[float, float | None]:
    """Tokens per second of the latest launch, and the time left at that pace (by estimated cost)."""
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
            states = launcher_of(record).states(record)
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
    if s.workers:
        lines.append("workers (latest launch): rank, host, device, units, rows, tok/s over the last 5 min, "
                     "last seen, state")
        lines += [f"  {w.rank:5d}  {w.host}  {w.device or '?'}  {w.units}  {w.rows}  {w.tokens_per_s_recent:,.0f}  "
                  f"{_duration(w.last_seen_s)} ago  {w.state.upper() if w.state == 'stalled' else w.state}"
                  for w in s.workers]
    if s.results_problem:
        lines.append(f"results: not published whole ({s.results_problem}); "
                     f"`shardinfer reduce {s.run_dir}` writes them again")
    if s.stalled:
        lines.append(f"stalled: worker(s) {', '.join(map(str, s.stalled))} wrote no metrics for a long time "
                     f"(hung engine, lost node?); their units are taken over once their leases expire")
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
