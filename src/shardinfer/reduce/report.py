"""The run report: rows, tokens, times, phases, throughput over time and cost, overall and per worker
(JSON, Markdown and a PNG plot of tokens per second)."""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from collections import defaultdict
from typing import Any

import pyarrow

from shardinfer import __version__
from shardinfer.config import Config
from shardinfer.engines.registry import get_engine
from shardinfer.ledger.rundir import RunDir, write_json_atomic
from shardinfer.models.tasks import pooled_shape
from shardinfer.planning.plan import Plan
from shardinfer.reduce.plot import plot_rates
from shardinfer.results import STATUSES, Totals
from shardinfer.telemetry.metrics import WorkerMetrics, load_metrics
from shardinfer.telemetry.timeline import Timeline, merge, phases, rates, smooth


def build_report(cfg: Config, plan: Plan, run_dir: RunDir, totals: Totals) -> dict[str, Any]:
    metrics = load_metrics(run_dir)
    timeline, first_request, end = run_timeline(metrics)
    wall = _wall_time(metrics)
    generation = _generation_span(metrics)
    tokens = {"prompt": totals.prompt_tokens, "output": totals.output_tokens, "total": totals.total_tokens}
    return {
        "run": cfg.name,
        "task": cfg.task,
        "run_dir": str(run_dir.path.resolve()),
        "results": str(run_dir.results.absolute()),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": {"in": plan.total_rows, **totals.by_status()},
        "failed_by_reason": dict(sorted(totals.reasons.items())),
        "tokens": tokens,
        "time_s": {"wall": round(wall, 3), "model_load": round(max((m.model_load_s for m in metrics), default=0), 3),
                   "generation": round(generation, 3)},
        "tokens_per_s": _rates(tokens, wall),
        "generation_tokens_per_s": _rates(tokens, generation),
        "throughput": {"rows_per_s": round(totals.rows / wall, 1) if wall > 0 else 0.0,
                       "generation_rows_per_s": round(totals.rows / generation, 1) if generation > 0 else 0.0},
        **_embeddings(cfg, totals),
        "phases_s": phases(timeline, first_request, end),
        "timeline": {**_timeline(timeline), "per_worker": _per_worker(metrics, timeline)},
        "cost": _cost(metrics, tokens, cfg.run.gpu_hour_price),
        "workers": _flag_slow([_worker_row(m) for m in metrics]),
        "launches": len({m.key for m in metrics}),
        "model": {"path": cfg.model.path, "engine": cfg.model.engine, "dtype": cfg.model.dtype,
                  "max_model_len": plan.max_model_len, "engine_args": get_engine(cfg.model.engine).args(cfg.model)},
        "sampling": dataclasses.asdict(cfg.sampling),
        "versions": _versions(metrics),
        "input": {"files": len(plan.files), "rows": plan.total_rows, "duplicate_ids": len(plan.duplicates),
                  "rows_with_replaced_utf8": plan.replaced_utf8},
    }


def _embeddings(cfg: Config, totals: Totals) -> dict[str, Any]:
    """An embedding run's output: how many embeddings, their size and type, and their bytes."""
    shape = pooled_shape(cfg)
    if shape is None or shape.task != "embed":
        return {}
    count = totals.ok + totals.truncated
    width = 2 if shape.dtype == "float16" else 4
    return {"embeddings": {"count": count, "dimensions": shape.dim, "dtype": shape.dtype,
                           "bytes": count * shape.dim * width if shape.dim else None}}


def _by_launch(metrics: list[WorkerMetrics]) -> list[list[WorkerMetrics]]:
    groups: dict[tuple[int, int], list[WorkerMetrics]] = defaultdict(list)
    for m in metrics:
        groups[m.key].append(m)
    return list(groups.values())


def _wall_time(metrics: list[WorkerMetrics]) -> float:
    """Summed over launches: first worker start to last worker end of each launch."""
    return sum(max(m.end for m in g) - min(m.started_at for m in g) for g in _by_launch(metrics))


def _generation_span(metrics: list[WorkerMetrics]) -> float:
    """Summed over launches: first generate call to the end of the last one."""
    spans = 0.0
    for group in _by_launch([m for m in metrics if m.first_generate_at]):
        spans += max(m.last_generate_end or m.end for m in group) - min(m.first_generate_at or 0 for m in group)
    return spans


def run_timeline(metrics: list[WorkerMetrics], start: float | None = None) -> tuple[Timeline, float | None, float]:
    """All workers' tokens per time bin on one clock from ``start`` (default: the first worker
    start), the first request any worker sent, and the last worker's end."""
    if start is None:
        start = min((m.started_at for m in metrics), default=0.0)
    merged = merge([m.timeline for m in metrics if m.timeline], start=start)
    firsts = [m.first_generate_at for m in metrics if m.first_generate_at]
    return merged, min(firsts, default=None), max((m.end for m in metrics), default=start)


