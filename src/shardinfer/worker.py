"""The worker loop: claim a unit, build prompts, hand them to the engine, commit the part, next.

Started once per rank (``python -m shardinfer.worker RUN_DIR --rank R --world W``). The engine is
kept fed: while it works on the units in flight, the worker claims and prepares the next one as
soon as the engine wants more, and commits each unit the moment its last row finishes. Every input
row of a unit comes out as exactly one result row: rows that cannot be prompted or generated are
kept with status ``failed`` and the reason.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from shardinfer import corpus
from shardinfer.engines import Completion, Engine, make_engine
from shardinfer.env import RankEnv, check_world, detect, gpu_slice, visible_gpu_ids
from shardinfer.errors import RunError, ShardinferError
from shardinfer.ledger import Heartbeat, Ledger
from shardinfer.logs import setup_logging
from shardinfer.model_info import load_tokenizer
from shardinfer.plan import Plan, Unit
from shardinfer.progress import Progress
from shardinfer.prompts import Prompt, PromptBuilder, template_fields
from shardinfer.results import ROW, result_table
from shardinfer.rundir import RunDir, write_json_atomic
from shardinfer.runstate import load_run
from shardinfer.timeline import Timeline

log = logging.getLogger("shardinfer.worker")


@dataclass
class UnitRows:
    rows: list[int] = field(default_factory=list)  # global row indices
    ids: list[str] = field(default_factory=list)
    texts: list[Any] = field(default_factory=list)
    columns: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str | None] = field(default_factory=list)


class UnitReader:
    """Reads a unit's rows from the input files, keeping the last file in memory."""

    def __init__(self, plan: Plan, cfg: Any):
        self.plan = plan
        self.cfg = cfg
        self.extra = corpus.extra_columns(cfg.input, template_fields(cfg.prompt.user))
        self.offsets = [0]
        for f in plan.files:
            self.offsets.append(self.offsets[-1] + f["rows"])
        self._cached: tuple[int, corpus.Rows] | None = None

    def read(self, unit: Unit) -> UnitRows:
        out = UnitRows()
        for file_index, start, end in unit.segments:
            rows = self._file_rows(file_index)
            for i in range(start, end):
                out.rows.append(self.offsets[file_index] + i)
                out.ids.append(rows.ids[i])
                out.texts.append(rows.texts[i])
                out.columns.append({c: rows.columns[c][i] for c in self.extra})
                out.problems.append(rows.problems[i])
        return out

    def _file_rows(self, index: int) -> corpus.Rows:
        if self._cached is None or self._cached[0] != index:
            info = self.plan.files[index]
            path = Path(info["path"])
            _check_unchanged(path, info)
            rows = corpus.read_rows(path, info["source"], self.cfg.input, self.extra)
            if len(rows) != info["rows"]:
                raise RunError(f"{path} now has {len(rows)} rows, the plan has {info['rows']}: "
                               f"the input changed since the run was planned. Start a new run.")
            self._cached = (index, rows)
        return self._cached[1]


def _check_unchanged(path: Path, info: dict[str, Any]) -> None:
    if not path.is_file():
        raise RunError(f"input file {path} is gone since the run was planned")
    stat = path.stat()
    if stat.st_size != info["bytes"] or abs(stat.st_mtime - info["mtime"]) > 1e-3:
        raise RunError(f"input file {path} changed since the run was planned (size or mtime). "
                       f"Start a new run (another run.directory) to process the new data.")


@dataclass
class InFlight:
    """A claimed unit whose rows are with the engine."""
    unit: Unit
    rows: UnitRows
    problems: list[str | None]
    prompts: list[Prompt | None]
    previous: pa.Table | None  # --retry-failed: the unit's earlier results
    sent: list[int]  # positions of the rows handed to the engine
    results: list[Completion | Exception | None]
    waiting: int = field(init=False)  # rows still with the engine

    def __post_init__(self) -> None:
        self.waiting = len(self.sent)


