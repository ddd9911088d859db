"""The few exception types of shardinfer. Every message says what was set, what was found, and the fix."""

import errno
from pathlib import Path

EXIT_CONFIG = 2  # every process exits with this on a ConfigError: a rerun cannot help until it is fixed
EXIT_FAILED = 1  # the run could not finish: a rerun (resume) may


class ShardinferError(Exception):
    """Base class: an error the user can act on (printed without a traceback by the CLI)."""


class ConfigError(ShardinferError):
    """The configuration (file, overrides or input columns) is invalid; nothing has run yet."""


class RunError(ShardinferError):
    """A run could not finish: workers died or results are incomplete."""


class Refused(Exception):
    """An engine refused one request as invalid (a schema it cannot compile, an option out of its
    range): that row fails alone, with ``invalid_request``; the engine itself is fine."""


class MissingDependency(ShardinferError, ImportError):
    """An optional package (engine, MPI, submitit) is not installed."""


def missing_dependency(module: str, extra: str, hint: str = "") -> MissingDependency:
    """An ImportError that names the extra to install."""
    return MissingDependency(f"{module} is not installed. Install it with: pip install 'shardinfer[{extra}]'"
                             + (f"  ({hint})" if hint else ""))


class DiskFull(RunError):
    """The filesystem of the run directory (or of the results) has no room left."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether an error is a full disk or an exceeded quota (pyarrow's errors carry only the text)."""
    if not isinstance(exc, OSError):
        return False
    return exc.errno in (errno.ENOSPC, errno.EDQUOT) or any(
        text in str(exc) for text in ("No space left on device", "Disk quota exceeded"))


def disk_full(where: str | Path) -> DiskFull:
    return DiskFull(f"disk full at {where}: make room there (or set run.directory to a filesystem with room); "
                    f"committed units are kept, and `shardinfer resume RUN_DIR` goes on from them")
