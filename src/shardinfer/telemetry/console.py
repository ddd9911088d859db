"""What a person sees while a run runs.

Three console modes, chosen once by the command line:

* ``live`` (stdout is an interactive terminal): one live display of the run (a progress bar, the
  pace, the ETA and the workers' states, read from the run directory), with the warnings and errors
  of shardinfer's own loggers printed above it;
* ``plain`` (not a terminal: batch jobs, CI, pipes): rank-prefixed INFO lines and a progress line
  every ``run.log_interval_s``, as log lines;
* ``verbose`` (``--verbose``): the workers' own output comes to the console as it is, engine start-up
  messages and library warnings included.

In ``live`` and ``plain`` mode the local launcher sends each worker's stdout and stderr into its log
file (``logs/worker-N.log``) and gives the worker a pipe to this process for the records of
shardinfer's own loggers that a person should see (:class:`ConsoleRelay`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shardinfer.launch.base import RunHandle
from shardinfer.launch.registry import get_launcher
from shardinfer.ledger.claims import Ledger
from shardinfer.ledger.rundir import RunDir, unit_of
from shardinfer.ledger.runstate import load_run
from shardinfer.telemetry.live import worker_live
from shardinfer.telemetry.logs import CONSOLE_LOCK
from shardinfer.telemetry.metrics import load_metrics

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

log = logging.getLogger(__name__)

LIVE, PLAIN, VERBOSE = "live", "plain", "verbose"
_mode = PLAIN  # the Python API's: engine output to the logs, shardinfer's INFO lines on stderr

TAIL_LINES = 20  # lines of a failed worker's log shown on the console


def set_mode(mode: str) -> None:
    global _mode
    if mode not in (LIVE, PLAIN, VERBOSE):
        raise ValueError(f"console mode {mode!r}: one of {LIVE}, {PLAIN}, {VERBOSE}")
    _mode = mode


def mode() -> str:
    return _mode


def choose_mode(*, verbose: bool = False) -> str:
    """``verbose`` if asked, else ``live`` on an interactive terminal, else ``plain``; and use it."""
    set_mode(VERBOSE if verbose else (LIVE if interactive() else PLAIN))
    return _mode


def interactive() -> bool:
    """Whether stdout is a terminal a live display can redraw (not a pipe, a file or TERM=dumb)."""
    try:
        tty = sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False
    return tty and os.environ.get("TERM", "") not in ("dumb", "unknown")


# ---- lines for the console, from this process's threads and from the workers -----------------

_sink: Callable[[str], None] | None = None  # the live display's printer while one is shown
_lock = CONSOLE_LOCK


def emit(line: str) -> None:
    """One line for the person at the console: above the live display when one is shown, else on
    stderr."""
    with _lock:
        sink = _sink
        if sink is not None:
            sink(line)
            return
        try:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):  # a closed or full stderr: the line is in the worker's log anyway
            pass


class ConsoleRelay:
    """A pipe from one worker to this console: the worker writes the log records a person should
    see (see :func:`shardinfer.telemetry.logs.setup_logging`); a thread here reads them and prints
    each line with :func:`emit`."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Once the worker has started: close this process's write end and relay its lines."""
        os.close(self.write_fd)
        self._thread = threading.Thread(target=self._relay, name="console-relay", daemon=True)
        self._thread.start()

    def abandon(self) -> None:
        """The worker did not start: close both ends."""
        for fd in (self.read_fd, self.write_fd):
            with suppress(OSError):
                os.close(fd)

    def join(self, timeout_s: float) -> None:
        """Wait for the worker's last lines (its end of the pipe closes when it exits; a process it
        left behind may hold it open, so not forever)."""
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _relay(self) -> None:
        pending = b""
        try:
            while chunk := os.read(self.read_fd, 65536):
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    emit(line.decode("utf-8", "replace").rstrip("\r"))
        except OSError:
            pass
        finally:
            if pending.strip():
                emit(pending.decode("utf-8", "replace"))
            os.close(self.read_fd)


