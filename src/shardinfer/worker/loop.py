"""The worker loop: claim a unit, build prompts, hand them to the engine, commit the part, next.

Started once per rank, by :mod:`shardinfer.worker.entry` (``python -m shardinfer.worker``). The engine is
kept fed: while it works on the units in flight, the worker claims and prepares the next one as
soon as the engine wants more, and commits each unit the moment its last row finishes. Every input
row of a unit comes out as exactly one result row: rows that cannot be prompted or generated are
kept with status ``failed`` and the reason.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from shardinfer.engines import Completion, create_engine, get_engine
from shardinfer.engines.base import Pooled, Refused
from shardinfer.errors import RunError
from shardinfer.inputs.unit_reader import UnitReader, keep_rows
from shardinfer.launch.env import RankEnv
from shardinfer.launch.gpus import device_name, visible_gpus
from shardinfer.launch.lock import orphaned, stop_orphan
from shardinfer.ledger.claims import Heartbeat, Ledger
from shardinfer.ledger.rundir import FS, RunDir
from shardinfer.ledger.runstate import load_run
from shardinfer.ledger.scheduler import Candidates, IdleWait
from shardinfer.models.info import load_tokenizer
from shardinfer.planning.plan import Unit
from shardinfer.requests.builder import RequestBuilder, result_extras
from shardinfer.requests.prompts import Prompt, request_columns
from shardinfer.results import ID, PROBLEM, ROW, TEXT, RowCounts, failed_rows, result_table
from shardinfer.telemetry.live import write_run_prom, write_worker_prom
from shardinfer.telemetry.metrics import WorkerMetrics
from shardinfer.telemetry.progress import Progress
from shardinfer.telemetry.timeline import Timeline
from shardinfer.telemetry.trackers import Monitor

log = logging.getLogger("shardinfer.worker")
_GC_THRESHOLD = 50_000  # new tracked objects between two collections (see _tune_gc)


@dataclass
class InFlight:
    """A claimed unit whose rows are with the engine. A row of several inputs (:attr:`Prompt.parts`)
    is one engine request per part; it finishes when its last part does."""
    unit: Unit
    rows: pa.Table  # the corpus's row shape, with _row
    problems: list[str | None]
    prompts: list[Prompt | None]
    previous: pa.Table | None  # --retry-failed: the unit's earlier results
    sent: list[int]  # positions of the rows handed to the engine
    results: list[Completion | Pooled | Exception | None]
    waiting: int = field(init=False)  # rows still with the engine
    # engine request -> (row position, part number (-1: the row's own prompt), what was sent)
    requests: list[tuple[int, int, Prompt]] = field(init=False)
    _parts: dict[int, list[Pooled | Exception | None]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.waiting = len(self.sent)
        self.requests = [(row, -1 if self.prompt(row).parts is None else i, sent)
                         for row in self.sent for i, sent in enumerate(self.prompt(row).requests())]

    def prompt(self, position: int) -> Prompt:
        prompt = self.prompts[position]
        assert prompt is not None and prompt.runnable  # only sent rows are asked for
        return prompt

    def place(self, index: int, result: Completion | Pooled | Exception) -> int:
        """Keep an engine request's result (a row's, or one of its parts'); its prompt tokens."""
        row, part, sent = self.requests[index]
        parts = self.prompt(row).parts
        if parts is None:
            self._finish(row, result)
        else:
            done = self._parts.setdefault(row, [None] * len(parts))
            done[part] = result  # type: ignore[assignment]  # parts are pooling requests: Pooled
            if all(d is not None for d in done):
                del self._parts[row]
                failed = next((d for d in done if isinstance(d, Exception)), None)
                self._finish(row, failed or Pooled.of_parts(done))  # type: ignore[arg-type]
        return len(sent.token_ids or ())

    def _finish(self, row: int, result: Completion | Pooled | Exception) -> None:
        self.results[row] = result
        self.waiting -= 1