@dataclass
class WorkerMetrics:
    rank: int
    world: int
    launch: int
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    started_at: float = field(default_factory=time.time)
    model_load_s: float = 0.0
    generation_s: float = 0.0
    first_generate_at: float | None = None
    last_generate_end: float | None = None
    finished_at: float | None = None
    units: int = 0
    rows: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    engine: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    launcher: str = "local"
    job_id: str | None = None
    gpus: str | None = None  # CUDA_VISIBLE_DEVICES of the worker
    drained: bool = False  # stopped early on SIGUSR2/SIGTERM
    restart: int = 0  # requeues of the SLURM job before this start
    timeline: dict[str, Any] = field(default_factory=dict)  # tokens finished per time bin


class Worker:
    def __init__(self, run_dir: RunDir, rank_env: RankEnv, *, launch: int):
        self.run_dir = run_dir
        self.rank, self.world = rank_env.rank, rank_env.world
        self.cfg, self.plan = load_run(run_dir)
        self.metrics = WorkerMetrics(rank=self.rank, world=self.world, launch=launch, engine=self.cfg.model.engine,
                                     launcher=rank_env.launcher, job_id=rank_env.job_id,
                                     gpus=os.environ.get("CUDA_VISIBLE_DEVICES"), restart=rank_env.restart)
        self.ledger = Ledger(run_dir, worker=f"{socket.gethostname()}:{os.getpid()}:rank{self.rank}",
                             lease_timeout_s=self.cfg.run.lease_timeout_s)
        self.engine: Engine | None = None
        self.builder: PromptBuilder | None = None
        self.draining = False
        self.failed_units_in_a_row = 0
        self.in_flight: dict[int, InFlight] = {}
        self.timeline = Timeline(start=self.metrics.started_at)

    def drain(self, signum: int, _frame: Any = None) -> None:
        """On SIGUSR2/SIGTERM: finish and commit the current unit, claim no more, exit."""
        log.warning("signal %s: finishing the current unit, then stopping", signal.Signals(signum).name)
        self.draining = True

    def run(self) -> None:
        os.environ.update(self.cfg.run.env)  # before the engine is imported
        self._load()
        for signum in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(signum, self.drain)
        reader = UnitReader(self.plan, self.cfg)
        progress = Progress(rank=self.rank, total_rows=self.plan.total_rows,
                            interval_s=self.cfg.run.log_interval_s)
        heartbeat = Heartbeat(self.ledger)
        try:
            self._work(reader, progress, heartbeat)
        finally:
            heartbeat.stop()
            progress.close()
        self.metrics.finished_at = time.time()
        self.metrics.drained = self.draining
        self._save_metrics()
        log.info("%s: %d units, %d rows done by this worker", "drained" if self.draining else "no units left",
                 self.metrics.units, self.metrics.rows)

    def _work(self, reader: UnitReader, progress: Progress, heartbeat: Heartbeat) -> None:
        """Keep the engine fed with claimed units, commit each as its last row finishes; when no
        unit is left to claim, wait for others' leases to finish or go stale."""
        candidates = deque(self._unit_order())
        while True:
            if not self.draining:
                self._fill(candidates, reader, heartbeat)
            else:
                self._give_back_unstarted(heartbeat)
            if self.in_flight:
                self._step(progress, heartbeat)
                continue
            if self.draining or len(self.ledger.done_units()) >= len(self.plan.units):
                return
            time.sleep(min(self.cfg.run.lease_timeout_s / 4, 2.0))  # others still hold units
            candidates = deque(u for u in self._unit_order() if not self.ledger.is_done(u.unit))

    def _load(self) -> None:
        start = time.time()
        self.engine = make_engine(self.cfg, self.plan.max_model_len)
        self.engine.load()
        tokenizer = load_tokenizer(self.cfg.model)
        self.builder = PromptBuilder(self.cfg.prompt, tokenizer, max_model_len=self.plan.max_model_len,
                                     max_tokens=self.cfg.sampling.max_tokens)
        self.metrics.model_load_s = time.time() - start
        self.metrics.versions = self.engine.versions()
        log.info("model loaded in %.1f s", self.metrics.model_load_s)
        self._save_metrics()

    def _unit_order(self) -> list[Unit]:
        """Each rank starts at its own offset, so workers rarely contend for the same claim."""
        units = self.plan.units
        start = self.rank * len(units) // max(self.world, 1)
        return units[start:] + units[:start]

    def _fill(self, candidates: deque[Unit], reader: UnitReader, heartbeat: Heartbeat) -> None:
        """Claim (taking them from ``candidates``) and submit units while the engine wants more."""
        while candidates and not self.draining and self.engine.wants_more():
            unit = candidates.popleft()
            if not self.ledger.claim(unit.unit):
                continue
            heartbeat.hold(unit.unit)
            flight = self._prepare(unit, reader)
            self.in_flight[unit.unit] = flight
            if flight.waiting:
                now = time.time()
                self.metrics.first_generate_at = self.metrics.first_generate_at or now
                self.engine.submit(unit.unit, [flight.prompts[i].token_ids for i in flight.sent])
                self.metrics.generation_s += time.time() - now

    def _give_back_unstarted(self, heartbeat: Heartbeat) -> None:
        """Draining: keep the oldest unit and those with finished rows; release the others at once."""
        for unit in list(self.in_flight)[1:]:
            flight = self.in_flight[unit]
            if flight.sent and flight.waiting == len(flight.sent):
                self.engine.cancel(unit)
                self.ledger.release(unit)
                heartbeat.drop(unit)
                del self.in_flight[unit]
                log.info("draining: unit %d given back unstarted", unit)

    def _prepare(self, unit: Unit, reader: UnitReader) -> "InFlight":
        rows = reader.read(unit)
        previous = _previous_results(self.run_dir, unit.unit)
        if previous is not None:  # --retry-failed: only the rows that failed last time
            rows = _subset(rows, _failed_rows(previous))
        problems = self._row_problems(rows)
        prompts = self._prompts(rows, problems)
        sent = [i for i, p in enumerate(prompts) if p is not None and p.token_ids is not None]
        return InFlight(unit=unit, rows=rows, problems=problems, prompts=prompts, previous=previous,
                        sent=sent, results=[None] * len(prompts))

    def _step(self, progress: Progress, heartbeat: Heartbeat) -> None:
        """One engine poll: place the finished rows, commit the units that are complete."""
        start = time.time()
        finished = self.engine.poll()
        now = time.time()
        self.metrics.generation_s += now - start
        for batch, index, result in finished:
            flight = self.in_flight[batch]
            row = flight.sent[index]
            flight.results[row] = result
            flight.waiting -= 1
            if not isinstance(result, Exception):
                self.timeline.add(now, len(flight.prompts[row].token_ids), len(result.token_ids))
        if finished:
            self.metrics.last_generate_end = now
        for unit in [u for u, f in self.in_flight.items() if not f.waiting]:
            self._commit(self.in_flight.pop(unit), progress)
            heartbeat.drop(unit)

    def _commit(self, flight: "InFlight", progress: Progress) -> None:
        table = result_table(flight.rows, flight.problems, flight.prompts, flight.results,
                             self.cfg.input.passthrough)
        if flight.previous is not None:
            table = _merge(flight.previous, table)
        sent = [flight.results[i] for i in flight.sent]
        failed_all = bool(sent) and all(isinstance(r, Exception) for r in sent)
        self.failed_units_in_a_row = self.failed_units_in_a_row + 1 if failed_all else 0
        stats = table_stats(table)
        if self.ledger.commit(flight.unit.unit, table, {"launch": self.metrics.launch, **stats}):
            self.run_dir.retry_source(flight.unit.unit).unlink(missing_ok=True)
            self._count(stats, progress)
        if self.failed_units_in_a_row >= 2:
            raise RunError(f"the engine failed every row of {self.failed_units_in_a_row} units in a row "
                           f"({self.cfg.run.max_attempts} attempts each); stopping this worker. "
                           f"Its rows are recorded as failed: `shardinfer resume --retry-failed` redoes them.")

    def _row_problems(self, rows: UnitRows) -> list[str | None]:
        problems = []
        for row, text, problem, row_id in zip(rows.rows, rows.texts, rows.problems, rows.ids):
            problem = problem or corpus.text_problem(text, self.cfg.input.text_column)
            first = self.plan.duplicates.get(row)
            if problem is None and first is not None:
                problem = f"duplicate_id: id {row_id!r} is already used by input row {first}"
            problems.append(problem)
        return problems

    def _prompts(self, rows: UnitRows, problems: list[str | None]) -> list[Prompt | None]:
        valid = [i for i, p in enumerate(problems) if p is None]
        built = self.builder.build([rows.texts[i] for i in valid], [rows.columns[i] for i in valid]) if valid else []
        prompts: list[Prompt | None] = [None] * len(problems)
        for i, prompt in zip(valid, built):
            prompts[i] = prompt
        return prompts

    def _count(self, stats: dict[str, int], progress: Progress) -> None:
        m = self.metrics
        m.units += 1
        m.rows += stats["rows"]
        m.prompt_tokens += stats["prompt_tokens"]
        m.output_tokens += stats["output_tokens"]
        self._save_metrics()
        progress.update(rows=stats["rows"], tokens_in=stats["prompt_tokens"], tokens_out=stats["output_tokens"])

    def _save_metrics(self) -> None:
        self.metrics.timeline = self.timeline.to_json()
        path = self.run_dir.worker_metrics(self.metrics.launch, self.rank, self.metrics.restart)
        write_json_atomic(path, self.metrics.__dict__)


