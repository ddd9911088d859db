"""Scale measurements of the data path: big synthetic corpora, planning them, reading one unit,
and reducing millions of result rows. The figures in jobs/benchmarks.md ("Scale") come from here.

    python jobs/scale_bench.py corpus --rows 10000000 --format parquet OUT/docs.parquet
    python jobs/scale_bench.py corpus --rows 100000 --files 100 --format parquet OUT/many/
    python jobs/scale_bench.py plan OUT/docs.parquet            # wall time and peak RSS of planning
    python jobs/scale_bench.py plan OUT/docs.jsonl --index OUT/index   # as a run plans (input checksums)
    python jobs/scale_bench.py read OUT/docs.parquet            # one unit's read: first, middle, last
    python jobs/scale_bench.py reduce --rows 10000000 OUT/reduce-run
    python jobs/scale_bench.py early-fail OUT/docs.parquet --model .cache/tiny-qwen3   # rows that all fail
    python jobs/scale_bench.py pipeline --rows 100000 --tokens 500 --model .cache/tiny-qwen3   # cost per row
    python jobs/scale_bench.py tokenize --rows 100000 --tokens 500 --model .cache/tiny-qwen3   # its floor

Each measurement runs in a fresh process and reports its wall time and peak RSS (VmHWM), plus
the RSS of the bare interpreter with the modules imported, so "above the interpreter" can be read
off. The synthetic text is ~500 characters of words per row (--chars).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

WORDS = np.array([f"{w}{i}" for i in range(400) for w in ("data", "model", "unit", "text", "row")])
POOL = 100_000  # distinct texts, repeated over the corpus in shuffled order


def _pool(chars: int, seed: int = 0) -> pa.Array:
    rng = np.random.default_rng(seed)
    words = max(chars // 8, 1)
    picks = WORDS[rng.integers(0, len(WORDS), size=(POOL, words))]
    return pa.array([" ".join(p)[:chars] for p in picks])


def _chunk(pool: pa.Array, start: int, n: int, rng: np.random.Generator) -> pa.Table:
    ids = pc.binary_join_element_wise("doc-", pc.utf8_lpad(pa.array(np.arange(start, start + n)).cast(pa.string()), 10, "0"), "")
    return pa.table({"id": ids, "text": pool.take(pa.array(rng.integers(0, len(pool), size=n)))})


def make_corpus(args: argparse.Namespace) -> None:
    out = Path(args.out)
    pool = _pool(args.chars)
    rng = np.random.default_rng(1)
    per_file = -(-args.rows // args.files)
    paths = [out] if args.files == 1 else [out / f"part-{i:04d}.{_suffix(args.format)}" for i in range(args.files)]
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    for i, path in enumerate(paths):
        first, rows = i * per_file, min(per_file, args.rows - i * per_file)
        if args.format == "parquet":
            _write_parquet(path, pool, first, rows, args.row_group, rng)
        else:
            _write_jsonl(path, pool, first, rows, rng)
    print(json.dumps({"rows": args.rows, "files": args.files, "format": args.format, "seconds": round(time.time() - start, 1),
                      "bytes": sum(p.stat().st_size for p in paths)}))


def _suffix(fmt: str) -> str:
    return {"parquet": "parquet", "jsonl": "jsonl"}[fmt]


def _write_parquet(path: Path, pool: pa.Array, first: int, rows: int, row_group: int, rng: np.random.Generator) -> None:
    writer = None
    for start in range(first, first + rows, 1_000_000):
        table = _chunk(pool, start, min(1_000_000, first + rows - start), rng)
        writer = writer or pq.ParquetWriter(path, table.schema, compression="zstd")
        writer.write_table(table, row_group_size=row_group)
    if writer:
        writer.close()


def _write_jsonl(path: Path, pool: pa.Array, first: int, rows: int, rng: np.random.Generator) -> None:
    with open(path, "wb") as fh:
        for start in range(first, first + rows, 500_000):
            t = _chunk(pool, start, min(500_000, first + rows - start), rng)
            lines = pc.binary_join_element_wise('{"id": "', t["id"], '", "text": "', t["text"], '"}\n', "")
            fh.write(b"".join(v.as_buffer().to_pybytes() for v in lines.combine_chunks().cast(pa.binary())))


def _config(path: str, top: dict[str, object] | None = None, **run: object) -> object:
    from shardinfer.planning.validate import checked_from_dict

    return checked_from_dict({"input": {"path": path, "id_column": "id"},
                              "model": {"path": "/nonexistent-model", "max_model_len": 4096},
                              "sampling": {"max_tokens": 256}, "run": {"workers": 1000, **run}, **(top or {})})


def _memory_mb(field: str) -> float:
    """VmHWM (peak) or VmRSS (now) of this process, in MB (per process: not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def _report(name: str, start: float, **extra: object) -> None:
    print(json.dumps({"measure": name, "seconds": round(time.time() - start, 3),
                      "peak_rss_mb": round(_memory_mb("VmHWM"), 1), **extra}))


def measure_plan(args: argparse.Namespace) -> None:
    import shardinfer.planning.plan as plan_module

    cfg = _config(args.path)
    base = _memory_mb("VmRSS")
    start = time.time()
    index = Path(args.index) if args.index else None  # as a run plans: with the input checksums
    plan = plan_module.make_plan(cfg, 1000, index_dir=index)  # type: ignore[arg-type]
    _report("plan", start, rows=plan.total_rows, units=len(plan.units), files=len(plan.files),
            interpreter_rss_mb=round(base, 1), duplicates=len(plan.duplicates))


def measure_read(args: argparse.Namespace) -> None:
    """Plan once (saved), then in fresh processes read the first, middle and last unit."""
    from shardinfer.planning.plan import make_plan

    saved = Path(args.plan or (Path(args.path).with_suffix(".plan.json")))
    if not saved.is_file():
        saved.write_text(json.dumps(make_plan(_config(args.path), 1000).to_json()))  # type: ignore[arg-type]
    from shardinfer.planning.plan import Plan

    plan = Plan.from_json(json.loads(saved.read_text()))
    units = len(plan.units)
    deepest = max(range(units), key=lambda u: plan.units[u].segments[0].group_offset or 0)
    for which in sorted({0, units // 2, deepest, units - 1}):
        subprocess.run([sys.executable, __file__, "read-one", args.path, str(saved), str(which)], check=True)


def read_one(args: argparse.Namespace) -> None:
    from shardinfer.inputs.unit_reader import UnitReader
    from shardinfer.planning.plan import Plan

    plan = Plan.from_json(json.loads(Path(args.plan).read_text()))
    reader = UnitReader(plan, _config(args.path))  # type: ignore[arg-type]
    base = _memory_mb("VmRSS")
    unit = plan.units[int(args.unit)]
    start = time.time()
    table = reader.read(unit)
    _report("read unit", start, unit=unit.unit, rows=table.num_rows, interpreter_rss_mb=round(base, 1),
            starts_at=unit.segments[0].to_json())
    if unit.unit + 1 < len(plan.units):  # what a worker walking its slice reads next
        start = time.time()
        table = reader.read(plan.units[unit.unit + 1])
        _report("read the next unit", start, unit=unit.unit + 1, rows=table.num_rows)


def measure_reduce(args: argparse.Namespace) -> None:
    """Commit parts holding ``--rows`` made-up result rows through the real ledger, then time the reduce."""
    run = Path(args.out)
    if not (run / "run.json").is_file():
        subprocess.run([sys.executable, __file__, "reduce-setup", str(run), str(args.rows), str(args.units),
                        str(args.dim)], check=True)
    subprocess.run([sys.executable, __file__, "reduce-one", str(run)], check=True)


def reduce_setup(args: argparse.Namespace) -> None:
    from shardinfer.config import config_to_dict
    from shardinfer.ledger.claims import Ledger
    from shardinfer.ledger.rundir import RunDir, write_json_atomic
    from shardinfer.planning.plan import Plan, Segment, Unit

    rows, units = int(args.rows), int(args.units)
    cut = np.linspace(0, rows, units + 1).astype(np.int64)
    plan = Plan(files=[{"path": "/none", "source": "none", "rows": rows, "bytes": 0, "mtime": 0}], total_rows=rows,
                units=[Unit(i, int(a), int(b - a), int(b - a), [Segment(0, int(a), int(b))]) for i, (a, b) in
                       enumerate(zip(cut[:-1], cut[1:]))], max_model_len=4096, prompt_limit=3840,
                chars_per_token=4.0, estimate="synthetic")
    run_dir = RunDir(args.out)
    run_dir.make(units=units)
    cfg = _config("/none", {"task": "embed", "pooling": {"dimensions": int(args.dim)}} if int(args.dim) else None)
    write_json_atomic(run_dir.plan_json, plan.to_json())
    write_json_atomic(run_dir.run_json, {"config": config_to_dict(cfg), "layout": 2, "launches": 1})  # type: ignore[arg-type]
    ledger = Ledger(run_dir)
    dim = int(args.dim)
    for u in plan.units:
        n = u.rows
        rows = pa.array(np.arange(u.first_row, u.first_row + n))
        table = pa.table({"_row": rows, "id": pc.binary_join_element_wise("doc-", rows.cast(pa.string()), ""),
                          **(_embedding_columns(rows, dim) if dim else _generation_columns(n))})
        assert ledger.claim(u.unit)
        ledger.commit(u.unit, table, {"launch": 0, "rows": n, "ok": n, "truncated": 0, "failed": 0,
                                       "prompt_tokens": 125 * n, "output_tokens": 0 if dim else 40 * n})


def _generation_columns(n: int) -> dict[str, pa.Array]:
    output = "a generated summary of the document in a few words " * 4
    return {"output": pa.array([output] * n), "status": pa.array(["ok"] * n), "error": pa.nulls(n, pa.string()),
            "prompt_tokens": pa.array(np.full(n, 125)), "output_tokens": pa.array(np.full(n, 40)),
            "finish_reason": pa.array(["stop"] * n)}


def _embedding_columns(rows: pa.Array, dim: int) -> dict[str, pa.Array]:
    """float32 embeddings of ``dim`` values: full size in memory, few distinct values so parts stay
    small on disk (what is measured is the reduce's memory)."""
    n = len(rows)
    values = np.broadcast_to((np.arange(n, dtype=np.float32) % 7)[:, None] / 7, (n, dim)).ravel()
    return {"status": pa.array(["ok"] * n), "error": pa.nulls(n, pa.string()),
            "prompt_tokens": pa.array(np.full(n, 125)),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(values, pa.float32()), dim)}


def reduce_one(args: argparse.Namespace) -> None:
    from shardinfer.ledger.rundir import RunDir
    from shardinfer.reduce.merge import reduce_run

    base = _memory_mb("VmRSS")
    start = time.time()
    report = reduce_run(RunDir(args.out))
    _report("reduce", start, rows=report["rows"]["in"], interpreter_rss_mb=round(base, 1))


def measure_early_fail(args: argparse.Namespace) -> None:
    """A whole run (`shardinfer run`, the simulation engine) of a corpus whose rows all fail before
    the engine (longer than the context, prompt.too_long=fail): when each worker committed its first
    unit after its model load, the most units it held at once and its peak memory."""
    import os
    import shutil

    run_dir = Path(args.out)
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"input.path={args.path}", "input.id_column=id", f"model.path={args.model}", "model.engine=sim",
                 "model.max_model_len=64", "sampling.max_tokens=8", "prompt.too_long=fail",
                 f"run.directory={run_dir}", f"run.workers={args.workers}"]
    config = run_dir.parent / "early-fail.yaml"
    config.write_text("prompt: {user: '{text}'}\n")
    env = {**os.environ, "SHARDINFER_PLUGINS": "shardinfer.bench.sim_engine"}
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "shardinfer.cli", "run", str(config), *overrides], env=env,
                          capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    done = [json.loads(p.read_text()) for p in (run_dir / "done").rglob("unit-*.json")]
    for path in sorted((run_dir / "metrics").glob("*.json")):
        m = json.loads(path.read_text())
        mine = sorted(d["committed_at"] for d in done if d["worker"].endswith(f"rank{m['rank']}"))
        print(json.dumps({"measure": "early-fail", "rank": m["rank"], "run_seconds": round(wall, 1),
                          "units": m["units"], "rows": m["rows"], "units_held_max": m["units_held_max"],
                          "first_commit_after_load_s": round(mine[0] - m["started_at"] - m["model_load_s"], 2),
                          "peak_rss_mb": m["peak_rss_mb"]}))


