"""The one row shape every reader gives, built from a reader's raw columns.

Every reader yields batches with the same columns: ``_text`` (the document text; read it only where
``_problem`` is null), ``_chars`` (its length in characters), ``_id`` (the id column's value as a
string; null when there is no id column), ``_problem`` (why the row fails, or null), the pass-through
and template columns by name, and for text formats ``_offset`` / ``_line`` (byte offset and line
number where the row starts), which the plan keeps at unit starts so a worker reads only its unit's
bytes (Parquet units start at a row group and an offset into it). Texts, ids and problems are
computed with Arrow compute on whole batches (:func:`normalize`); rows that a reader parses one by
one in Python come here as records (:func:`records_table`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shardinfer.inputs.digest import ChunkDigest
from shardinfer.inputs.files import Columns, InputFile
from shardinfer.results import CHARS, ID, PROBLEM, TEXT


@dataclass
class ReadStats:
    """What a read saw besides the rows: rows whose invalid UTF-8 was replaced by U+FFFD, and the
    (uncompressed) bytes a whole-file scan went through."""

    replaced_utf8: int = 0
    bytes_read: int = 0
    digest: ChunkDigest | None = None  # fed every byte of a JSONL scan (the plan's checksums)


def import_lazy_modules() -> None:
    """What the first unit read would import: pyarrow imports pandas (where installed, ~0.3 s) on
    its first array of NumPy data. Workers do it when they open their corpus."""
    text_problems(pa.array(["x"]), "text")


def text_problems(text: pa.Array, column: str) -> tuple[pa.Array, pa.Array, pa.Array]:
    """The text as strings (values of other types become null), why each row cannot be used (null
    where it can) and its length in characters. Rows with a problem keep their text: readers never
    copy the column."""
    n = len(text)
    if pa.types.is_dictionary(text.type):
        text = text.cast(text.type.value_type)
    if _is_string_view(text.type):
        text = text.cast(pa.string())
    missing = f"empty_text: {column!r} is null or missing"
    zeros = pa.array(np.zeros(n, np.int32))
    if pa.types.is_null(text.type):
        return pa.nulls(n, pa.string()), pa.array([missing] * n, pa.string()), zeros
    if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type)):
        message = f"not_text: {column!r} holds a {_type_name(text.type)}, not a string"
        problems = pc.if_else(text.is_null(), missing, message)
        return pa.nulls(n, pa.string()), problems.cast(pa.string()), zeros
    chars = pc.utf8_length(text).fill_null(0).cast(pa.int32())
    empty = pc.or_(pc.equal(chars, 0), pc.utf8_is_space(text))
    none = pa.scalar(None, pa.string())
    problems = pc.if_else(text.is_null(), missing, pc.if_else(empty, f"empty_text: {column!r} is empty", none))
    return text.cast(pa.string()), problems, chars


def text_problem(value: Any, column: str) -> str | None:
    """Why one text value cannot be used, or None (the same rules as :func:`text_problems`)."""
    if value is None:
        return f"empty_text: {column!r} is null or missing"
    if not isinstance(value, str):
        return f"not_text: {column!r} holds a {type(value).__name__}, not a string"
    if not value.strip():
        return f"empty_text: {column!r} is empty"
    return None


def _type_name(t: pa.DataType) -> str:
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return "list"
    if pa.types.is_struct(t):
        return "dict"
    return str(t)


# ---- from a reader's columns to the row shape -------------------------------------------------


def normalize(table: pa.Table, f: InputFile, cols: Columns, first_row: int,
              problems: pa.Array | None = None, positions: dict[str, pa.Array] | None = None,
              invalid_utf8: str = "replace", stats: ReadStats | None = None) -> pa.Table:
    """The one row shape from a reader's raw columns (rows ``first_row``.. of file ``f``)."""
    n = table.num_rows
    raw_text, utf8_problems = _binary_as_text(_column(table, cols.text, n), cols.text, first_row, invalid_utf8, stats)
    if utf8_problems is not None:
        problems = _coalesce(problems, utf8_problems)
    if cols.kind == "messages":
        raw_text = _as_json_text(raw_text)
    text, text_problem_column, chars = text_problems(raw_text, cols.text)
    problems = _coalesce(problems, text_problem_column)
    ids = pa.nulls(n, pa.string())
    if cols.id:
        ids, id_problems = _ids(_column(table, cols.id, n), f.source, first_row, cols.id)
        problems = pc.coalesce(problems, id_problems)
    out = {TEXT: text, ID: ids, PROBLEM: problems.cast(pa.string()), CHARS: chars}
    for name in cols.extra:
        out[name] = _column(table, name, n)
    out.update(positions or {})
    return pa.table(out)


def _coalesce(first: pa.Array | None, second: pa.Array) -> pa.Array:
    return second if first is None else pc.coalesce(first, second)


