"""Local launcher: one worker process per model replica on this machine's visible GPUs (one on a
machine without GPUs), then the reduce step in this process."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shardinfer.config import Config
from shardinfer.engines.registry import get_engine
from shardinfer.errors import EXIT_CONFIG, ConfigError, RunError
from shardinfer.launch.base import Launcher, LaunchRecord, RunHandle
from shardinfer.launch.env import FROM_ARGUMENTS
from shardinfer.launch.gpus import gpu_groups, visible_gpus
from shardinfer.launch.lock import PARENT_ENV, inherited_fds
from shardinfer.launch.running import ended_here, pid_alive, started_here
from shardinfer.ledger.claims import Ledger
from shardinfer.ledger.rundir import RunDir
from shardinfer.planning.plan import Plan
from shardinfer.reduce.merge import reduce_run
from shardinfer.telemetry import console
from shardinfer.telemetry.console import ConsoleRelay, log_tail
from shardinfer.telemetry.logs import CONSOLE_FD_ENV, CONSOLE_LEVEL_ENV

log = logging.getLogger(__name__)


def replica_gpu_groups(cfg: Config) -> list[list[str]]:
    """The visible GPUs split into one group per worker: ``run.workers`` of them, or as many
    whole model replicas as fit (the engine says how many GPUs a replica takes); [[]] without GPUs."""
    gpus = visible_gpus()
    per_replica = get_engine(cfg.model.engine).replica_gpus(cfg.model, len(gpus)) if gpus else 0
    workers = cfg.run.workers or (max(1, len(gpus) // per_replica) if per_replica else 1)
    try:
        return gpu_groups(gpus, workers)
    except ValueError as exc:
        raise ConfigError(f"run.workers: {exc}. Lower run.workers or make more GPUs visible.") from exc


class LocalLauncher(Launcher):
    name = "local"
    description = "worker processes on this machine, one per model replica on the visible GPUs; then the reduce"
    on_cluster = False
    ranks = FROM_ARGUMENTS  # each worker is started with --rank R --world W and its CUDA_VISIBLE_DEVICES

    def workers(self, cfg: Config) -> int:
        return len(replica_gpu_groups(cfg))

    def check(self, cfg: Config) -> None:
        get_engine(cfg.model.engine).check_installed()
        replica_gpu_groups(cfg)

    def preview(self, cfg: Config, run_dir: RunDir) -> str:
        groups = replica_gpu_groups(cfg)
        lines = [f"# {len(groups)} local worker(s), then the reduce in this process"]
        for rank, gpus in enumerate(groups):
            env = f"CUDA_VISIBLE_DEVICES={','.join(gpus)} " if gpus else ""
            lines.append(env + shlex.join(_worker_command(run_dir, rank, len(groups), 0)))
        return "\n".join(lines)

    def start(self, cfg: Config, run_dir: RunDir, plan: Plan, launch: int) -> RunHandle:
        groups = replica_gpu_groups(cfg)
        done = Ledger(run_dir).done_set()
        todo = [u for u in plan.units if u.unit not in done]
        groups = groups[:min(len(groups), len(todo))]
        if todo:
            log.info("%d units to do (%d rows in the run); starting %d worker(s)", len(todo), plan.total_rows,
                     len(groups))
        quiet = console.mode() != console.VERBOSE
        relays: list[ConsoleRelay] = []
        procs = []
        for rank, gpus in enumerate(groups):
            relay = ConsoleRelay() if quiet else None
            procs.append(_spawn(run_dir, cfg, rank, len(groups), gpus, launch, relay))
            if relay is not None:
                relays.append(relay)
        return LocalHandle(run_dir, LaunchRecord(launch=launch, launcher=self.name), procs, relays)

    def active(self, record: LaunchRecord) -> bool:
        return pid_alive(record)


class LocalHandle(RunHandle):
    """Worker processes of this machine; ``result()`` waits for them and reduces. With ``relays``
    (one per worker) the workers' output is in their log files, and a worker that fails has the end
    of its log shown on the console."""

    def __init__(self, run_dir: RunDir, record: LaunchRecord, procs: list[subprocess.Popen],
                 relays: list[ConsoleRelay] | None = None):
        super().__init__(run_dir, record)
        self.procs = procs
        self.relays = relays or []
        self.workers_in_logs = bool(relays)  # this console is free for a live display
        self._errors_shown: dict[str, int] = {}  # a failed worker's last error -> the rank whose log was shown
        started_here(record)

    def states(self) -> dict[str, str]:
        codes = [p.poll() for p in self.procs]
        return {f"worker {rank}": "RUNNING" if c is None else ("COMPLETED" if c == 0 else f"FAILED ({_exit_text(c)})")
                for rank, c in enumerate(codes)}

    def done(self) -> bool:
        return all(p.poll() is not None for p in self.procs)

    def result(self, timeout_s: float | None = None) -> dict[str, Any]:
        try:
            codes = self._wait_all(timeout_s)
        finally:
            if self.done():
                ended_here(self.record)
                for relay in self.relays:
                    relay.join(2.0)
        failures = {rank: code for rank, code in enumerate(codes) if code != 0}
        try:
            report = reduce_run(self.run_dir)
        except RunError as exc:
            if failures and set(failures.values()) == {EXIT_CONFIG}:
                raise ConfigError(f"{died_text(len(failures), len(codes))} on a config error; running again "
                                  f"will not help until it is fixed.{failure_text(self.run_dir, failures)} "
                                  f"{_committed_text(self.run_dir)}") from exc
            raise RunError(f"{exc}{failure_text(self.run_dir, failures)}") from exc
        if failures:  # the others finished the units of those that died
            log.warning("%s.%s", died_text(len(failures), len(codes)), failure_text(self.run_dir, failures))
        return report

    def _wait_all(self, timeout_s: float | None) -> list[int]:
        """Wait for every worker; a worker that dies has its units given back at once, so the
        others take them over without waiting for its leases to go stale."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        seen: set[int] = set()
        try:
            while len(seen) < len(self.procs):
                for rank, p in enumerate(self.procs):
                    if rank not in seen and p.poll() is not None:
                        seen.add(rank)
                        if p.returncode != 0:
                            self._give_back(rank, p)
                            self._show_log_end(rank, p.returncode)
                if deadline is not None and time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(str(self.procs[0].args), timeout_s or 0)
                time.sleep(0.2)
        except KeyboardInterrupt:
            for p in self.procs:
                p.send_signal(signal.SIGTERM)
            for p in self.procs:
                p.wait()
            raise
        return [int(p.returncode) for p in self.procs]

    def _give_back(self, rank: int, proc: subprocess.Popen) -> None:
        units = Ledger(self.run_dir).expire_claims_of(f"{socket.gethostname()}:{proc.pid}:rank{rank}")
        if units:
            log.warning("worker %d died holding units %s; they are given back to the others", rank, units)

    def _show_log_end(self, rank: int, code: int) -> None:
        """The last lines of a failed worker's log, whose output went there rather than to the
        console; once per way of failing (workers that all died of one config error show one log)."""
        if not self.relays:
            return  # --verbose: its output was on the console
        self.relays[rank].join(1.0)  # its own last words first
        path = self.run_dir.worker_log(rank)
        error = _last_error(path)
        if error and error in self._errors_shown:
            log.error("worker %d exited with %s%s, as worker %d did (log: %s)", rank, _exit_text(code), error,
                      self._errors_shown[error], path)
            return
        self._errors_shown[error] = rank
        lines = log_tail(path)
        if not lines:
            log.error("worker %d exited with %s; its log %s is empty", rank, _exit_text(code), path)
            return
        log.error("worker %d exited with %s; the last %d lines of %s:\n%s", rank, _exit_text(code), len(lines),
                  path, "\n".join(f"  | {line}" for line in lines))