def log_tail(path: Path, lines: int = TAIL_LINES, *, width: int = 240) -> list[str]:
    """The last ``lines`` non-blank lines of a log file, each cut to ``width`` characters (engine
    messages can be thousands of characters long); [] when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 256 * 1024))
            data = fh.read()
    except OSError:
        return []
    text = data.decode("utf-8", "replace").replace("\r", "\n")
    kept = [line.rstrip() for line in text.split("\n") if line.strip()][-lines:]
    return [line if len(line) <= width else line[:width - 1] + "…" for line in kept]


# ---- the live display --------------------------------------------------------------------------

@dataclass
class Snapshot:
    """A run as the live display shows it, read from the run directory."""

    units: int
    units_done: int = 0
    units_running: int = 0
    rows: int = 0
    rows_done: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    tokens_per_s: float = 0.0  # of this launch, since its first worker had loaded its model
    eta_s: float | None = None
    workers: dict[str, int] = field(default_factory=dict)  # state -> how many
    loaded: bool = False  # a worker of this launch has loaded its model


class RunWatch:
    """Reads what the display shows, cheaply enough to do every second: the plan once; then each
    time one listing per done/ and claims/ shard, the done records not read before, and the
    workers' metrics files."""

    def __init__(self, run_dir: RunDir, launch: int, *, workers: int = 0):
        self.run_dir = run_dir
        self.launch = launch
        self.expected_workers = workers
        cfg, plan = load_run(run_dir)
        self.name = cfg.name
        self.interval_s = cfg.run.metrics_interval_s
        self.cost = {u.unit: u.cost for u in plan.units}
        self.total_rows = plan.total_rows
        self.ledger = Ledger(run_dir)
        self.records: dict[int, dict[str, Any]] = {}
        self.process_states: dict[str, str] = {}  # from the handle: local workers that exited
        self.loaded_at: dict[int, float] = {}  # rank -> when its metrics file was first seen: it is written once loaded

    def snapshot(self) -> Snapshot:
        listed: dict[int, Path] = {}
        for shard in self.run_dir.shard_dirs(self.run_dir.done):
            for name in _listdir(shard):
                unit = unit_of(name)
                if unit is not None and name.endswith(".json"):
                    listed[unit] = shard / name
        self.records = {u: r for u, r in self.records.items() if u in listed}  # set aside for a retry
        for unit, path in listed.items():
            if unit not in self.records and (record := _read_record(path)) is not None:
                self.records[unit] = record
        done = self.records
        running = len(set(self.ledger.claims()) - set(done))
        snap = Snapshot(units=len(self.cost), units_done=len(done), units_running=running, rows=self.total_rows)
        for record in done.values():
            snap.rows_done += int(record.get("rows") or 0)
            for status in ("ok", "truncated", "failed"):
                snap.by_status[status] = snap.by_status.get(status, 0) + int(record.get(status) or 0)
        self._pace(snap)
        return snap

    def _pace(self, snap: Snapshot) -> None:
        now = time.time()
        try:
            metrics = [m for m in load_metrics(self.run_dir) if m.launch == self.launch]
        except (OSError, ValueError, TypeError):  # a file being replaced, or an older writer's
            metrics = []
        if metrics:
            latest = max(m.restart for m in metrics)
            metrics = [m for m in metrics if m.restart == latest]
        states: dict[str, int] = {}
        seen = set()
        for m in metrics:
            seen.add(m.rank)
            self.loaded_at.setdefault(m.rank, now)
            state = self.process_states.get(f"worker {m.rank}", "")
            if state.startswith("FAILED"):
                name = "failed"
            else:
                name = worker_live(m, now, self.interval_s).state
                name = "working" if name == "loading" else name  # its metrics are written once loaded
            states[name] = states.get(name, 0) + 1
        for worker, state in self.process_states.items():
            rank = int(worker.rsplit(" ", 1)[-1])
            if rank not in seen:
                name = "failed" if state.startswith("FAILED") else ("loading" if state == "RUNNING" else "finished")
                states[name] = states.get(name, 0) + 1
                seen.add(rank)
        if len(seen) < self.expected_workers:
            states["loading"] = states.get("loading", 0) + self.expected_workers - len(seen)
        snap.workers = states
        loaded = [min(m.first_generate_at or now, self.loaded_at[m.rank]) for m in metrics]
        snap.loaded = bool(loaded)
        if not loaded:
            return
        elapsed = now - min(loaded)
        now_done = [r for r in self.records.values() if r.get("launch") == self.launch]
        tokens = sum(int(r.get("prompt_tokens") or 0) + int(r.get("output_tokens") or 0) for r in now_done)
        snap.tokens_per_s = tokens / elapsed if elapsed > 0 else 0.0
        cost_left = sum(c for u, c in self.cost.items() if u not in self.records)
        cost_now = sum(self.cost.get(int(r["unit"]), 0) for r in now_done)
        if not cost_left:
            snap.eta_s = 0.0
        elif cost_now and elapsed > 0:
            snap.eta_s = cost_left * elapsed / cost_now


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("rows"), int) else None


