"""Logging set-up: rank-prefixed lines on the console, a DEBUG file per worker."""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from pathlib import Path

from shardinfer.errors import is_disk_full

_FORMAT = "%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s"


def setup_logging(*, rank: int | None = None, world: int | None = None, log_file: Path | None = None) -> None:
    prefix = f"[rank {rank}/{world} {socket.gethostname()}] " if rank is not None else ""
    fmt = logging.Formatter(_FORMAT.format(prefix=prefix), datefmt="%H:%M:%S")
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG)
    console = logging.StreamHandler()
    console.setFormatter(fmt)
    console.setLevel(os.environ.get("SHARDINFER_LOG_LEVEL", "INFO").upper())
    root.addHandler(console)
    if log_file is not None:
        handler = _FileHandler(log_file)
        handler.setFormatter(fmt)
        handler.setLevel(logging.DEBUG)
        root.addHandler(handler)
    for noisy in ("urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _FileHandler(logging.FileHandler):
    """A log file that, when its disk is full, says so once on the console and stops writing,
    instead of printing a traceback for every record."""

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if exc is None or not is_disk_full(exc):
            super().handleError(record)
            return
        logging.getLogger().removeHandler(self)
        sys.stderr.write(f"{time.strftime('%H:%M:%S')} WARNING shardinfer.logs: disk full at {self.baseFilename}: "
                         f"logging to the console only\n")
