"""``shardinfer bench --simulate``: many workers against one run directory, only the GPU simulated.

N real worker processes (forked from this one, so hundreds start in seconds and share memory) run
the real worker loop on a synthetic Parquet corpus: real plan, real ledger (claims, leases, commits,
idle watching), real parts and a real reduce. The engine sleeps as long as a GPU would take
(:mod:`shardinfer.bench.sim_engine`). Optionally every metadata operation is slowed down (a busy
Lustre metadata server) and some workers are killed with SIGKILL mid-run.

Reported: ledger time as a fraction of worker time, metadata operations per unit, operations per
idle-worker-second, time from the last commit to the reduce, the reduce itself, an exactly-once
check of the results, and a projection to 1,000 workers x 10M rows.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shardinfer.inputs.rows import import_lazy_modules
from shardinfer.launch.env import RankEnv
from shardinfer.launch.start import open_launch
from shardinfer.ledger.claims import Ledger
from shardinfer.ledger.rundir import FS
from shardinfer.ledger.scheduler import IDLE_LOOK_S, JITTER
from shardinfer.planning.validate import checked_from_dict
from shardinfer.reduce.merge import reduce_run
from shardinfer.telemetry.logs import setup_logging
from shardinfer.telemetry.metrics import load_metrics
from shardinfer.worker.loop import run_worker

log = logging.getLogger(__name__)

PROJECTED_WORKERS = 1000
PROJECTED_ROWS = 10_000_000
PROJECTED_ROW_TOKENS = 125 + 256  # ~500 characters in, max_tokens 256 out
PROJECTED_RATES = (5_000, 20_000, 40_000)  # tokens/s of one worker (one GPU replica)
PROJECTED_OP_S = 0.005  # a metadata operation on a busy Lustre
PROJECTED_FSYNC_S = 0.005


@dataclass
class SimOptions:
    out: Path
    workers: int = 200
    units: int = 4000
    rows: int = 100_000
    words: int = 60  # per row: prompt tokens of the sim tokenizer
    output_tokens: int = 16
    tokens_per_s: float = 4000.0  # of one simulated worker
    fs_latency_ms: float = 0.0  # added to every metadata operation
    lease_timeout_s: float = 30.0
    kill: int = 0  # workers killed with SIGKILL once a tenth of the units are done
    seed: int = 0


def run_simulation(opts: SimOptions) -> dict[str, Any]:
    from shardinfer.bench import sim_engine  # registers the sim engine (a plugin): only a simulation does

    opts.out.mkdir(parents=True, exist_ok=True)
    corpus = _corpus(opts)
    cfg = checked_from_dict(_config(opts, corpus))
    started = time.time()
    run_dir, plan, launch = open_launch(cfg, opts.workers)
    planned = time.time()
    sim_engine.TOKENS_PER_S = opts.tokens_per_s
    FS.latency_s = opts.fs_latency_ms / 1000
    _import_before_fork()
    pids = [_fork_worker(run_dir, rank, opts.workers, launch) for rank in range(opts.workers)]
    killed = _kill_some(run_dir, pids, opts, len(plan.units)) if opts.kill else []
    _wait(pids)
    workers_done = time.time()
    FS.latency_s = 0.0
    report = reduce_run(run_dir)
    reduced = time.time()
    result = _analyse(opts, run_dir, plan, report, killed,
                      {"plan_s": planned - started, "workers_s": workers_done - planned,
                       "reduce_s": reduced - workers_done, "workers_done_at": workers_done})
    (opts.out / "sim.json").write_text(json.dumps(result, indent=1))
    (opts.out / "sim.md").write_text(render_markdown(result))
    return result


def _corpus(opts: SimOptions) -> Path:
    path = opts.out / f"corpus-{opts.rows}x{opts.words}.parquet"
    if path.is_file():
        return path
    rng = np.random.default_rng(opts.seed)
    vocab = np.array([f"w{i}" for i in range(5000)])
    writer = None
    for start in range(0, opts.rows, 50_000):
        n = min(50_000, opts.rows - start)
        words = vocab[rng.integers(0, len(vocab), size=(n, opts.words))]
        table = pa.table({"id": pa.array([f"doc-{start + i:09d}" for i in range(n)]),
                          "text": pa.array([" ".join(w) for w in words])})
        writer = writer or pq.ParquetWriter(path, table.schema, compression="zstd")
        writer.write_table(table, row_group_size=8192)
    assert writer is not None
    writer.close()
    return path


def _config(opts: SimOptions, corpus: Path) -> dict[str, Any]:
    row_cost = opts.words + 4 + opts.output_tokens  # prompt (with the template) + output, estimated
    unit_tokens = max(1, opts.rows * row_cost // opts.units)
    return {
        "name": "sim", "input": {"path": str(corpus), "id_column": "id"},
        "prompt": {"mode": "raw", "user": "{text}"},
        "model": {"path": "sim", "engine": "sim", "max_model_len": 4096},
        "sampling": {"max_tokens": opts.output_tokens},
        "run": {"directory": str(opts.out / "run"), "workers": opts.workers, "unit_tokens": unit_tokens,
                "lease_timeout_s": opts.lease_timeout_s, "metrics_interval_s": 30.0, "log_interval_s": 3600.0},
    }


def _import_before_fork() -> None:
    """What the workers import when they first read input, imported once here: forked workers start
    with it instead of each importing it again (pyarrow's pandas shim alone takes ~0.3 s of CPU a
    process)."""
    import_lazy_modules()


def _fork_worker(run_dir: Any, rank: int, world: int, launch: int) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        FS.counts.clear()
        FS.seconds, FS.fsyncs = 0.0, 0
        setup_logging(rank=rank, world=world, log_file=run_dir.worker_log(rank))
        run_worker(run_dir, RankEnv(rank, world, 0, 0, "local", host=os.uname().nodename), launch=launch)
    except BaseException:
        logging.getLogger("shardinfer.sim").exception("worker %d failed", rank)
        code = 1
    finally:
        os._exit(code)


def _kill_some(run_dir: Any, pids: list[int], opts: SimOptions, units: int) -> list[int]:
    """SIGKILL ``opts.kill`` workers once a tenth of the units are committed."""
    ledger = Ledger(run_dir)
    while len(ledger.done_set()) < units // 10:
        time.sleep(0.5)
    victims = random.Random(opts.seed).sample(range(len(pids)), opts.kill)
    for rank in victims:
        os.kill(pids[rank], signal.SIGKILL)
    log.info("killed workers %s", victims)
    return victims


def _wait(pids: list[int]) -> None:
    for pid in pids:
        os.waitpid(pid, 0)


def _analyse(opts: SimOptions, run_dir: Any, plan: Any, report: dict[str, Any], killed: list[int],
             times: dict[str, float]) -> dict[str, Any]:
    # killed workers never wrote their last counts: per-unit figures are those of the survivors,
    # over the units they committed
    metrics = [m for m in load_metrics(run_dir) if m.rank not in killed]
    done = Ledger(run_dir).done_units()
    survivors = {f":rank{m.rank}" for m in metrics}
    units = sum(1 for r in done.values() if str(r.get("worker", "")).endswith(tuple(survivors)))
    busy = sum(m.busy_s - m.idle_s for m in metrics)
    work_ops = sum(_ledger_ops(m.fs_ops) - m.idle_fs_ops for m in metrics)
    metrics_ops = sum(n for m in metrics for k, n in m.fs_ops.items() if k.startswith("metrics:"))
    idle_ops = sum(m.idle_fs_ops - m.watch_fs_ops for m in metrics)  # idle workers that are not the watcher
    idle_s = sum(m.idle_s - m.watch_s for m in metrics)
    watch_ops, watch_s = sum(m.watch_fs_ops for m in metrics), sum(m.watch_s for m in metrics)
    ledger_s = sum(m.fs_seconds for m in metrics)
    by_kind: dict[str, int] = {}
    for m in metrics:
        for kind, n in m.fs_ops.items():
            by_kind[kind] = by_kind.get(kind, 0) + n
    last_commit = max(r["committed_at"] for r in done.values())
    results = pq.read_table(run_dir.results, columns=["id"])
    per_unit_ledger_s = ledger_s / units
    ops_per_unit, fsyncs_per_unit = work_ops / units, sum(m.fsyncs for m in metrics) / units
    projected_s = ops_per_unit * PROJECTED_OP_S + fsyncs_per_unit * PROJECTED_FSYNC_S
    rows_per_unit = PROJECTED_ROWS / (8 * PROJECTED_WORKERS)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "options": {**asdict(opts), "out": str(opts.out)},
        "command": "shardinfer " + " ".join(sys.argv[1:]),
        "units": len(plan.units), "units_counted": units, "rows": plan.total_rows, "workers": opts.workers,
        "killed": killed,
        "times_s": {k: round(v, 3) for k, v in times.items() if k != "workers_done_at"},
        "ledger_fraction_of_worker_time": round(ledger_s / busy, 5) if busy else None,
        "ledger_s_per_unit": round(per_unit_ledger_s, 5),
        "ops_per_unit": round(ops_per_unit, 2), "metrics_ops_per_unit": round(metrics_ops / units, 2),
        "fsyncs_per_unit": round(fsyncs_per_unit, 2),
        "ops_by_kind": dict(sorted(by_kind.items())),
        "idle_ops_by_kind": {k[5:]: n for k, n in sorted(by_kind.items()) if k.startswith("idle:")},
        "watch_ops_by_kind": {k[6:]: n for k, n in sorted(by_kind.items()) if k.startswith("watch:")},
        "idle_ops_per_worker_s": round(idle_ops / idle_s, 4) if idle_s else None,
        "idle_worker_s": round(idle_s, 1),
        "watcher_ops_per_s": round(watch_ops / watch_s, 2) if watch_s else None,
        "all_idle_ops_per_worker_s": round((idle_ops + watch_ops) / (idle_s + watch_s), 4) if idle_s else None,
        "protocol_ops_per_unit": 6,
        "last_commit_to_reduce_s": round(times["workers_done_at"] - last_commit, 3),
        "exactly_once": {"rows_in": plan.total_rows, "result_rows": results.num_rows,
                         "distinct_ids": pc.count_distinct(results.column("id")).as_py(),
                         "ok": report["rows"]["ok"]},
        "projection": {
            "workers": PROJECTED_WORKERS, "rows": PROJECTED_ROWS, "rows_per_unit": rows_per_unit,
            "op_s": PROJECTED_OP_S, "fsync_s": PROJECTED_FSYNC_S, "ledger_s_per_unit": round(projected_s, 5),
            "ledger_fraction_by_worker_tokens_per_s": {
                str(rate): round(projected_s / (rows_per_unit * PROJECTED_ROW_TOKENS / rate), 6)
                for rate in PROJECTED_RATES},
            "idle_ops_per_worker_s": round(1 / _steady_idle_wait_s(), 3),
            "idle_ops_per_s_all_workers": round(PROJECTED_WORKERS / _steady_idle_wait_s(), 1),
        },
    }


def _steady_idle_wait_s() -> float:
    """An idle worker's mean sleep between two looks once its backoff is at its longest (large runs)."""
    return IDLE_LOOK_S * sum(JITTER) / 2


