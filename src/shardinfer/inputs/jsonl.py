"""JSON Lines and OpenAI batch files (also compressed): a JSON object a line.

A JSONL block is parsed by Arrow's JSON parser when it takes the whole block; a block with a line it
rejects (bad JSON, a value of another type than the same key's in other lines, invalid UTF-8, a line
nested too deep) is read line by line in Python, where each such line fails alone. Strings that
look like dates stay strings. An OpenAI batch file's line is a request, kept whole as the row's text
and known by its ``custom_id``.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.json as pj

from shardinfer.inputs import storage
from shardinfer.inputs.files import OPENAI_ID, OPENAI_REQUEST, Columns, InputFile
from shardinfer.inputs.lines import LineReader, blocks, byte_positions, line_bounds, row_positions, valid_utf8
from shardinfer.inputs.rows import ReadStats, has_surrogates, normalize, records_table, text_problem

_SCHEMA_PEEK_ROWS = 1000  # lines whose keys are the columns of a file
_MAX_JSON_DEPTH = 256  # JSONL lines nested deeper fail (bad_json); Python's parser stops near 1000
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_BOM = b"\xef\xbb\xbf"


class JsonlReader(LineReader):
    """JSON Lines: every line that is not blank is a row, its object's keys the columns."""

    def scan(self, f: InputFile, cols: Columns, invalid_utf8: str, stats: ReadStats,
             gz_index: Path | None = None) -> Iterator[pa.Table]:
        first_row, line = 0, 1
        for offset, data in blocks(f, gz_index, stats):
            table = self.block(data, offset, line, f, cols, invalid_utf8, stats, first_row, gz_index)
            line += data.count(b"\n")
            first_row += table.num_rows
            if table.num_rows:  # a block of blank lines holds no row
                yield table

    def block(self, data: bytes, offset: int, line: int, f: InputFile, cols: Columns, invalid_utf8: str,
              stats: ReadStats, first_row: int, gz_index: Path | None = None) -> pa.Table:
        """Arrow's parser when it takes the block, else line by line."""
        starts, ends, filled = line_bounds(data)
        rows = np.flatnonzero(filled)
        positions = row_positions(data, offset, line, starts, rows)
        # Arrow's parser takes time quadratic in the nesting depth and crashes the process on lines
        # nested thousands deep: a block with such a line is read line by line, where it fails alone.
        deep = _too_deep(data, starts[rows], ends[rows])
        table = None if deep.any() else _arrow_json(data, len(rows), cols)
        if table is None:
            table, problems = _json_lines(data, starts[rows], ends[rows], line + rows, invalid_utf8, stats, cols, deep)
            return normalize(table, f, cols, first_row, problems, positions)
        return normalize(table, f, cols, first_row, None, positions)

    def columns(self, path: str) -> set[str]:
        """The keys of the objects in the first lines."""
        keys: set[str] = set()
        with storage.open_decompressed(path) as fh:
            for i, raw in enumerate(fh):
                try:
                    obj = json.loads(raw.removeprefix(_BOM).decode("utf-8", "replace"))
                except (json.JSONDecodeError, RecursionError):
                    obj = None
                if isinstance(obj, dict):
                    keys.update(obj)
                if i >= _SCHEMA_PEEK_ROWS:
                    break
        return keys


class OpenAIBatchReader(JsonlReader):
    """An OpenAI batch file: every line is a request, kept whole as its text and known by its
    ``custom_id``; a line that is not a JSON object fails alone."""

    def block(self, data: bytes, offset: int, line: int, f: InputFile, cols: Columns, invalid_utf8: str,
              stats: ReadStats, first_row: int, gz_index: Path | None = None) -> pa.Table:
        starts, ends, filled = line_bounds(data)
        rows = np.flatnonzero(filled)
        texts: list[str | None] = []
        ids: list[str | None] = []
        problems: list[str | None] = []
        for start, end, lineno in zip(starts[rows].tolist(), ends[rows].tolist(), (line + rows).tolist()):
            raw = data[start:end]
            if start == 0 and raw.startswith(_BOM):
                raw = raw[3:]
            text, problem = _decode(raw, invalid_utf8, f"line {lineno}", stats)
            custom_id, problem = _request_id(text, lineno, problem)
            texts.append(text)
            ids.append(custom_id)
            problems.append(problem)
        table = pa.table({OPENAI_REQUEST: pa.array(texts, pa.string()), OPENAI_ID: pa.array(ids, pa.string())})
        positions = row_positions(data, offset, line, starts, rows)
        return normalize(table, f, cols, first_row, pa.array(problems, pa.string()), positions)


