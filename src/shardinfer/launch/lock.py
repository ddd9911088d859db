"""One launcher at a time per run directory, and local workers that do not outlive their launcher.

:func:`launch_lock` holds an exclusive lock on ``RUN_DIR/.launch.lock`` while a launch is planned,
numbered, started and recorded, so two commands started at the same moment cannot both plan the
run or both become launch 0: the second is refused. The local launcher's workers inherit the lock
(the same open file), so the run directory stays locked while any of them lives, also when the
launching process was killed. Filesystems without file locks run unlocked (the launch records still
refuse a second launch of a run that is running).

:func:`die_with_parent` is called by a local worker at start: when its launcher dies, the kernel
sends it SIGTERM, and :func:`orphaned` tells the worker to stop at once (it and the engine processes
in its process group) instead of running on unseen.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shardinfer.errors import RunError
from shardinfer.ledger.rundir import RunDir

log = logging.getLogger(__name__)

PARENT_ENV = "SHARDINFER_PARENT_PID"  # set by the local launcher for its workers
_UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
_HELD: dict[Path, int] = {}  # run directory -> the descriptor of its lock held by this process
_PR_SET_PDEATHSIG = 1


@contextmanager
def launch_lock(run_dir: RunDir, wait_s: float = 10.0) -> Iterator[None]:
    """Hold the run directory's launch lock; RunError when another process still holds it after
    ``wait_s`` (the workers of a launcher that was just killed take a moment to stop)."""
    run_dir.path.mkdir(parents=True, exist_ok=True)
    path = run_dir.launch_lock
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _lock(fd, wait_s)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunError(f"{run_dir.path} is in use: {holder} is starting a launch of it, or its workers are "
                       f"still running. Wait for them (`shardinfer status {run_dir.path}`) or stop them "
                       f"before launching again.") from None
    except OSError as exc:
        os.close(fd)
        if exc.errno not in _UNSUPPORTED:
            raise
        log.info("the filesystem of %s has no file locks: launching without the launch lock", run_dir.path)
        yield
        return
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"shardinfer pid {os.getpid()} on {socket.gethostname()} (since {time.ctime()})".encode(), 0)
    key = run_dir.path.resolve()
    _HELD[key] = fd
    try:
        yield
    finally:
        _HELD.pop(key, None)
        os.close(fd)


def _lock(fd: int, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def inherited_fds(run_dir: RunDir) -> tuple[int, ...]:
    """The lock descriptor for workers to inherit (none when this process holds no lock on it)."""
    fd = _HELD.get(run_dir.path.resolve())
    return () if fd is None else (fd,)


def die_with_parent() -> None:
    """A local worker: have the kernel send SIGTERM when the launcher that started it dies (Linux);
    exit at once when it is gone already."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the launch lock still refuses a second launcher
        log.debug("no parent-death signal on this system")
    if orphaned():
        stop_orphan()


def orphaned() -> bool:
    """Whether this worker's launcher is gone."""
    parent = os.environ.get(PARENT_ENV)
    return bool(parent) and str(os.getppid()) != parent


def stop_orphan() -> None:
    """Stop now, with the engine processes this worker started (its process group when it leads one)."""
    log.error("the shardinfer process that started this worker is gone: stopping now; "
              "`shardinfer resume` redoes the units this worker held")
    logging.shutdown()
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(1)