def _binary_as_text(values: pa.Array, column: str, first_row: int, invalid_utf8: str,
                    stats: ReadStats | None) -> tuple[pa.Array, pa.Array | None]:
    """A binary text column (Parquet, Arrow) as strings: values that are valid UTF-8 are text; the
    others have their bad bytes replaced by U+FFFD (counted in ``stats``) or fail their row
    (``invalid_utf8``), as input.invalid_utf8 says. Other columns are returned as they are."""
    if pa.types.is_dictionary(values.type) and _is_binary(values.type.value_type):
        values = values.cast(values.type.value_type)
    if not _is_binary(values.type):
        return values, None
    target = pa.large_string() if pa.types.is_large_binary(values.type) else pa.string()
    try:
        return values.cast(target), None  # valid UTF-8 throughout: no copy
    except pa.ArrowInvalid:
        pass
    texts: list[str | None] = []
    problems: list[str | None] = []
    for i, raw in enumerate(values.to_pylist()):
        text, problem = None, None
        if raw is not None:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                if invalid_utf8 == "fail":
                    problem = f"invalid_utf8: row {first_row + i}, column {column!r}, byte {exc.start}: {exc.reason}"
                else:
                    text = raw.decode("utf-8", errors="replace")
                    if stats is not None:
                        stats.replaced_utf8 += 1
        texts.append(text)
        problems.append(problem)
    return pa.array(texts, target), pa.array(problems, pa.string())


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or _is_binary_view(t)


# view types came with pyarrow 16
_is_binary_view = getattr(pa.types, "is_binary_view", lambda t: False)
_is_string_view = getattr(pa.types, "is_string_view", lambda t: False)


def _as_json_text(values: pa.Array) -> pa.Array:
    """A chat column as JSON text: lists of messages are serialized, strings (JSON already) kept."""
    if pa.types.is_dictionary(values.type):
        values = values.cast(values.type.value_type)
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type) or pa.types.is_null(values.type):
        return values
    return pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in values.to_pylist()],
                    pa.string())


def _column(table: pa.Table, name: str | None, n: int) -> pa.Array:
    if name is None or name not in table.column_names:
        return pa.nulls(n)
    return table.column(name).combine_chunks()


# ---- ids --------------------------------------------------------------------------------------


def _ids(raw: pa.Array, source: str, first_row: int, column: str) -> tuple[pa.Array, pa.Array]:
    """Ids as strings; an empty id falls back to '<file>:<row>' and fails its row."""
    if pa.types.is_dictionary(raw.type):
        raw = raw.cast(raw.type.value_type)
    if pa.types.is_null(raw.type):
        ids = pa.nulls(len(raw), pa.string())
    elif pa.types.is_string(raw.type) or pa.types.is_large_string(raw.type):
        ids = raw.cast(pa.string())
    else:
        try:
            ids = raw.cast(pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            ids = pa.array([None if v is None else v.decode("utf-8", "replace") if isinstance(v, bytes)
                            else json.dumps(v, default=str) for v in raw.to_pylist()], pa.string())
    missing = pc.or_kleene(ids.is_null(), pc.equal(ids, "")).fill_null(True)
    if not pc.any(missing).as_py():
        return ids, pa.nulls(len(ids), pa.string())
    rows = np.flatnonzero(missing.to_numpy(zero_copy_only=False))
    fallback = [f"{source}:{first_row + int(i)}" for i in rows]
    values = ids.to_pylist()
    problems: list[str | None] = [None] * len(values)
    for i, fb in zip(rows, fallback):
        values[i] = fb
        problems[i] = f"missing_id: column {column!r} is empty; id set to {fb!r}"
    return pa.array(values, pa.string()), pa.array(problems, pa.string())


def default_ids(source: str, first_row: int, n: int) -> pa.Array:
    """'<file>:<row>' ids of rows that have no id column."""
    return pa.array([f"{source}:{first_row + i}" for i in range(n)], pa.string())


def row_ids(table: pa.Table, source: str, first_row: int) -> pa.Array:
    """The rows' ids: the id column's, else '<file>:<row>'."""
    ids = table.column(ID).combine_chunks()
    if ids.null_count == len(ids):
        return default_ids(source, first_row, len(ids))
    return ids


# ---- rows parsed one by one (JSONL lines Arrow rejects, CSV records) --------------------------


def records_table(records: list[dict[str, Any]], cols: Columns) -> pa.Table:
    """Python records as columns; a column of mixed types becomes JSON text (the text column's
    non-strings were already set aside as problems)."""
    out = {name: passthrough_array([r.get(name) for r in records]) for name in cols.wanted}
    return pa.table(out) if out else pa.table({"_": pa.nulls(len(records))})


def passthrough_array(values: list[Any]) -> pa.Array:
    """Values as Arrow; a column of mixed types (JSONL) falls back to JSON text."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values],
                        type=pa.string())


def has_surrogates(value: str) -> bool:
    """Whether a string holds lone surrogates (invalid UTF-8 kept by surrogateescape, or a JSON
    escape of half a UTF-16 pair): text that cannot be written as UTF-8."""
    try:
        value.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True