def _previous_results(run_dir: RunDir, unit: int) -> pa.Table | None:
    path = run_dir.retry_source(unit)
    return pq.read_table(path) if path.is_file() else None


def _failed_rows(previous: pa.Table) -> set[int]:
    return {r for r, s in zip(previous.column(ROW).to_pylist(), previous.column("status").to_pylist())
            if s == "failed"}


def _subset(rows: UnitRows, keep: set[int]) -> UnitRows:
    index = [i for i, r in enumerate(rows.rows) if r in keep]
    return UnitRows(rows=[rows.rows[i] for i in index], ids=[rows.ids[i] for i in index],
                    texts=[rows.texts[i] for i in index], columns=[rows.columns[i] for i in index],
                    problems=[rows.problems[i] for i in index])


def _merge(previous: pa.Table, redone: pa.Table) -> pa.Table:
    """The previous results with the redone rows in place of the failed ones, in row order."""
    kept = previous.filter(pa.compute.invert(pa.compute.is_in(previous.column(ROW), redone.column(ROW))))
    merged = pa.concat_tables([kept, redone], promote_options="permissive")
    return merged.sort_by(ROW)


def table_stats(table: pa.Table) -> dict[str, int]:
    """Rows per status and token sums of a unit's results (kept in its done record)."""
    statuses = table.column("status").to_pylist()
    return {"rows": table.num_rows, **{s: statuses.count(s) for s in ("ok", "truncated", "failed")},
            "prompt_tokens": sum(v or 0 for v in table.column("prompt_tokens").to_pylist()),
            "output_tokens": sum(v or 0 for v in table.column("output_tokens").to_pylist())}


