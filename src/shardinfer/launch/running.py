"""Whether a launch made on this machine still runs: for the launchers whose launch lasts as long
as the process that made it (local workers, mpirun).

Such a launch is recorded with the launching process's pid. When that process is this very one
(the Python API, a ``resume`` after ``run`` in one process), the pid alone cannot tell: the
launches this process started and that have not ended are kept here, by their records' time.
"""

from __future__ import annotations

import os
import socket

from shardinfer.launch.base import LaunchRecord

_RUNNING_HERE: set[float] = set()  # submitted_at of the launches this process runs


def started_here(record: LaunchRecord) -> None:
    """A launch whose workers this process started and waits for."""
    _RUNNING_HERE.add(record.submitted_at)


def ended_here(record: LaunchRecord) -> None:
    """That launch's workers are all gone."""
    _RUNNING_HERE.discard(record.submitted_at)


def pid_alive(record: LaunchRecord) -> bool:
    """Whether the process that made a launch on this machine still runs (unknown elsewhere: no)."""
    if record.host != socket.gethostname() or record.pid <= 0:
        return False
    if record.pid == os.getpid():
        return record.submitted_at in _RUNNING_HERE
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
