"""Typed records where data crosses a format boundary: what a run reads back from its own files
(``plan.json``, the workers' metrics) and the OpenAI Batch API's request and output lines.

The records are dataclasses or pydantic models, checked with pydantic when they are read. This
module words a pydantic :class:`~pydantic.ValidationError` for the user: the fields that are wrong,
each named by its path in the file (``units[3].segments[0].start``), and what was found there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

_SHOWN = 3  # wrong fields named in one message
_INPUT_CHARS = 60  # of the value found, shown


def field_path(loc: Sequence[int | str]) -> str:
    """``("units", 3, "rows")`` as ``units[3].rows``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "top level"


def describe_errors(exc: ValidationError) -> str:
    """The wrong fields of a record, e.g. ``units[3].rows: input should be a valid integer (found 'x')``."""
    errors = exc.errors(include_url=False)
    shown = "; ".join(f"{field_path(e['loc'])}: {_problem(e)}" for e in errors[:_SHOWN])
    return shown + (f" (and {len(errors) - _SHOWN} more)" if len(errors) > _SHOWN else "")


def _problem(error: Any) -> str:
    if error["type"] == "missing":
        return "missing"
    message = str(error["msg"]).removeprefix("Value error, ")
    found = repr(error["input"])
    if len(found) > _INPUT_CHARS:
        found = found[:_INPUT_CHARS - 3] + "..."
    return f"{message[:1].lower()}{message[1:]} (found {found})"
