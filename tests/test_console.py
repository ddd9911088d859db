"""The console of a run: a live display on a terminal, engine output in the worker logs, progress
lines off a terminal, --verbose, and the end of a failed worker's log.

Runs use a plugin engine written here: the simulation engine (no model, no GPU) that talks at start-up
like a real one (stdout, stderr, a library's logger) and can fail while it loads."""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from conftest import CPU_ENV, demo_docs, run_cli, write_config, write_jsonl

CHATTY = '''
import dataclasses
import logging
import os
import sys

from shardinfer.bench.sim_engine import SPEC, SleepEngine
from shardinfer.engines.registry import register_engine


class ChattyEngine(SleepEngine):
    name = "chatty"

    def load(self):
        print("CHATTER-STDOUT engine start-up details", flush=True)
        print("CHATTER-STDERR a library warning", file=sys.stderr, flush=True)
        logging.getLogger("fakelib").warning("CHATTER-LOGGER a library logger's warning")
        logging.getLogger("shardinfer.engines.chatty").warning("NOTICE-FOR-PEOPLE the engine runs slowly")
        if os.environ.get("CHATTY_FAIL"):
            for step in range(40):
                print(f"load step {step:02d}", file=sys.stderr, flush=True)
            raise RuntimeError("CHATTY-BROKEN the engine could not start")


register_engine(dataclasses.replace(SPEC, name="chatty", description="talks at start-up", create=ChattyEngine))
'''

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-B]|\x1b[=>]")
SUMMARY = re.compile(r"^rows: 24 in, \d+ ok, \d+ truncated, 0 failed$", re.M)


@pytest.fixture
def chatty_env(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "chatty_engine.py").write_text(CHATTY)
    path = os.pathsep.join(p for p in (str(plugins), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, **CPU_ENV, "SHARDINFER_PLUGINS": "chatty_engine", "PYTHONPATH": path,
           "TERM": "xterm-256color"}
    for name in ("SHARDINFER_LOG_LEVEL", "COLUMNS", "LINES", "NO_COLOR"):
        env.pop(name, None)
    return env


def _config(tmp_path: Path, tiny_model: Path, name: str) -> Path:
    corpus = tmp_path / "docs.jsonl"
    if not corpus.exists():
        write_jsonl(corpus, [{"id": d["id"], "text": d["text"][:3000]} for d in demo_docs(24)])
    return write_config(tmp_path / f"{name}.yaml", corpus=corpus, model_dir=tiny_model, run_dir=tmp_path / name,
                        input={"path": str(corpus), "id_column": "id"},
                        model={"engine": "chatty", "max_model_len": 4096}, sampling={"max_tokens": 200},
                        run={"directory": str(tmp_path / name), "workers": 2, "max_unit_rows": 2,
                             "log_interval_s": 0.5})


def _in_terminal(args: list[str], env: dict[str, str], timeout: float = 300) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal (200 x 40) as stdin, stdout and stderr; its exit code and
    everything it wrote there, escape sequences included."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "shardinfer.cli", *args], stdin=slave, stdout=slave,
                            stderr=slave, env=env)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1.0)[0]:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the last process holding the terminal closed it
                    break
                if not data:
                    break
                chunks.append(data)
        else:
            proc.kill()
            raise AssertionError(f"still running after {timeout} s: {b''.join(chunks)[-3000:]!r}")
        return proc.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")
    finally:
        os.close(master)


def _plain(screen: str) -> str:
    """What was written, without escape sequences and carriage returns."""
    return ANSI.sub("", screen).replace("\r\n", "\n").replace("\r", "\n")


DISPLAY_LINE = re.compile(r"^(?:[\u2800-\u28ff✔✖] \S+ [━╺╸ ]+ |  units \d+/\d+ done)")


def _printed(text: str) -> str:
    """The lines printed above the live display, without its frames (redrawn in place on a terminal)."""
    return "".join(line for line in text.splitlines(keepends=True) if not DISPLAY_LINE.match(line))


def _logs(run_dir: Path) -> dict[int, str]:
    return {rank: (run_dir / "logs" / f"worker-{rank:05d}.log").read_text() for rank in (0, 1)}


@pytest.mark.processes
def test_a_terminal_gets_a_live_display_and_the_engine_output_goes_to_the_worker_logs(tmp_path, tiny_model,
                                                                                     chatty_env):
    run_dir = tmp_path / "live"
    code, screen = _in_terminal(["run", str(_config(tmp_path, tiny_model, "live"))], chatty_env)
    text = _plain(screen)
    assert code == 0, text[-3000:]
    # the live display: a bar redrawn in place, the rows, the workers' states, where the logs are
    assert "━" in text and "\x1b[" in screen
    assert "24/24 rows 100%" in text and "workers: 2 finished" in text and f"logs: {run_dir / 'logs'}" in text
    assert re.search(r"units (\d+)/\1 done", text)
    # the run's summary lines, as off a terminal
    assert SUMMARY.search(text), text[-3000:]
    assert f"results: {run_dir / 'results'}" in text and "report:  " in text
    # engine start-up output and library warnings are in the logs, each line once, not on the console
    assert "CHATTER" not in text and "model loaded" not in text and "progress: " not in text
    for log in _logs(run_dir).values():
        for chatter in ("CHATTER-STDOUT", "CHATTER-STDERR", "CHATTER-LOGGER", "NOTICE-FOR-PEOPLE",
                        "shardinfer.worker: starting rank"):
            assert log.count(chatter) == 1, (chatter, log)
        assert "progress: " in log and "\x1b[" not in log
    # a warning of shardinfer's own, rank-prefixed, is shown above the display
    for rank in (0, 1):
        assert re.search(rf"\[rank {rank}/2 [^]]+\] WARNING shardinfer.engines.chatty: NOTICE-FOR-PEOPLE", text)