def _worker_command(run_dir: RunDir, rank: int, world: int, launch: int) -> list[str]:
    return [sys.executable, "-m", "shardinfer.worker", str(run_dir.path), "--launcher", LocalLauncher.name,
            "--rank", str(rank), "--world", str(world), "--launch", str(launch)]


def _spawn(run_dir: RunDir, cfg: Config, rank: int, world: int, gpus: list[str], launch: int,
           relay: ConsoleRelay | None = None) -> subprocess.Popen:
    """Start one worker. With a ``relay``, its stdout and stderr (engine start-up messages, library
    warnings) are appended to its log file, and the lines of shardinfer's own loggers that a person
    should see come to the console through the relay; without, its output is on this console."""
    env = {**os.environ, **cfg.run.env, "PYTHONUNBUFFERED": "1"}
    if rank > 0 and relay is None:  # on the console, one rank shows the engine's start-up details
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    env[PARENT_ENV] = str(os.getpid())  # the worker stops when this process dies
    cmd = _worker_command(run_dir, rank, world, launch)
    log.debug("starting worker %d: %s", rank, " ".join(cmd))
    # Its own session: a Ctrl-C at the terminal reaches this process only, which drains the workers;
    # the launch lock is inherited, so the run directory stays locked while the worker lives.
    if relay is None:
        return subprocess.Popen(cmd, env=env, start_new_session=True, pass_fds=inherited_fds(run_dir))
    env[CONSOLE_FD_ENV] = str(relay.write_fd)
    if console.mode() == console.LIVE and "SHARDINFER_LOG_LEVEL" not in os.environ:
        env[CONSOLE_LEVEL_ENV] = "WARNING"  # above the live display: what a person must see
    try:
        with open(run_dir.worker_log(rank), "ab") as out:
            proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, pass_fds=(*inherited_fds(run_dir), relay.write_fd))
    except BaseException:
        relay.abandon()
        raise
    relay.start()
    return proc


def died_text(died: int, workers: int) -> str:
    """How many workers died, of how many."""
    if died == workers:
        return f"the {workers} worker{'s' if workers > 1 else ''} died" if workers > 1 else "the worker died"
    return f"{died} of {workers} workers died; the others finished their units"


def _committed_text(run_dir: RunDir) -> str:
    if Ledger(run_dir).done_set():
        return ("Units committed before are kept: after the fix, `shardinfer run` continues the run if the fix leaves "
                "the results settings as they were; otherwise set run.directory to a new directory.")
    return "Nothing was committed: fix the config and run again; the run is planned anew."


def failure_text(run_dir: RunDir, failures: dict[int, int]) -> str:
    """How the failed workers ended, each way said once with the ranks that ended so."""
    if not failures:
        return ""
    ways: dict[str, list[int]] = {}
    for rank, code in sorted(failures.items()):
        ways.setdefault(f"exited with {_exit_text(code)}{_last_error(run_dir.worker_log(rank))}", []).append(rank)
    parts = [f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} {way}" for way, ranks in ways.items()]
    return f" Workers that failed: {'; '.join(parts)} (logs: {run_dir.logs})."


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def _last_error(log_file: Path) -> str:
    """The first line of the last ERROR record in a worker's log, if any."""
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line for line in lines if " ERROR " in line]
    if not errors:
        return ""
    message = errors[-1].split(": ", 1)[-1]
    following = lines[lines.index(errors[-1]) + 1:]
    detail = next((line for line in reversed(following) if line and not line.startswith(" ")), "")
    return f": {message}" + (f" ({detail})" if detail and detail != errors[-1] else "")


LAUNCHERS = [LocalLauncher()]