def check_allocation(rank_env: RankEnv, expect_world: int | None, gpus_per_replica: int) -> None:
    """The job matches the config, and this worker sees only its replica's GPUs."""
    check_world(rank_env, expect_world)
    if gpus_per_replica and rank_env.launcher != "local":
        mine = gpu_slice(rank_env, visible_gpu_ids() or [], gpus_per_replica)
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
        log.info("pinned to GPUs %s", ",".join(mine))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shardinfer.worker")
    parser.add_argument("run_dir")
    parser.add_argument("--rank", type=int, help="this worker's rank (local launcher); default: from SLURM")
    parser.add_argument("--world", type=int, help="number of workers (local launcher); default: from SLURM")
    parser.add_argument("--launch", type=int, default=0)
    parser.add_argument("--expect-world", type=int, help="fail unless the job has this many workers")
    parser.add_argument("--gpus-per-replica", type=int, default=0,
                        help="pin this worker to its local rank's slice of the node's GPUs")
    args = parser.parse_args(argv)
    run_dir = RunDir(args.run_dir)
    rank_env = detect(rank=args.rank, world=args.world)
    setup_logging(rank=rank_env.rank, world=rank_env.world, log_file=run_dir.worker_log(rank_env.rank))
    try:
        check_allocation(rank_env, args.expect_world, args.gpus_per_replica)
        log.info("starting %s", rank_env.describe())
        Worker(run_dir, rank_env, launch=args.launch).run()
    except ShardinferError as exc:
        log.error("%s", exc)
        return 2
    except Exception:
        log.exception("worker failed")
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