@pytest.mark.processes
def test_off_a_terminal_progress_lines_and_with_verbose_the_worker_output(tmp_path, tiny_model, chatty_env):
    proc = run_cli(["run", str(_config(tmp_path, tiny_model, "plain"))], chatty_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert SUMMARY.search(proc.stdout) and "\x1b[" not in proc.stdout + proc.stderr
    assert "[rank 0/2 " in proc.stderr and "[rank 1/2 " in proc.stderr  # rank-prefixed log lines
    assert "shardinfer.progress: progress: " in proc.stderr  # plain progress lines
    assert "NOTICE-FOR-PEOPLE" in proc.stderr and "CHATTER" not in proc.stdout + proc.stderr
    assert all("CHATTER-STDOUT" in log for log in _logs(tmp_path / "plain").values())

    proc = run_cli(["run", str(_config(tmp_path, tiny_model, "verbose")), "--verbose"], chatty_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert SUMMARY.search(proc.stdout)
    out = proc.stdout + proc.stderr
    for chatter in ("CHATTER-STDOUT", "CHATTER-STDERR", "CHATTER-LOGGER"):
        assert out.count(chatter) == 2, chatter  # one of each worker, on the console
    logs = _logs(tmp_path / "verbose")
    assert all("CHATTER-STDOUT" not in log and log.count("CHATTER-LOGGER") == 1 for log in logs.values())


@pytest.mark.processes
def test_a_failed_worker_shows_the_end_of_its_log(tmp_path, tiny_model, chatty_env):
    run_dir = tmp_path / "broken"
    code, screen = _in_terminal(["run", str(_config(tmp_path, tiny_model, "broken"))],
                                {**chatty_env, "CHATTY_FAIL": "1"})
    text = _printed(_plain(screen))
    assert code == 1, text[-3000:]
    shown = re.search(r"worker (\d) exited with code 1; the last 20 lines of (\S+):\n((?:  \| .*\n){20})", text)
    assert shown, text[-5000:]
    rank, path, tail = int(shown[1]), Path(shown[2]), shown[3]
    assert path == run_dir / "logs" / f"worker-{rank:05d}.log"
    assert "RuntimeError: CHATTY-BROKEN the engine could not start" in tail
    expected = [line.rstrip() for line in path.read_text().splitlines() if line.strip()][-20:]
    assert [line[4:] for line in tail.splitlines()] == [line[:239] + "…" if len(line) > 240 else line
                                                         for line in expected]
    # the other worker failed the same way: said in one line, its log not shown again
    assert re.search(rf"worker {1 - rank} exited with code 1: .*CHATTY-BROKEN.*, as worker {rank} did", text)
    assert text.count("the last 20 lines of") == 1
    # the worker's own error line came before, without its traceback (the log has it)
    assert re.search(r"ERROR shardinfer.worker: worker failed \(traceback in \S+worker-0000\d.log\)", text)
    # and the failure summary after it
    assert "shardinfer: " in text and "Workers that failed: ranks 0, 1 exited with code 1" in text
    assert "load step 00" not in text and "load step 39" in path.read_text()


def test_worker_console_lines_through_the_relay_are_shardinfer_records_without_tracebacks(tmp_path,
                                                                                          monkeypatch):
    from shardinfer.telemetry import logs

    read_fd, write_fd = os.pipe()
    # vLLM imported in this process by an earlier test stops its loggers' records at "vllm"
    monkeypatch.setattr(logging.getLogger("vllm"), "propagate", True)
    monkeypatch.setattr(logging.getLogger("vllm.engine"), "propagate", True)
    monkeypatch.setenv(logs.CONSOLE_FD_ENV, str(write_fd))
    monkeypatch.setenv(logs.CONSOLE_LEVEL_ENV, "WARNING")
    monkeypatch.setattr(logs, "_console_stream", None)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup_logging(rank=1, world=2)  # before the worker knows its log file, then with it
        assert logs.CONSOLE_FD_ENV not in os.environ  # not passed on to processes the worker starts
        logging.getLogger("shardinfer.worker").warning("an early warning")
        logs.setup_logging(rank=1, world=2, log_file=tmp_path / "worker.log")
        logging.getLogger("shardinfer.worker").info("an info line")
        logging.getLogger("shardinfer.worker").warning("a warning line")
        logging.getLogger("vllm.engine").warning("an engine warning")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("shardinfer.worker").exception("worker failed")
    finally:
        for handler in root.handlers:
            handler.close()
        logs.console_stream().close()  # the worker's end of the pipe
        root.handlers[:], root.level = saved
    with os.fdopen(read_fd, "rb") as pipe:
        lines = pipe.read().decode().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        f"[rank 1/2 {os.uname().nodename}] WARNING shardinfer.worker: an early warning",
        f"[rank 1/2 {os.uname().nodename}] WARNING shardinfer.worker: a warning line",
        f"[rank 1/2 {os.uname().nodename}] ERROR shardinfer.worker: worker failed "
        f"(traceback in {tmp_path / 'worker.log'})",
    ]
    log = (tmp_path / "worker.log").read_text()
    assert "an info line" in log and "an engine warning" in log and "ValueError: boom" in log


def test_log_tail_keeps_the_last_lines_cut_to_a_width(tmp_path):
    from shardinfer.telemetry.console import log_tail

    path = tmp_path / "worker.log"
    path.write_text("".join(f"line {i}\n" for i in range(30)) + "\n\r\n" + "x" * 500 + "\nbar 1\rbar 2\n")
    tail = log_tail(path, 5, width=100)
    assert tail == ["line 28", "line 29", "x" * 99 + "…", "bar 1", "bar 2"]
    assert log_tail(tmp_path / "missing.log") == []