def _timeline(timeline: Timeline) -> dict[str, Any]:
    """Input and output tokens per second over time, all workers together."""
    series = rates(timeline)
    return {"bin_s": timeline.bin_s, "t": [round(t, 3) for t, _, _ in series],
            "input_tokens_per_s": [round(i, 1) for _, i, _ in series],
            "output_tokens_per_s": [round(o, 1) for _, _, o in series]}


MAX_WORKER_LINES = 16


def _per_worker(metrics: list[WorkerMetrics], run: Timeline) -> dict[str, list[float]]:
    """Each worker's total tokens/s on the run's bins (runs of up to MAX_WORKER_LINES workers)."""
    if len(metrics) > MAX_WORKER_LINES or len(metrics) < 2:
        return {}
    out = {}
    for m in metrics:
        if not m.timeline:
            continue
        own = merge([m.timeline], start=run.start).coarsen_to(run.bin_s)
        totals = [round((p + o) / own.bin_s, 1) for p, o in zip(own.prompt, own.output)]
        out[f"rank {m.rank}" + (f" (launch {m.launch})" if m.launch else "")] = totals
    return out


def _cost(metrics: list[WorkerMetrics], tokens: dict[str, int], price: float | None) -> dict[str, Any] | None:
    """Device-hours (GPUs held by each worker, or the worker itself on CPU) times the price; each
    per-million figure charges the whole cost to that kind of token."""
    if price is None:
        return None
    gpus = sum(m.gpu_count for m in metrics)
    hours = sum(m.busy_s * max(m.gpu_count, 1) for m in metrics) / 3600
    total = hours * price
    per_million = {k: round(total / tokens[k] * 1e6, 6) if tokens[k] else None for k in ("prompt", "output", "total")}
    return {"gpu_hour_price": price, "device": "GPU" if gpus else "CPU worker", "device_hours": round(hours, 6),
            "total": round(total, 4), "per_million_input_tokens": per_million["prompt"],
            "per_million_output_tokens": per_million["output"], "per_million_tokens": per_million["total"]}


def _rates(tokens: dict[str, int], seconds: float) -> dict[str, float]:
    if seconds <= 0:
        return {"input": 0.0, "output": 0.0, "total": 0.0}
    return {"input": round(tokens["prompt"] / seconds, 1), "output": round(tokens["output"] / seconds, 1),
            "total": round(tokens["total"] / seconds, 1)}


def _worker_row(m: WorkerMetrics) -> dict[str, Any]:
    tokens = {"prompt": m.prompt_tokens, "output": m.output_tokens, "total": m.total_tokens}
    return {"launch": m.launch, "rank": m.rank, "host": m.host, "device": m.device, "gpus": m.gpus,
            "units": m.units, "rows": m.rows,
            "prompt_tokens": m.prompt_tokens, "output_tokens": m.output_tokens,
            "model_load_s": round(m.model_load_s, 3), "generation_s": round(m.generation_s, 3),
            "wall_s": round(m.busy_s, 3), "tokens_per_s": _rates(tokens, m.busy_s),
            "generation_tokens_per_s": _rates(tokens, m.generation_s),
            "finished": bool(m.finished_at), **({"replica_hosts": m.replica_hosts} if m.replica_hosts else {})}


SLOW_FRACTION = 0.5  # a worker below this fraction of its launch's median generation tok/s is flagged


