"""The benchmark's Markdown table and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shardinfer.reduce.plot import Series, plot_bars, plot_rates


def write_plots(out: Path, result: dict[str, Any]) -> dict[str, str]:
    plots = {}
    series: dict[str, Series] = {name: [(float(t), float(r)) for t, r in run["timeline"]["points"]]
                                 for name, run in result["runs"].items()}
    shape = result["shape"]
    title = (f"{Path(result['model']).name}: {shape['docs']} docs, {shape['input_len'][0]}-{shape['input_len'][1]} "
             f"prompt tokens, {shape['output_len']} output tokens")
    path = plot_rates(out / "bench.png", series, title=title, note="total tokens/s, rows counted when they finish")
    if path:
        plots["throughput"] = path.name
    if result.get("strategies"):
        path = plot_bars(out / "strategies.png",
                         {name: run["tokens_per_s"]["total"] for name, run in result["strategies"].items()},
                         title=f"batching strategies, {next(iter(result['strategies'].values()))['rows']} docs",
                         ylabel="total tokens / s")
        if path:
            plots["strategies"] = path.name
    return plots


def render_markdown(r: dict[str, Any]) -> str:
    s = r["shape"]
    lines = [
        f"# shardinfer bench: {r['model']}", "",
        f"`{r['command']}`  ", f"{r['date']} on {r.get('device', 'this machine')}; engine {r['engine']}, "
        f"max_model_len {r['max_model_len']}, engine arguments `{r['engine_args']}`.", "",
        f"{s['docs']} documents, prompts of {s['prompt_len_min']}-{s['prompt_len_max']} tokens "
        f"(mean {s['prompt_len_mean']}, {s['prompt_tokens']} in all), {s['output_len']} output tokens each.", "",
        *_table(r["runs"]), "",
        *_engine_table(r["runs"]),
    ]
    if r.get("ratio"):
        lines += [f"Pipeline / baseline, total tokens per second per replica: generation "
                  f"{r['ratio']['generation_per_replica']:.3f}, end to end {r['ratio']['end_to_end_per_replica']:.3f}.", ""]
    if r.get("plots", {}).get("throughput"):
        lines += [f"![tokens per second over time]({r['plots']['throughput']})", ""]
    if r.get("strategies"):
        lines += ["## Batching strategies (one vLLM engine, the same documents)", "", *_table(r["strategies"]), ""]
        if r.get("plots", {}).get("strategies"):
            lines += [f"![batching strategies]({r['plots']['strategies']})", ""]
    lines += [_versions(r), ""]
    return "\n".join(lines)


def _engine_table(runs: dict[str, Any]) -> list[str]:
    """The engine's settings in effect and what its scheduler did, per run (vLLM's own stats)."""
    rows = [(name, run["engine"]) for name, run in runs.items() if run.get("engine")]
    if not rows:
        return []
    lines = ["Engine settings in effect and what the scheduler did (vLLM's stats; requests' prefill, decode and "
             "queue seconds are summed over requests):", "",
             "| run | max_num_seqs | max_num_batched_tokens | KV-cache tokens | prefix caching | chunked prefill | "
             "preemptions | prefix-cache hits | running mean / max | waiting mean / max | prefill s | decode s | queue s |",
             "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, engine in rows:
        s, d = engine.get("settings") or {}, engine.get("scheduler") or {}
        hits = d.get("prefix_cache_hit_rate")
        lines.append(
            f"| {name} | {s.get('max_num_seqs', '')} | {s.get('max_num_batched_tokens', '')} | "
            f"{s.get('kv_cache_tokens', '')} | {s.get('prefix_caching', '')} | {s.get('chunked_prefill', '')} | "
            f"{d.get('preemptions', '')} | {'' if hits is None else f'{hits:.1%}'} | "
            f"{d.get('running_mean', '')} / {d.get('running_max', '')} | {d.get('waiting_mean', '')} / "
            f"{d.get('waiting_max', '')} | {d.get('prefill_s', '')} | {d.get('decode_s', '')} | {d.get('queue_s', '')} |")
    return [*lines, ""]


def _table(runs: dict[str, Any]) -> list[str]:
    lines = ["| run | rows | start-up s | steady s | tail s | generation s | input tok/s | output tok/s | "
             "total tok/s | end-to-end tok/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, run in runs.items():
        label = f"{name} ({run['workers']} worker{'s' if run['workers'] > 1 else ''})" if "workers" in run else name
        p, t = run["phases"], run["tokens_per_s"]
        lines.append(f"| {label} | {run['rows']} | {run['startup_s']:.1f} | {p['steady_s']:.1f} | {p['tail_s']:.1f} | "
                     f"{run['generation_s']:.1f} | {t['input']:.0f} | {t['output']:.0f} | {t['total']:.0f} | "
                     f"{run['end_to_end_tokens_per_s']:.0f} |")
    return lines


def _versions(r: dict[str, Any]) -> str:
    versions = {"shardinfer": r["shardinfer"], "python": r["python"], **r.get("versions", {}),
                **r["runs"].get("pipeline", {}).get("versions", {})}
    return "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())