class LiveDisplay:
    """The live display of one launch: a bar of rows done, the pace, the ETA and the workers'
    states, redrawn in place; log lines are printed above it."""

    def __init__(self, handle: RunHandle, *, cluster: bool = False):
        from rich.console import Console
        from rich.spinner import Spinner

        self.handle = handle
        self.cluster = cluster
        workers = len(getattr(handle, "procs", ()))
        self.watch = RunWatch(handle.run_dir, handle.launch, workers=workers)
        self.name = self.watch.name
        self.console: Console = Console(highlight=False)
        self.spinner = Spinner("dots", style="cyan")
        self.logs_here = _stderr_is_terminal()  # stderr sent elsewhere (2>file) keeps getting the logs
        self.started = time.monotonic()
        self.snap = self.watch.snapshot()
        self.phase = "running"  # running | merging | done | stopped
        self.ended_at: float | None = None
        self.jobs = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="live-display", daemon=True)
        self._swapped: list[tuple[logging.StreamHandler, Any]] = []

    # -- lines above the display
    def print_line(self, line: str) -> None:
        from rich.text import Text

        style = "red" if " ERROR " in line or " CRITICAL " in line else ("yellow" if " WARNING " in line else "")
        self.console.print(Text(line, style=style), soft_wrap=True)

    # -- reading the run
    def _poll(self) -> None:
        interval, jobs_at = 1.0, 0.0
        while not self._stop.wait(interval):
            start = time.monotonic()
            self._refresh(jobs=self.cluster and start - jobs_at >= 15.0)
            if self.cluster and start - jobs_at >= 15.0:
                jobs_at = start
            # a run directory on a slow filesystem is not read more than a tenth of the time
            interval = min(max(1.0, 10 * (time.monotonic() - start)), 30.0)

    def _refresh(self, *, jobs: bool = False) -> None:
        try:
            if jobs:
                self.jobs = _job_text(self.handle.states())
            elif not self.cluster:
                self.watch.process_states = self.handle.states()
                if self.phase == "running" and all(s != "RUNNING" for s in self.watch.process_states.values()):
                    self.phase = "merging"
            self.snap = self.watch.snapshot()
        except Exception as exc:  # noqa: BLE001 - the display must never stop the run
            log.debug("live display: %r", exc)

    # -- drawing
    def render(self) -> RenderableType:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        s = self.snap
        elapsed = (self.ended_at or time.monotonic()) - self.started
        head = Table.grid(padding=(0, 1))
        mark: RenderableType
        if self.phase == "done":
            mark = Text("✔", style="green")
        elif self.phase == "stopped":
            mark = Text("✖", style="red")
        else:
            mark = self.spinner
        pct = 100.0 * s.rows_done / s.rows if s.rows else 100.0
        facts = [f"{s.rows_done:,}/{s.rows:,} rows {pct:3.0f}%"]
        if self.phase not in ("done", "stopped"):
            if self.phase == "merging":
                facts.append("merging the results")
            elif s.units_done >= s.units:
                facts.append("finishing")
            elif not s.loaded:
                facts.append("loading the model")
            elif not s.tokens_per_s:
                facts.append("generating the first units")
            else:
                facts.append(f"{s.tokens_per_s:,.0f} tok/s")
                facts.append(f"ETA {_clock(s.eta_s)}" if s.eta_s is not None else "ETA -")
            facts.append(f"{_clock(elapsed)} elapsed")
        line = " · ".join(facts)
        # a bar of at most 50 characters, less on a narrow terminal; at least 10
        width = max(10, min(50, self.console.width - len(self.name) - len(line) - 6))
        bar = ProgressBar(total=max(s.rows, 1), completed=s.rows_done if s.rows else 1, width=width,
                          pulse=not s.loaded and not s.rows_done and self.phase == "running")
        head.add_row(mark, Text(self.name, style="bold"), bar, Text(line))
        return Group(head, self._details(s))

    def _details(self, s: Snapshot) -> Any:
        from rich.text import Text

        text = Text("  ", style="dim")
        text.append(f"units {s.units_done}/{s.units} done")
        if s.units_running and self.phase != "done":
            text.append(f", {s.units_running} running")
        counts = [(n, k) for k, n in s.by_status.items() if n]
        if counts:
            text.append("  ·  " + ", ".join(f"{n:,} {k}" for n, k in counts[:-1]) + (", " if len(counts) > 1 else ""))
            n, k = counts[-1]
            text.append(f"{n:,} {k}", style="red" if k == "failed" else "")
        if s.workers:
            text.append("  ·  workers: ")
            order = ("loading", "working", "stalled", "failed", "drained", "finished")
            parts = [(state, s.workers[state]) for state in order if s.workers.get(state)]
            for i, (state, n) in enumerate(parts):
                text.append(f"{n} {state}", style="red bold" if state in ("stalled", "failed") else "")
                if i < len(parts) - 1:
                    text.append(", ")
        if self.jobs:
            text.append(f"  ·  jobs: {self.jobs}")
        text.append(f"  ·  logs: {self.handle.run_dir.logs}")
        return text

    # -- start and stop
    @contextmanager
    def shown(self) -> Iterator[LiveDisplay]:
        from rich.live import Live

        global _sink
        live = Live(console=self.console, get_renderable=self.render, refresh_per_second=4, transient=False,
                    redirect_stdout=True, redirect_stderr=self.logs_here)
        with live:
            if self.logs_here:
                _sink = self.print_line
                self._swap_log_streams()
            self._thread.start()
            ok = False
            try:
                yield self
                ok = True
            finally:
                self._stop.set()
                self._thread.join(5.0)
                self._refresh()
                self.phase = "done" if ok else "stopped"
                self.ended_at = time.monotonic()
                _sink = None
                self._restore_log_streams()
                live.refresh()

    def _swap_log_streams(self) -> None:
        """This process's log lines go above the display too (a handler's stream was fixed when it
        was made)."""
        for handler in logging.getLogger().handlers:
            if type(handler) is logging.StreamHandler and getattr(handler.stream, "isatty", lambda: False)():
                self._swapped.append((handler, handler.setStream(_LineWriter(self.print_line))))

    def _restore_log_streams(self) -> None:
        for handler, stream in self._swapped:
            handler.setStream(stream)
        self._swapped.clear()


