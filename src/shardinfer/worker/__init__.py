"""The rank loop: claim, prepare, generate, commit (``python -m shardinfer.worker``)."""

from typing import Any

from shardinfer import _moved


def __getattr__(name: str) -> Any:  # the names of the earlier module shardinfer.worker
    return _moved.forward("worker", "entry" if name in ("main", "start_worker") else "loop", name)
