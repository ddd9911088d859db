"""After the work: merge the parts, publish the result set, report, plots."""

from typing import Any

from shardinfer import _moved


def __getattr__(name: str) -> Any:  # the names of the earlier module shardinfer.reduce
    return _moved.forward("reduce", "merge", name)