def measure_pipeline(args: argparse.Namespace) -> None:
    """The worker's own cost per row: a whole `shardinfer run` (one worker, local launcher) whose
    engine answers at once (``instant``: the model's real tokenizer and chat template, one output token),
    over rows of about ``--tokens`` tokens; rows/s and prompt tokens/s over the worker's working time:
    from the end of its model load (metrics file) to its last unit's commit (done records). The
    worker's CPU seconds after the load (all its threads) are given too: the machine's other work
    inflates wall time, much less CPU time. The load average before and after each run says how busy
    the machine was."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / f"rows-{args.rows}-tokens-{args.tokens}.parquet"
    if not corpus.is_file():
        _token_corpus(corpus, args.model, args.rows, args.tokens)
    for mode in args.mode or ["chat", "raw"]:
        for repeat in range(args.repeat):
            _pipeline_run(args, corpus, mode, repeat)


def measure_tokenize(args: argparse.Namespace) -> None:
    """The floor under ``pipeline``: the model's tokenizer alone (its ``tokenizers`` backend, in one
    call per unit-sized batch, as the worker calls it) on the same rows; wall and CPU time of this
    process, garbage collector off."""
    import gc
    import os

    from tokenizers import Tokenizer

    corpus = Path(args.out) / f"rows-{args.rows}-tokens-{args.tokens}.parquet"
    if not corpus.is_file():
        _token_corpus(corpus, args.model, args.rows, args.tokens)
    texts = pq.read_table(corpus, columns=["text"]).column("text").to_pylist()
    tokenizer = Tokenizer.from_file(str(Path(args.model) / "tokenizer.json"))
    gc.disable()
    for repeat in range(args.repeat):
        load_before, wall, cpu, tokens = os.getloadavg()[0], time.perf_counter(), time.process_time(), 0
        for start in range(0, len(texts), args.batch):
            encoded = tokenizer.encode_batch_fast(texts[start:start + args.batch], add_special_tokens=False)
            tokens += sum(len(ids) for ids in [e.ids for e in encoded])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(json.dumps({"measure": "tokenize", "repeat": repeat, "rows": len(texts), "tokens_per_row": round(tokens / len(texts), 1),
                          "rows_per_s": round(len(texts) / wall), "tokens_per_s": round(tokens / wall),
                          "rows_per_cpu_s": round(len(texts) / cpu), "tokens_per_cpu_s": round(tokens / cpu),
                          "threads": "1" if os.environ.get("TOKENIZERS_PARALLELISM") == "false" else "all",
                          "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)]}))


def _token_corpus(path: Path, model: str, rows: int, tokens: int) -> None:
    """Rows of ``tokens`` tokens of the model's tokenizer: windows of the bundled corpus's token
    stream (distinct windows up to 20,000, repeated beyond), decoded back to text."""
    from tokenizers import Tokenizer

    from shardinfer.bench.synth import source_texts

    tokenizer = Tokenizer.from_file(str(Path(model) / "tokenizer.json"))
    stream = np.concatenate([e.ids for e in tokenizer.encode_batch(source_texts(None), add_special_tokens=False)])
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(stream) - tokens, size=min(rows, 20_000))
    texts = pa.array(tokenizer.decode_batch([stream[s:s + tokens].tolist() for s in starts]))
    ids = pc.binary_join_element_wise("doc-", pa.array(np.arange(rows)).cast(pa.string()), "")
    pq.write_table(pa.table({"id": ids, "text": texts.take(pa.array(np.arange(rows) % len(texts)))}), path,
                   compression="zstd")


def _pipeline_run(args: argparse.Namespace, corpus: Path, mode: str, repeat: int) -> None:
    import os
    import shutil

    run_dir = corpus.parent / f"run-{mode}"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = corpus.parent / f"pipeline-{mode}.yaml"
    config.write_text(f"prompt: {{user: '{{text}}', mode: {mode}, too_long: truncate}}\n")
    overrides = [f"input.path={corpus}", "input.id_column=id", f"model.path={args.model}", "model.engine=instant",
                 f"model.max_model_len={args.max_model_len}", "sampling.max_tokens=1", f"run.directory={run_dir}",
                 "run.workers=1", f"task={args.task}"]
    env = {**os.environ, "SHARDINFER_PLUGINS": "shardinfer.bench.instant_engine"}
    if args.serial:
        env["TOKENIZERS_PARALLELISM"] = "false"
    if args.profile:
        env["SHARDINFER_INSTANT_PROFILE"] = f"{args.profile}.{mode}"
    load_before = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, "-m", "shardinfer.cli", "run", str(config), *overrides], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    [metrics] = [json.loads(p.read_text()) for p in (run_dir / "metrics").glob("*.json")]
    last_commit = max(json.loads(p.read_text())["committed_at"] for p in (run_dir / "done").rglob("unit-*.json"))
    work_s = last_commit - metrics["started_at"] - metrics["model_load_s"]
    cpu_s = metrics["engine_report"]["cpu_s_after_load"]
    print(json.dumps({"measure": "pipeline", "task": args.task, "mode": mode, "repeat": repeat, "rows": metrics["rows"],
                      "units": metrics["units"], "prompt_tokens_per_row": round(metrics["prompt_tokens"] / metrics["rows"], 1),
                      "work_s": round(work_s, 2), "rows_per_s": round(metrics["rows"] / work_s),
                      "prompt_tokens_per_s": round(metrics["prompt_tokens"] / work_s),
                      "cpu_s": cpu_s, "rows_per_cpu_s": round(metrics["rows"] / cpu_s),
                      "gc_s": metrics["engine_report"].get("gc_s"),
                      "model_load_s": round(metrics["model_load_s"], 2), "peak_rss_mb": metrics["peak_rss_mb"],
                      "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("corpus")
    c.add_argument("out")
    c.add_argument("--rows", type=int, required=True)
    c.add_argument("--files", type=int, default=1)
    c.add_argument("--format", choices=["parquet", "jsonl"], default="parquet")
    c.add_argument("--chars", type=int, default=500)
    c.add_argument("--row-group", type=int, default=131_072)
    c.set_defaults(fn=make_corpus)
    c = sub.add_parser("reduce")
    c.add_argument("out")
    c.add_argument("--rows", type=int, default=10_000_000)
    c.add_argument("--units", type=int, default=2442)
    c.add_argument("--dim", type=int, default=0, help="results of task embed: embeddings of this many float32 values")
    c.set_defaults(fn=measure_reduce)
    c = sub.add_parser("early-fail")
    c.add_argument("path")
    c.add_argument("--model", required=True, help="a model directory (the simulation engine loads no weights)")
    c.add_argument("--workers", type=int, default=1)
    c.add_argument("--out", default="/tmp/scale/early-fail-run")
    c.set_defaults(fn=measure_early_fail)
    c = sub.add_parser("pipeline", help="the worker's own cost per row (engine instant: answers at once)")
    c.add_argument("--rows", type=int, default=100_000)
    c.add_argument("--tokens", type=int, default=500, help="tokens of the model's tokenizer per row")
    c.add_argument("--model", required=True, help="a model directory: its tokenizer is used (no weights)")
    c.add_argument("--mode", action="append", choices=["chat", "raw"], help="prompt.mode (default: both)")
    c.add_argument("--task", default="generate", choices=["generate", "embed", "classify"],
                   help="the run's task: pooling rows get an embedding (of the model's size) or class probabilities")
    c.add_argument("--max-model-len", type=int, default=4096)
    c.add_argument("--repeat", type=int, default=1, help="runs per mode")
    c.add_argument("--serial", action="store_true", help="the tokenizer on one thread (TOKENIZERS_PARALLELISM=false)")
    c.add_argument("--profile", help="write the worker's cProfile stats to PROFILE.<mode>")
    c.add_argument("--out", default="/tmp/scale/pipeline")
    c.set_defaults(fn=measure_pipeline)
    c = sub.add_parser("tokenize", help="the tokenizer alone on the rows of `pipeline`: its floor")
    c.add_argument("--rows", type=int, default=100_000)
    c.add_argument("--tokens", type=int, default=500)
    c.add_argument("--model", required=True)
    c.add_argument("--batch", type=int, default=4_000, help="rows per call: about a unit of `pipeline` (50,000 rows: 13 units)")
    c.add_argument("--repeat", type=int, default=1)
    c.add_argument("--out", default="/tmp/scale/pipeline")
    c.set_defaults(fn=measure_tokenize)
    c = sub.add_parser("plan")
    c.add_argument("path")
    c.add_argument("--index", help="a directory for the run's index files: plan as a run does (checksums)")
    c.set_defaults(fn=measure_plan)
    plain = {"read": (measure_read, ["path", "--plan"]),
             "read-one": (read_one, ["path", "plan", "unit"]),  # the steps below run in fresh processes
             "reduce-setup": (reduce_setup, ["out", "rows", "units", "dim"]), "reduce-one": (reduce_one, ["out"])}
    for name, (fn, arguments) in plain.items():
        c = sub.add_parser(name)
        for argument in arguments:
            c.add_argument(argument)
        c.set_defaults(fn=fn)
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
