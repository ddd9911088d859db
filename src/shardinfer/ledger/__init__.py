"""The run directory and its protocol: run state, claims and commits, the idle workers' scheduler."""

from typing import Any

from shardinfer import _moved


def __getattr__(name: str) -> Any:  # the names of the earlier module shardinfer.ledger
    return _moved.forward("ledger", "claims", name)