def _request_id(text: str | None, lineno: int, problem: str | None) -> tuple[str | None, str | None]:
    """A request line's custom_id, or why the line is not a request."""
    if text is None:
        return None, problem
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"invalid_json: line {lineno}: {exc.msg} at column {exc.colno}"
    except RecursionError:
        return None, f"invalid_json: line {lineno} is nested too deep"
    if not isinstance(obj, dict):
        return None, f"invalid_json: line {lineno} is a JSON {type(obj).__name__}, not a request object"
    custom_id = obj.get("custom_id")
    if isinstance(custom_id, (int, float)) and not isinstance(custom_id, bool):
        custom_id = str(custom_id)
    if isinstance(custom_id, str) and has_surrogates(custom_id):
        custom_id = _without_surrogates(custom_id)
    return (custom_id if isinstance(custom_id, str) else None), problem


# ---- a block parsed by Arrow ------------------------------------------------------------------


def _arrow_json(data: bytes, expected_rows: int, cols: Columns) -> pa.Table | None:
    """The block parsed by Arrow, or None when any line is not a JSON object of consistent types or
    the block is not valid UTF-8 (Arrow's parser does not check every string). Arrow takes strings
    that look like dates for timestamps: the columns read are parsed again as the strings they are."""
    read_options = pj.ReadOptions(block_size=max(len(data), 1 << 20) + 1)
    if not valid_utf8(data):
        return None
    try:
        table = pj.read_json(io.BytesIO(data), read_options=read_options)
        dated = [name for name in cols.wanted
                 if name in table.column_names and pa.types.is_temporal(table.schema.field(name).type)]
        if dated:
            as_text = pj.ParseOptions(explicit_schema=pa.schema([(name, pa.string()) for name in dated]))
            table = pj.read_json(io.BytesIO(data), read_options=read_options, parse_options=as_text)
    except Exception:  # noqa: BLE001 - bad JSON, mixed types, bad UTF-8: the line-by-line reader says which
        return None
    return table if table.num_rows == expected_rows else None


# ---- lines nested too deep for Arrow's parser -------------------------------------------------