@dataclass(frozen=True)
class Spanning:
    """What a replica across nodes adds to its leader's worker (see :mod:`shardinfer.worker.leader`)."""

    engine_args: dict[str, Any]  # the engine's arguments for node 0 of the replica (in memory only)
    env: dict[str, str]  # set after run.env, before the engine loads
    before_retry: Callable[[], None]  # before failed engine steps are retried
    hosts: list[str]  # the replica's nodes, leader first


def worker_name(rank: int) -> str:
    """How the ledger names this process's worker."""
    return f"{socket.gethostname()}:{os.getpid()}:rank{rank}"


class Worker:
    builder: RequestBuilder  # set when the model loads

    def __init__(self, run_dir: RunDir, rank_env: RankEnv, *, launch: int, spanning: Spanning | None = None):
        self.run_dir = run_dir
        self.rank, self.world = rank_env.rank, rank_env.world
        self.cfg, self.plan = load_run(run_dir)
        self.spanning = spanning
        if spanning is not None:
            self.cfg.model.engine_args = {**self.cfg.model.engine_args, **spanning.engine_args}
        self.metrics = WorkerMetrics(rank=self.rank, world=self.world, launch=launch, engine=self.cfg.model.engine,
                                     launcher=rank_env.launcher, job_id=rank_env.job_id,
                                     gpus=os.environ.get("CUDA_VISIBLE_DEVICES"), restart=rank_env.restart)
        self.ledger = Ledger(run_dir, worker=worker_name(self.rank),
                             lease_timeout_s=self.cfg.run.lease_timeout_s)
        self.engine = create_engine(self.cfg, self.plan.max_model_len)
        if spanning is not None and hasattr(self.engine, "before_retry"):
            self.engine.before_retry = spanning.before_retry
        self.extras = result_extras(self.cfg)
        self.request_columns = [column for _, column in request_columns(self.cfg)]
        self.draining: str | None = None  # the signal that asked this worker to stop
        self.failed_units_in_a_row = 0
        self.in_flight: dict[int, InFlight] = {}
        self.timeline = Timeline(start=self.metrics.started_at)
        self._metrics_saved = 0.0
        self._run_prom_at = -1e9
        if spanning is not None:
            self.metrics.replica_hosts = list(spanning.hosts)
        self.monitor = Monitor(self.cfg, self.metrics)
        self.idle = IdleWait(self.ledger, len(self.plan.units), self.world, self.cfg.run.lease_timeout_s)

    def drain(self, signum: int, _frame: Any = None) -> None:
        """On SIGUSR2/SIGTERM/SIGINT: finish and commit the current unit, claim no more, exit. A local
        worker whose launcher died stops at once instead."""
        if orphaned():
            stop_orphan()
        if self.draining:
            return
        self.draining = signal.Signals(signum).name
        log.warning("signal %s: finishing the current unit, then stopping", self.draining)

    def _catch_signals(self) -> None:
        for signum in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.drain)

    def run(self) -> WorkerMetrics:
        os.environ.update(self.cfg.run.env)  # before the engine is imported
        if self.spanning is not None:
            os.environ.update(self.spanning.env)
        self._catch_signals()  # a signal during the model load drains too: no unit is claimed after it
        self._load()
        self._catch_signals()  # again: an engine may set handlers of its own while it loads
        reader = UnitReader(self.plan, self.cfg, self.run_dir.index)
        progress = Progress(rank=self.rank, total_rows=self.plan.total_rows,
                            interval_s=self.cfg.run.log_interval_s)
        heartbeat = Heartbeat(self.ledger)
        try:
            self._work(reader, progress, heartbeat)
        finally:
            heartbeat.stop()
            progress.close()
        self.metrics.finished_at = time.time()
        self.metrics.drained = self.draining is not None
        self.metrics.drained_by = self.draining
        self._save_metrics()
        self.monitor.close()
        if self.rank == 0:
            self._write_run_prom()
        log.info("%s: %d units, %d rows done by this worker", "drained" if self.draining else "no units left",
                 self.metrics.units, self.metrics.rows)
        return self.metrics

    def _work(self, reader: UnitReader, progress: Progress, heartbeat: Heartbeat) -> None:
        """Keep the engine fed with claimed units, commit each as its last row finishes; with
        nothing left to claim, wait quietly for given-back units or the end of the run."""
        candidates = Candidates(self._todo(), self.rank, self.world)
        while True:
            if not self.draining:
                self._fill(candidates, reader, heartbeat, progress)
            else:
                self._give_back_unstarted(heartbeat)
            if self.in_flight:
                self._step(progress, heartbeat)
                continue
            if self.draining:
                return
            self._save_metrics()
            released = self._idle(self.idle)
            if released is None:
                return
            candidates.add_released(released)

    def _idle(self, idle: IdleWait) -> list[tuple[int, int]] | None:
        start, ops = time.monotonic(), FS.total
        try:
            with FS.scope("idle"):  # counted apart, by kind (the watcher's as watch:<kind>)
                return idle.wait(lambda: self.draining is not None)
        finally:
            self.metrics.idle_s += time.monotonic() - start
            self.metrics.idle_fs_ops += FS.total - ops
            self.metrics.watch_s, self.metrics.watch_fs_ops = idle.watch_s, idle.watch_ops

    def _todo(self) -> list[int]:
        done = self.ledger.done_set()
        return [u.unit for u in self.plan.units if u.unit not in done]

    def _load(self) -> None:
        start = time.time()
        # The engine's processes inherit a blocked USR2: SLURM forwards the drain signal to every process
        # of the step, and only this one drains (a USR2 that comes during the load is handled after it).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
        try:
            self.engine.load()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR2})
        tokenizer = load_tokenizer(self.cfg.model)
        self.builder = RequestBuilder(self.cfg, tokenizer, max_model_len=self.plan.max_model_len,
                                      capabilities=get_engine(self.cfg.model.engine).capabilities)
        _tune_gc()
        self.metrics.model_load_s = time.time() - start
        self.metrics.versions = self.engine.versions()
        self.metrics.device = device_name(visible_gpus())
        log.info("model loaded in %.1f s", self.metrics.model_load_s)
        self._save_metrics()

    def _fill(self, candidates: Candidates, reader: UnitReader, heartbeat: Heartbeat, progress: Progress) -> None:
        """Claim and submit units while the engine wants more. A unit none of whose rows reach the
        engine (all failed before it) is committed at once: only units whose rows are with the
        engine are held, so a corpus of bad rows never lets a worker claim more than it works on."""
        while not self.draining and self.engine.wants_more():
            unit = self._claim_next(candidates)
            if unit is None:
                return
            heartbeat.hold(unit.unit)
            self.metrics.units_held_max = max(self.metrics.units_held_max, len(self.in_flight) + 1)
            flight = self._prepare(unit, reader)
            if not flight.waiting:
                self._commit(flight, progress)
                heartbeat.drop(unit.unit)
                continue
            self.in_flight[unit.unit] = flight
            now = time.time()
            self.metrics.first_generate_at = self.metrics.first_generate_at or now
            self.engine.submit(unit.unit, [sent for _, _, sent in flight.requests])
            self.metrics.generation_s += time.time() - now

    def _claim_next(self, candidates: Candidates) -> Unit | None:
        while (candidate := candidates.next()) is not None:
            number, released_at = candidate
            if released_at is None:
                claimed = self.ledger.claim(number, take_over=False)
            else:
                claimed = self.ledger.claim_released(number, released_at)
            if claimed:
                candidates.claimed()
                self.idle.worked()
                return self.plan.units[number]
            candidates.missed()
        return None

    def _give_back_unstarted(self, heartbeat: Heartbeat) -> None:
        """Draining: keep the oldest unit and those with finished rows; release the others at once."""
        for unit in list(self.in_flight)[1:]:
            flight = self.in_flight[unit]
            if flight.sent and flight.waiting == len(flight.sent):
                self._drop(unit, heartbeat)
                self.ledger.release(unit)
                log.info("draining: unit %d given back unstarted", unit)

    def _drop(self, unit: int, heartbeat: Heartbeat) -> None:
        self.engine.cancel(unit)
        heartbeat.drop(unit)
        del self.in_flight[unit]

    def _drop_lost(self, heartbeat: Heartbeat) -> None:
        """Units whose lease another worker took over (this one stalled): stop spending time on them."""
        for unit in heartbeat.take_lost() & set(self.in_flight):
            self._drop(unit, heartbeat)
            log.warning("unit %d: another worker took over its lease; dropping this attempt", unit)

    def _prepare(self, unit: Unit, reader: UnitReader) -> InFlight:
        rows = reader.read(unit)
        previous = self.ledger.earlier_results(unit.unit)
        if previous is not None:  # --retry-failed: only the rows that failed last time
            rows = keep_rows(rows, failed_rows(previous))
        problems = self._row_problems(rows)
        prompts = self._prompts(rows, problems)
        sent = [i for i, p in enumerate(prompts) if p is not None and p.runnable]
        return InFlight(unit=unit, rows=rows, problems=problems, prompts=prompts, previous=previous,
                        sent=sent, results=[None] * len(prompts))

    def _step(self, progress: Progress, heartbeat: Heartbeat) -> None:
        """One engine poll: place the finished rows, commit the units that are complete."""
        self._drop_lost(heartbeat)
        if time.monotonic() - self._metrics_saved >= self.cfg.run.metrics_interval_s:
            # the one timer: every engine poll looks at it, so a worker in a long unit stays visible
            # and counts of committed units reach the files within an interval
            self._save_metrics()
        start = time.time()
        finished = self.engine.poll()
        now = time.time()
        self.metrics.generation_s += now - start
        done, prompt_tokens, output_tokens = 0, 0, 0  # rows that finished now: one time bin
        for batch, index, result in finished:
            flight = self.in_flight.get(batch)
            if flight is None:  # dropped while the engine still held it
                continue
            tokens = flight.place(index, result)
            if not isinstance(result, Exception):
                done, prompt_tokens = done + 1, prompt_tokens + tokens
                output_tokens += result.output_tokens
        if done:
            self.timeline.add(now, prompt_tokens, output_tokens)
        if finished:
            self.metrics.last_generate_end = now
        for unit in [u for u, f in self.in_flight.items() if not f.waiting]:
            self._commit(self.in_flight.pop(unit), progress)
            heartbeat.drop(unit)

    def _commit(self, flight: InFlight, progress: Progress) -> None:
        table = result_table(flight.rows, flight.problems, flight.prompts, flight.results,
                             self.cfg.input.passthrough, self.extras)
        if flight.previous is not None:
            table = _merge(flight.previous, table)
        sent = [flight.results[i] for i in flight.sent]
        failed_all = bool(sent) and all(isinstance(r, Exception) and not isinstance(r, Refused) for r in sent)
        self.failed_units_in_a_row = self.failed_units_in_a_row + 1 if failed_all else 0
        counts = RowCounts.of(table)
        if self.ledger.commit(flight.unit.unit, table, {"launch": self.metrics.launch, **counts.to_record()}):
            self._count(counts, progress)
        if self.failed_units_in_a_row >= 2:
            raise RunError(f"the engine failed every row of {self.failed_units_in_a_row} units in a row "
                           f"({self.cfg.run.max_attempts} attempts each); stopping this worker. "
                           f"Its rows are recorded as failed: `shardinfer resume --retry-failed` redoes them.")

    def _row_problems(self, rows: pa.Table) -> list[str | None]:
        """The readers' problems, and duplicate ids (the first row with an id runs)."""
        problems: list[str | None] = rows.column(PROBLEM).to_pylist()
        if self.plan.duplicates:
            ids = rows.column(ID)
            for i, row in enumerate(rows.column(ROW).to_pylist()):
                first = self.plan.duplicates.get(row)
                if problems[i] is None and first is not None:
                    problems[i] = f"duplicate_id: id {ids[i].as_py()!r} is already used by input row {first}"
        return problems

    def _prompts(self, rows: pa.Table, problems: list[str | None]) -> list[Prompt | None]:
        prompts: list[Prompt | None] = [None] * len(problems)
        valid = [i for i, p in enumerate(problems) if p is None]
        if not valid:  # a unit of bad rows only: nothing to build
            return prompts
        texts = rows.column(TEXT).take(valid).to_pylist()
        fields = [f for f in dict.fromkeys(self.request_columns) if f in rows.column_names]
        columns = rows.select(fields).take(valid).to_pylist() if fields else [{} for _ in valid]
        for i, prompt in zip(valid, self._build(texts, columns)):
            prompts[i] = prompt
        return prompts

    def _build(self, texts: list[str], columns: list[dict[str, Any]]) -> list[Prompt]:
        """The rows' prompts; if building the batch raises, each row is built alone and a row that
        still raises fails with the error: a row the tokenizer or a template chokes on never stops
        the worker."""
        try:
            return self.builder.build(texts, columns)
        except Exception as exc:  # noqa: BLE001 - isolate the rows that raise
            log.warning("building a batch of %d prompts failed (%r); building them one by one", len(texts), exc)
        return [self._build_one(text, cols) for text, cols in zip(texts, columns)]

    def _build_one(self, text: str, columns: dict[str, Any]) -> Prompt:
        try:
            return self.builder.build([text], [columns])[0]
        except Exception as exc:  # noqa: BLE001 - this row fails with the error
            return Prompt(None, problem=f"prompt_error: {type(exc).__name__}: {exc}")

    def _count(self, counts: RowCounts, progress: Progress) -> None:
        m = self.metrics
        m.units += 1
        m.rows += counts.rows
        m.prompt_tokens += counts.prompt_tokens
        m.output_tokens += counts.output_tokens
        progress.update(rows=counts.rows, tokens_in=counts.prompt_tokens, tokens_out=counts.output_tokens)

    def _save_metrics(self) -> None:
        m = self.metrics
        m.timeline = self.timeline.to_json()
        m.fs_ops, m.fs_seconds, m.fsyncs = dict(FS.counts), round(FS.seconds, 6), FS.fsyncs
        m.engine_report = self.engine.report()
        m.peak_rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        m.save(self.run_dir)
        self._metrics_saved = time.monotonic()
        write_worker_prom(self.run_dir, m, self.cfg.name, time.time())
        self.monitor.push(m)
        if self.rank == 0 and time.monotonic() - self._run_prom_at >= max(self.cfg.run.metrics_interval_s, 60.0):
            self._write_run_prom()

    def _write_run_prom(self) -> None:
        """Units by state, for monitoring (rank 0 only: it lists the ledger's shards)."""
        done = self.ledger.done_set()
        claimed = len(set(self.ledger.claims()) - done)
        write_run_prom(self.run_dir, self.cfg.name, len(self.plan.units), len(done), claimed)
        self._run_prom_at = time.monotonic()


