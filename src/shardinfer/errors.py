"""The few exception types of shardinfer. Every message says what was set, what was found, and the fix."""


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