def _too_deep(data: bytes, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Which lines nest arrays and objects more than _MAX_JSON_DEPTH deep. Only the rare lines that
    hold that many opening brackets at all are looked into (strings skipped)."""
    out = np.zeros(len(starts), dtype=bool)
    arr = np.frombuffer(data, dtype=np.uint8)
    opens = byte_positions(arr, 91, 123)  # [ {
    if len(opens) <= _MAX_JSON_DEPTH:
        return out
    counts = np.searchsorted(opens, ends) - np.searchsorted(opens, starts)
    for i in np.flatnonzero(counts > _MAX_JSON_DEPTH).tolist():
        out[i] = _json_depth(arr[starts[i]:ends[i]]) > _MAX_JSON_DEPTH
    return out


def _json_depth(line: np.ndarray) -> int:
    """The deepest nesting of brackets in one line of JSON, brackets inside strings left out."""
    quotes = byte_positions(line, 34)
    backslashes = byte_positions(line, 92)
    if len(quotes) and len(backslashes):  # a quote after an odd run of backslashes is inside a string
        run_starts = backslashes[np.concatenate([[0], np.flatnonzero(np.diff(backslashes) != 1) + 1])]
        before = np.searchsorted(backslashes, quotes) - 1  # the last backslash before each quote
        follows = (before >= 0) & (backslashes[np.maximum(before, 0)] == quotes - 1)
        run = quotes - run_starts[np.searchsorted(run_starts, backslashes[np.maximum(before, 0)], side="right") - 1]
        quotes = quotes[~(follows & (run % 2 == 1))]
    brackets = byte_positions(line, 91, 123, 93, 125)  # [ { ] }
    brackets = brackets[np.searchsorted(quotes, brackets) % 2 == 0]  # an even number of quotes before: outside
    kinds = line[brackets]
    steps = np.where((kinds == 91) | (kinds == 123), 1, -1)
    return int(np.cumsum(steps).max(initial=0))


# ---- line by line -----------------------------------------------------------------------------


def _json_lines(data: bytes, starts: np.ndarray, ends: np.ndarray, lines: np.ndarray, invalid_utf8: str,
                stats: ReadStats, cols: Columns, deep: np.ndarray) -> tuple[pa.Table, pa.Array]:
    """Line by line: every line is a row, with its problem (bad JSON, not an object, bad UTF-8,
    nested too deep)."""
    records: list[dict[str, Any]] = []
    problems: list[str | None] = []
    for start, end, lineno, too_deep in zip(starts.tolist(), ends.tolist(), lines.tolist(), deep.tolist()):
        if too_deep:
            records.append({})
            problems.append(f"bad_json: line {lineno} is nested more than {_MAX_JSON_DEPTH} levels deep")
            continue
        raw = data[start:end]
        if start == 0 and raw.startswith(_BOM):
            raw = raw[3:]
        obj, problem = _json_line(raw, lineno, invalid_utf8, stats)
        records.append(obj)
        problems.append(problem)
    _set_aside_non_text(records, problems, cols)
    return records_table(records, cols), pa.array(problems, pa.string())


def _json_line(raw: bytes, lineno: int, invalid_utf8: str, stats: ReadStats) -> tuple[dict[str, Any], str | None]:
    text, problem = _decode(raw, invalid_utf8, f"line {lineno}", stats)
    if text is None:
        return {}, problem
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return {}, f"bad_json: line {lineno}: {exc.msg} at column {exc.colno}"
    except RecursionError:
        return {}, f"bad_json: line {lineno} is nested too deep"
    if not isinstance(obj, dict):
        return {}, f"bad_json: line {lineno} is a JSON {type(obj).__name__}, not an object"
    if _SURROGATE_ESCAPE.search(raw) and _replace_surrogates(obj):
        # \ud800-style escapes of half a character: text that no UTF-8 can hold
        if invalid_utf8 == "fail":
            return {}, f"invalid_utf8: line {lineno}: an escape of half a UTF-16 surrogate pair"
        stats.replaced_utf8 += 1
    return obj, None


def _replace_surrogates(obj: Any) -> bool:
    """Replace lone surrogates in every string of a parsed JSON value with U+FFFD, in place (an
    iterative walk: the value may be nested as deep as the JSON parser allows); whether any was."""
    found = False
    stack = [obj]
    while stack:
        node = stack.pop()
        items = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        for key, value in items:
            if isinstance(value, str) and has_surrogates(value):
                node[key] = _without_surrogates(value)
                found = True
            elif isinstance(value, (dict, list)):
                stack.append(value)
            if isinstance(key, str) and has_surrogates(key):
                node[_without_surrogates(key)] = node.pop(key)
                found = True
    return found


def _without_surrogates(text: str) -> str:
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _decode(raw: bytes, invalid_utf8: str, where: str, stats: ReadStats) -> tuple[str | None, str | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        if invalid_utf8 == "fail":
            return None, f"invalid_utf8: {where}, byte {exc.start}: {exc.reason}"
        stats.replaced_utf8 += 1
        return raw.decode("utf-8", errors="replace"), None


def _set_aside_non_text(records: list[dict[str, Any]], problems: list[str | None], cols: Columns) -> None:
    """A text value that is not a string fails its row (not_text) and leaves the column; a chat
    becomes its JSON text."""
    column = cols.text
    for i, record in enumerate(records):
        value = record.get(column)
        if value is not None and not isinstance(value, str) and cols.kind == "messages":
            record[column] = json.dumps(value, ensure_ascii=False)
        elif value is not None and not isinstance(value, str):
            problems[i] = problems[i] or text_problem(value, column)
            record[column] = None
