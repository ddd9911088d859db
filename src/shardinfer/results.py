"""The results contract: one row per input row, with these columns, in this order.

| column | type | meaning |
|---|---|---|
| id | string | the row id (id column, else ``<file>:<row>``) |
| output | string | generated text; null when failed |
| status | string | ok, truncated (input cut to fit, head and tail kept) or failed |
| error | string | null unless failed: ``<reason>: <details>`` |
| prompt_tokens | int64 | tokens of the prompt sent to the engine; null when failed before it |
| output_tokens | int64 | generated tokens; null when failed |
| finish_reason | string | stop (EOS or a stop string) or length (max_tokens); null when failed |
| ...pass-through columns from the input |

Parts also carry ``_row`` (the global input row index) which the reducer uses to order and dedupe.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

ROW = "_row"
CONTRACT = ["id", "output", "status", "error", "prompt_tokens", "output_tokens", "finish_reason"]
_TYPES = {
    ROW: pa.int64(), "id": pa.string(), "output": pa.string(), "status": pa.string(), "error": pa.string(),
    "prompt_tokens": pa.int64(), "output_tokens": pa.int64(), "finish_reason": pa.string(),
}


def result_table(rows: Any, problems: list[str | None], prompts: list[Any], completions: list[Any],
                 passthrough: list[str]) -> pa.Table:
    """Assemble a unit's results: every input row gets exactly one result row."""
    cols: dict[str, list[Any]] = {name: [] for name in _TYPES}
    for i, row in enumerate(rows.rows):
        record = _record(problems[i], prompts[i], completions[i])
        cols[ROW].append(row)
        cols["id"].append(rows.ids[i])
        for name in CONTRACT[1:]:
            cols[name].append(record.get(name))
    arrays = {name: pa.array(values, type=_TYPES[name]) for name, values in cols.items()}
    for name in passthrough:
        arrays[name] = passthrough_array([c.get(name) for c in rows.columns])
    return pa.table(arrays)


def _record(problem: str | None, prompt: Any, completion: Any) -> dict[str, Any]:
    if problem is not None:
        return _failed(problem)
    if prompt.problem is not None:
        return _failed(prompt.problem)
    if isinstance(completion, Exception):
        return {**_failed(f"engine_error: {type(completion).__name__}: {completion}"),
                "prompt_tokens": len(prompt.token_ids)}
    return {
        "output": completion.text, "status": "truncated" if prompt.truncated else "ok",
        "prompt_tokens": len(prompt.token_ids), "output_tokens": len(completion.token_ids),
        "finish_reason": completion.finish_reason,
    }


def _failed(error: str) -> dict[str, Any]:
    return {"status": "failed", "error": error}


def empty_result_schema(passthrough: list[str]) -> pa.Schema:
    return pa.schema([(name, _TYPES[name]) for name in CONTRACT] + [(name, pa.null()) for name in passthrough])


def passthrough_array(values: list[Any]) -> pa.Array:
    """Values as Arrow; a column of mixed types (JSONL) falls back to JSON text."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values],
                        type=pa.string())