class _LineWriter:
    """A text stream that hands complete lines to a function (a log handler's stream)."""

    def __init__(self, write_line: Callable[[str], None]):
        self.write_line = write_line
        self._pending = ""

    def write(self, text: str) -> int:
        with _lock:  # a record's lines together: no line another thread relays comes between them
            *lines, self._pending = (self._pending + text).split("\n")
            for line in lines:
                self.write_line(line)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _job_text(states: dict[str, str]) -> str:
    return ", ".join(f"{job} {state}" for job, state in states.items())


def _clock(seconds: float) -> str:
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{sec:02d}" if hours else f"{minutes}:{sec:02d}"


def follow(handle: RunHandle) -> dict[str, Any]:
    """Wait for a launch and return its report (``handle.result()``), with the live display on an
    interactive terminal when the launch's workers do not write to it."""
    if _mode != LIVE:
        return handle.result()
    try:
        cluster = get_launcher(handle.launcher).on_cluster
    except Exception:  # noqa: BLE001 - an unknown launcher: no display
        cluster = False
    if not (cluster or getattr(handle, "workers_in_logs", False)):
        return handle.result()  # e.g. mpirun: its ranks write to this terminal
    try:
        display = LiveDisplay(handle, cluster=cluster)
    except Exception as exc:  # noqa: BLE001 - no display is better than no run
        log.debug("no live display: %r", exc)
        return handle.result()
    with display.shown():
        return handle.result()
