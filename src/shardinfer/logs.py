"""Logging set-up: rank-prefixed lines on the console, a DEBUG file per worker."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

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
        handler = logging.FileHandler(log_file)
        handler.setFormatter(fmt)
        handler.setLevel(logging.DEBUG)
        root.addHandler(handler)
    for noisy in ("urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