def _flag_slow(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mark workers much slower than the others of their launch (a bad GPU, a busy node, a thermal
    throttle): their generation tokens/s is under half the launch's median."""
    for launch in {r["launch"] for r in rows}:
        mine = [r for r in rows if r["launch"] == launch and r["generation_s"] > 0]
        if len(mine) < 2:
            continue
        median = statistics.median(r["generation_tokens_per_s"]["total"] for r in mine)
        for r in mine:
            r["slow"] = r["generation_tokens_per_s"]["total"] < SLOW_FRACTION * median
    for r in rows:
        r.setdefault("slow", False)
    return rows


def _versions(metrics: list[WorkerMetrics]) -> dict[str, str]:
    versions = {"shardinfer": __version__, "python": platform.python_version(), "pyarrow": pyarrow.__version__}
    for m in metrics:
        versions.update(m.versions)
    return versions


def write_report(run_dir: RunDir, report: dict[str, Any]) -> None:
    line = report["timeline"]
    report["plot"] = None
    if line["t"]:
        written = plot_rates(run_dir.throughput_png, _plot_series(line),
                             title=f"{report['run']}: tokens per second (rolling mean over "
                                   f"{_window(line) * line['bin_s']:g} s)")
        report["plot"] = written.name if written else None
    write_json_atomic(run_dir.report_json, report)
    tmp = run_dir.report_md.with_name(".report.md.tmp")
    tmp.write_text(render_markdown(report))
    tmp.replace(run_dir.report_md)


def _window(line: dict[str, Any]) -> int:
    """Bins in the rolling mean: about 2% of the run, at least one."""
    return max(len(line["t"]) // 50, 1)


def _plot_series(line: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """Rolling means (single bins are noise: a bin holds the rows that happened to finish in it):
    total, input and output, and one line per worker when there are a few."""
    half = _window(line) // 2
    t = line["t"]
    inputs, outputs = line["input_tokens_per_s"], line["output_tokens_per_s"]
    series = {"total": list(zip(t, smooth([i + o for i, o in zip(inputs, outputs)], half))),
              "input": list(zip(t, smooth(inputs, half))), "output": list(zip(t, smooth(outputs, half)))}
    for name, totals in (line.get("per_worker") or {}).items():
        series[name] = list(zip(t, smooth(totals[: len(t)], half)))
    return series


def render_markdown(r: dict[str, Any]) -> str:
    rows, tok, t = r["rows"], r["tokens"], r["time_s"]
    lines = [
        f"# shardinfer report: {r['run']}", "",
        f"Results: `{r['results']}`  ", f"Finished: {r['finished_at']}", "",
        "| rows in | " + " | ".join(STATUSES) + " |", "|---:" * (len(STATUSES) + 1) + "|",
        f"| {rows['in']} | " + " | ".join(str(rows[s]) for s in STATUSES) + " |", "",
    ]
    if r["failed_by_reason"]:
        lines += ["Failed rows by reason: " + ", ".join(f"{k} {v}" for k, v in r["failed_by_reason"].items()), ""]
    lines += [
        "| | prompt | output | total |", "|---|---:|---:|---:|",
        f"| tokens | {tok['prompt']} | {tok['output']} | {tok['total']} |",
        _rate_line("tokens/s (wall)", r["tokens_per_s"]),
        _rate_line("tokens/s (generation)", r["generation_tokens_per_s"]), "",
        f"Wall time {t['wall']:.1f} s, model load {t['model_load']:.1f} s, generation {t['generation']:.1f} s, "
        f"{r['launches']} launch(es).", "",
        *_task_lines(r),
        _phases_line(r["phases_s"]), "",
        *_cost_lines(r["cost"]),
        *([f"![tokens per second over time]({r['plot']})", ""] if r.get("plot") else []),
        "| launch | rank | host | device | units | rows | load s | generation s | wall s | total tok/s | |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for w in r["workers"]:
        lines.append(f"| {w['launch']} | {w['rank']} | {w['host']} | {w.get('device') or '?'} | {w['units']} | "
                     f"{w['rows']} | {w['model_load_s']:.1f} | {w['generation_s']:.1f} | {w['wall_s']:.1f} | "
                     f"{w['tokens_per_s']['total']:.0f} | {'**slow**' if w.get('slow') else ''} |")
    slow = [w for w in r["workers"] if w.get("slow")]
    if slow:
        lines += ["", f"Slow workers (under {SLOW_FRACTION:.0%} of their launch's median generation tok/s): "
                  + ", ".join(f"rank {w['rank']} on {w['host']} ({w.get('device') or '?'})" for w in slow)
                  + ". Check those nodes' GPUs."]
    if r["input"]["rows_with_replaced_utf8"]:
        lines += ["", f"{r['input']['rows_with_replaced_utf8']} row(s) had invalid UTF-8 replaced by U+FFFD."]
    m = r["model"]
    lines += ["", f"Model `{m['path']}`, engine {m['engine']}, dtype {m['dtype']}, max_model_len {m['max_model_len']}.",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()), ""]
    return "\n".join(lines)


def _task_lines(r: dict[str, Any]) -> list[str]:
    """Rows per second, and for an embedding run what it produced."""
    rate = r.get("throughput") or {}
    lines = [f"Task {r.get('task', 'generate')}: {rate.get('rows_per_s', 0):.1f} rows/s (wall), "
             f"{rate.get('generation_rows_per_s', 0):.1f} rows/s (generation)."]
    e = r.get("embeddings")
    if e:
        size = f", {e['bytes'] / 1e6:.1f} MB" if e.get("bytes") is not None else ""
        lines[0] += f" {e['count']} embeddings of {e['dimensions'] or '?'} {e['dtype']} values{size}."
    return [*lines, ""]


def _phases_line(p: dict[str, float]) -> str:
    return (f"Phases: start-up {p['startup_s']:.1f} s, steady state {p['steady_s']:.1f} s at "
            f"{p['steady_tokens_per_s']:.0f} tokens/s, tail {p['tail_s']:.1f} s (below half the steady rate).")


def _cost_lines(c: dict[str, Any] | None) -> list[str]:
    if not c:
        return []
    def money(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"
    return [f"Cost: {c['device_hours']:.3f} {c['device']}-hours x {c['gpu_hour_price']:g} = {c['total']:.2f}; "
            f"per million input tokens {money(c['per_million_input_tokens'])}, per million output tokens "
            f"{money(c['per_million_output_tokens'])}, per million tokens {money(c['per_million_tokens'])} "
            "(each figure charges the whole cost to that kind of token).", ""]


def _rate_line(label: str, rates: dict[str, float]) -> str:
    return f"| {label} | {rates['input']:.1f} | {rates['output']:.1f} | {rates['total']:.1f} |"