def _ledger_ops(ops: dict[str, int]) -> int:
    return sum(n for k, n in ops.items() if not k.startswith("metrics:"))


def render_markdown(r: dict[str, Any]) -> str:
    o, p, e = r["options"], r["projection"], r["exactly_once"]
    fractions = ", ".join(f"{rate} tok/s: {f:.4%}" for rate, f in p["ledger_fraction_by_worker_tokens_per_s"].items())
    return "\n".join([
        "# shardinfer scale simulation", "",
        f"`{r['command']}`  ", f"{r['date']}: {r['workers']} worker processes, {r['units']} units, {r['rows']} rows; "
        f"{o['fs_latency_ms']} ms added to every metadata operation; {len(r['killed'])} worker(s) killed "
        f"(per-unit figures: the other workers, over the {r['units_counted']} units they committed).", "",
        "| measure | value |", "|---|---:|",
        f"| plan / workers / reduce (s) | {r['times_s']['plan_s']:.1f} / {r['times_s']['workers_s']:.1f} / "
        f"{r['times_s']['reduce_s']:.1f} |",
        f"| ledger time / worker time | {r['ledger_fraction_of_worker_time']:.4%} |",
        f"| ledger seconds per unit | {r['ledger_s_per_unit']:.4f} |",
        f"| ledger metadata operations per unit (claim, commit, scheduling) | {r['ops_per_unit']} |",
        f"| metrics-file operations per unit (on a timer) | {r['metrics_ops_per_unit']} |",
        f"| fsyncs per unit | {r['fsyncs_per_unit']} |",
        f"| operations per idle-worker-second (not the watcher) | {r['idle_ops_per_worker_s']} |",
        f"| operations per second of the watcher | {r['watcher_ops_per_s']} |",
        f"| operations per idle-worker-second, the watcher included | {r['all_idle_ops_per_worker_s']} |",
        f"| last commit to reduce (s) | {r['last_commit_to_reduce_s']} |",
        f"| results: rows, distinct ids (input rows) | {e['result_rows']}, {e['distinct_ids']} ({e['rows_in']}) |", "",
        f"Operations by kind: {r['ops_by_kind']}", "",
        f"Of which idle workers' (not the watcher): {r['idle_ops_by_kind']}; the watcher's: {r['watch_ops_by_kind']}", "",
        f"Projection to {p['workers']} workers x {p['rows']:,} rows ({p['rows_per_unit']:.0f} rows per unit, "
        f"{PROJECTED_ROW_TOKENS} tokens per row): the operations per unit measured here at {p['op_s'] * 1000:g} ms each "
        f"plus the fsyncs at {p['fsync_s'] * 1000:g} ms = {p['ledger_s_per_unit']:.3f} s of ledger time per unit, against "
        f"the unit's work at a worker's tokens/s: {fractions}. "
        f"Idle workers: {p['idle_ops_per_worker_s']} operations/s each, {p['idle_ops_per_s_all_workers']} in all.", "",
    ])
