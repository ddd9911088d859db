"""Logging set-up: rank-prefixed lines on the console, a DEBUG file per worker.

A local worker whose launcher keeps the console for itself (see :mod:`shardinfer.telemetry.console`)
is started with its stdout and stderr in its log file and a pipe to the launcher named in
``SHARDINFER_CONSOLE_FD``: its console lines then go to that pipe, and only those of shardinfer's own
loggers at ``SHARDINFER_CONSOLE_LEVEL`` or above (engines' and libraries' messages stay in the log
file), without tracebacks (the log file has them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import IO

from shardinfer.errors import is_disk_full

# Held while a record or a relayed line is written to the console, so that a multi-line record (a
# failed worker's log tail) is never cut by a line another thread relays.
CONSOLE_LOCK = threading.RLock()

_FORMAT = "%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s"

CONSOLE_FD_ENV = "SHARDINFER_CONSOLE_FD"  # a local worker's pipe to its launcher's console
CONSOLE_LEVEL_ENV = "SHARDINFER_CONSOLE_LEVEL"  # the lowest level of the records sent there

_console_stream: IO[str] | None = None  # where this process's console lines go (None: stderr)


def setup_logging(*, rank: int | None = None, world: int | None = None, log_file: Path | None = None) -> None:
    global _console_stream
    prefix = f"[rank {rank}/{world} {socket.gethostname()}] " if rank is not None else ""
    fmt = logging.Formatter(_FORMAT.format(prefix=prefix), datefmt="%H:%M:%S")
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG)
    level = os.environ.get("SHARDINFER_LOG_LEVEL", "INFO").upper()
    if _console_stream is None:  # set up again (once the rank, then the log file is known): the same pipe
        _console_stream = _console_pipe()
    if _console_stream is None:
        console: logging.StreamHandler = logging.StreamHandler()
        console.setFormatter(fmt)
        console.setLevel(level)
    else:
        console = _RelayHandler(_console_stream)
        console.setFormatter(_ConsoleFormatter(_FORMAT.format(prefix=prefix), datefmt="%H:%M:%S", log_file=log_file))
        console.addFilter(_own_records)
        console.setLevel(os.environ.get(CONSOLE_LEVEL_ENV, level).upper())
        if log_file is None:  # until it is known, records go to stderr: the launcher sent it to the log file
            early = logging.StreamHandler()
            early.setFormatter(fmt)
            early.setLevel(level)
            root.addHandler(early)
    root.addHandler(console)
    if log_file is not None:
        handler = _FileHandler(log_file)
        handler.setFormatter(fmt)
        handler.setLevel(logging.DEBUG)
        root.addHandler(handler)
    for noisy in ("urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _console_pipe() -> IO[str] | None:
    """The pipe to the launcher's console, when this worker was given one (taken from the
    environment, so that processes this one starts do not write to it)."""
    fd = os.environ.pop(CONSOLE_FD_ENV, "")
    if not fd.isdigit():
        return None
    try:
        return open(int(fd), "w", buffering=1, encoding="utf-8", errors="replace")
    except OSError:
        return None


def _own_records(record: logging.LogRecord) -> bool:
    return record.name == "shardinfer" or record.name.startswith("shardinfer.")


class _ConsoleFormatter(logging.Formatter):
    """A record's lines without its traceback, which the log file keeps."""

    def __init__(self, fmt: str, datefmt: str, log_file: Path | None):
        super().__init__(fmt, datefmt=datefmt)
        self.where = str(log_file) if log_file is not None else "the worker's log"

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            text = super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved
        return text + (f" (traceback in {self.where})" if saved[0] or saved[1] else "")


class _RelayHandler(logging.StreamHandler):
    """The pipe to the launcher's console; once the launcher is gone (killed), its lines are dropped
    quietly: the log file has them."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            logging.getLogger().removeHandler(self)
            return
        super().handleError(record)


def console_stream() -> IO[str]:
    """Where this process's console lines go: its launcher's console pipe, or stderr."""
    return _console_stream or sys.stderr


class _FileHandler(logging.FileHandler):
    """A log file that, when its disk is full, says so once on the console and stops writing,
    instead of printing a traceback for every record."""

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if exc is None or not is_disk_full(exc):
            super().handleError(record)
            return
        logging.getLogger().removeHandler(self)
        with contextlib.suppress(OSError, ValueError):  # the console may be that file too
            console_stream().write(f"{time.strftime('%H:%M:%S')} WARNING shardinfer.logs: disk full at "
                                   f"{self.baseFilename}: logging to the console only\n")
