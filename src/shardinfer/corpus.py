"""Corpus readers: Parquet, JSONL (also gzipped) and CSV into one row shape, with stable row ids.

A reader never raises on a bad row: the row is kept, with a ``problem`` that the worker turns into a
``failed`` result. Only errors of the whole input (no files, a missing text column) are raised, as
:class:`ConfigError`, before any work starts.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from shardinfer.config import InputConfig
from shardinfer.errors import ConfigError

log = logging.getLogger(__name__)

_SUFFIXES = {
    ".parquet": "parquet", ".pq": "parquet",
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
    ".csv": "csv",
}
_SCHEMA_PEEK_ROWS = 1000


@dataclass
class Rows:
    """The rows of one input file, column by column."""

    source: str
    ids: list[str] = field(default_factory=list)
    texts: list[Any] = field(default_factory=list)
    columns: dict[str, list[Any]] = field(default_factory=dict)
    problems: list[str | None] = field(default_factory=list)
    replaced_utf8: int = 0

    def __len__(self) -> int:
        return len(self.texts)


def resolve_files(cfg: InputConfig) -> list[Path]:
    """Input files in a deterministic order: a file, every corpus file of a directory, or a glob."""
    path = Path(cfg.path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and _suffix_format(p)]
    else:
        files = [Path(p) for p in sorted(glob.glob(cfg.path, recursive=True)) if Path(p).is_file()]
    if not files:
        raise ConfigError(
            f"input.path: {cfg.path!r} matches no input file. Give a file, a directory holding "
            f".parquet/.jsonl/.jsonl.gz/.csv files, or a glob such as 'data/*.parquet'."
        )
    for f in files:
        file_format(f, cfg.format)
    return files


def file_format(path: Path, explicit: str = "auto") -> str:
    if explicit != "auto":
        return explicit
    fmt = _suffix_format(path)
    if fmt is None:
        raise ConfigError(
            f"input.format: cannot tell the format of {str(path)!r} from its suffix. "
            f"Set input.format to parquet, jsonl or csv."
        )
    return fmt


def _suffix_format(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return _SUFFIXES.get(suffixes[-1]) if suffixes else None


def source_names(files: list[Path]) -> list[str]:
    """Short, stable names of the files (relative to their common directory), used in row ids."""
    absolute = [f.resolve() for f in files]
    if len(absolute) == 1:
        return [absolute[0].name]
    root = Path(os.path.commonpath([str(p.parent) for p in absolute]))
    return [str(p.relative_to(root)) for p in absolute]


def extra_columns(cfg: InputConfig, template_fields: list[str]) -> list[str]:
    """Columns kept per row besides the text: pass-through and prompt-template columns."""
    names = list(cfg.passthrough) + [f for f in template_fields if f != "text"]
    return list(dict.fromkeys(names))


def check_columns(files: list[Path], cfg: InputConfig, template_fields: list[str]) -> None:
    """Fail before the run when a configured column is in none of the first file's rows.

    The first file with any column is checked; a corpus of empty files has nothing to check.
    """
    for path in files:
        found = _peek_columns(path, file_format(path, cfg.format))
        if found:
            break
    else:
        return
    for key, name in _configured_columns(cfg, template_fields):
        if name not in found:
            raise ConfigError(
                f"{key}: column {name!r} is not in {str(path)!r}. Columns found: "
                f"{', '.join(sorted(found)) or '(none)'}. Set {key} to one of them."
            )


def _configured_columns(cfg: InputConfig, template_fields: list[str]) -> list[tuple[str, str]]:
    pairs = [("input.text_column", cfg.text_column)]
    if cfg.id_column:
        pairs.append(("input.id_column", cfg.id_column))
    pairs += [("input.passthrough", c) for c in cfg.passthrough]
    pairs += [("prompt.user", c) for c in template_fields if c != "text" and c != cfg.text_column]
    return pairs


def _peek_columns(path: Path, fmt: str) -> set[str]:
    if fmt == "parquet":
        return set(pq.read_schema(path).names)
    if fmt == "csv":
        with _open_text(path) as fh:
            return set(next(csv.reader(fh), []))
    keys: set[str] = set()
    for i, (_, obj, _) in enumerate(_jsonl_records(path, "replace")):
        if isinstance(obj, dict):
            keys.update(obj)
        if i >= _SCHEMA_PEEK_ROWS:
            break
    return keys


def read_rows(path: Path, source: str, cfg: InputConfig, extra: list[str]) -> Rows:
    """Read one input file into :class:`Rows` (text problems are checked by the worker)."""
    fmt = file_format(path, cfg.format)
    reader = {"parquet": _read_parquet, "jsonl": _read_jsonl, "csv": _read_csv}[fmt]
    return reader(path, source, cfg, extra)


def _read_parquet(path: Path, source: str, cfg: InputConfig, extra: list[str]) -> Rows:
    names = set(pq.read_schema(path).names)
    wanted = [c for c in [cfg.text_column, cfg.id_column, *extra] if c and c in names]
    table = pq.read_table(path, columns=sorted(set(wanted)))
    n = table.num_rows
    rows = Rows(source=source)
    rows.texts = _column(table, cfg.text_column, n)
    raw_ids = _column(table, cfg.id_column, n) if cfg.id_column else None
    rows.columns = {c: _column(table, c, n) for c in extra}
    rows.problems = [None] * n
    rows.ids = _make_ids(source, raw_ids, rows.problems, cfg.id_column)
    return rows


def _column(table: Any, name: str, n: int) -> list[Any]:
    if name in table.column_names:
        return table.column(name).to_pylist()
    return [None] * n


def _read_jsonl(path: Path, source: str, cfg: InputConfig, extra: list[str]) -> Rows:
    records: list[dict] = []
    problems: list[str | None] = []
    rows = Rows(source=source)
    for lineno, obj, problem in _jsonl_records(path, cfg.invalid_utf8):
        if problem and problem.startswith("replaced_utf8"):
            rows.replaced_utf8 += 1
            problem = None
        if problem is None and not isinstance(obj, dict):
            problem = f"bad_json: line {lineno} is a JSON {type(obj).__name__}, not an object"
        records.append(obj if isinstance(obj, dict) else {})
        problems.append(problem)
    _fill_from_records(rows, records, problems, cfg, extra)
    return rows


def _jsonl_records(path: Path, invalid_utf8: str) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed value or None, problem) for every non-blank line."""
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # byte-order mark
            if not raw.strip():
                continue
            text, problem = _decode(raw, invalid_utf8, f"line {lineno}")
            if text is None:
                yield lineno, None, problem
                continue
            try:
                yield lineno, json.loads(text), problem
            except json.JSONDecodeError as exc:
                yield lineno, None, f"bad_json: line {lineno}: {exc.msg} at column {exc.colno}"