def _tune_gc() -> None:
    """Fewer garbage collections, over fewer objects. A unit makes several tracked objects per row
    (token id lists of hundreds of ints, prompts, completions) that live until its commit: with the
    default threshold (700 allocations) they were scanned again and again, together with what the
    model load made (modules, the engine, the tokenizer: millions of objects), which took a large
    part of the worker's time per row. The load's objects are left out of the passes (frozen), and a
    collection waits for 50,000 new objects rather than 700."""
    gc.collect()
    gc.freeze()
    threshold = gc.get_threshold()
    gc.set_threshold(max(threshold[0], _GC_THRESHOLD), *threshold[1:])


def _merge(previous: pa.Table, redone: pa.Table) -> pa.Table:
    """The previous results with the redone rows in place of the failed ones, in row order."""
    kept = previous.filter(pc.invert(pc.is_in(previous.column(ROW), redone.column(ROW))))
    merged = pa.concat_tables([kept, redone], promote_options="permissive")
    return merged.sort_by(ROW)


def run_worker(run_dir: RunDir, rank_env: RankEnv, *, launch: int, spanning: Spanning | None = None) -> WorkerMetrics:
    """Work until no unit is left (or a signal drains this worker). Worker processes start in
    :func:`shardinfer.worker.entry.start_worker`, which checks the allocation first."""
    log.info("starting %s", rank_env.describe())
    return Worker(run_dir, rank_env, launch=launch, spanning=spanning).run()