def _decode(raw: bytes, invalid_utf8: str, where: str) -> tuple[str | None, str | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        if invalid_utf8 == "fail":
            return None, f"invalid_utf8: {where}, byte {exc.start}: {exc.reason}"
        return raw.decode("utf-8", errors="replace"), f"replaced_utf8: {where}"


def _read_csv(path: Path, source: str, cfg: InputConfig, extra: list[str]) -> Rows:
    rows = Rows(source=source)
    records: list[dict] = []
    problems: list[str | None] = []
    with _open_text(path) as fh:
        reader = csv.DictReader(fh)
        for record in _csv_records(reader):
            if isinstance(record, str):  # a record the csv module could not parse
                records.append({})
                problems.append(record)
                continue
            problem = None
            if None in record:
                problem = (f"bad_csv: line {reader.line_num} has {len(reader.fieldnames or []) + len(record[None])}"
                           f" fields, the header has {len(reader.fieldnames or [])}")
            record, utf8_problem = _fix_surrogates(record, cfg.invalid_utf8, f"line {reader.line_num}")
            if utf8_problem and utf8_problem.startswith("replaced_utf8"):
                rows.replaced_utf8 += 1
            elif utf8_problem:
                problem = problem or utf8_problem
            records.append(record)
            problems.append(problem)
    _fill_from_records(rows, records, problems, cfg, extra)
    return rows


def _csv_records(reader: csv.DictReader) -> Iterator[dict | str]:
    """Records of a CSV file; a record that cannot be parsed comes as a problem string instead."""
    csv.field_size_limit(sys.maxsize)  # documents can be far longer than the 128 KiB default
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield f"bad_csv: line {reader.line_num}: {exc}"


def _open_text(path: Path) -> io.TextIOBase:
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    # utf-8-sig: a byte-order mark (common in spreadsheet exports) is not part of the first column name
    return io.TextIOWrapper(opener(path, "rb"), encoding="utf-8-sig", errors="surrogateescape", newline="")


def _fix_surrogates(record: dict, invalid_utf8: str, where: str) -> tuple[dict, str | None]:
    """CSV text is decoded with surrogateescape; undo it per field, replacing or failing."""
    bad = [k for k, v in record.items() if isinstance(v, str) and _has_surrogates(v)]
    if not bad:
        return record, None
    if invalid_utf8 == "fail":
        return record, f"invalid_utf8: {where}, column {bad[0]!r}"
    fixed = dict(record)
    for k in bad:
        fixed[k] = record[k].encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return fixed, f"replaced_utf8: {where}"


def _has_surrogates(value: str) -> bool:
    try:
        value.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _fill_from_records(rows: Rows, records: list[dict], problems: list[str | None],
                       cfg: InputConfig, extra: list[str]) -> None:
    rows.texts = [r.get(cfg.text_column) for r in records]
    rows.columns = {c: [r.get(c) for r in records] for c in extra}
    raw_ids = [r.get(cfg.id_column) for r in records] if cfg.id_column else None
    rows.problems = problems
    rows.ids = _make_ids(rows.source, raw_ids, problems, cfg.id_column)


def _make_ids(source: str, raw_ids: list[Any] | None, problems: list[str | None],
              id_column: str | None) -> list[str]:
    """Ids as strings: the id column where given, else '<file>:<row>'. A missing id fails its row."""
    fallback = [f"{source}:{i}" for i in range(len(problems))]
    if raw_ids is None:
        return fallback
    ids = []
    for i, value in enumerate(raw_ids):
        if value is None or value == "":
            problems[i] = problems[i] or f"missing_id: column {id_column!r} is empty; id set to {fallback[i]!r}"
            ids.append(fallback[i])
        else:
            ids.append(str(value))
    return ids


def text_problem(value: Any, column: str) -> str | None:
    """Why a text value cannot be used, or None."""
    if value is None:
        return f"empty_text: {column!r} is null or missing"
    if not isinstance(value, str):
        return f"not_text: {column!r} holds a {type(value).__name__}, not a string"
    if not value.strip():
        return f"empty_text: {column!r} is empty"
    return None
