"""Corpus readers: Parquet, JSONL (also gzipped) and CSV as Arrow record batches of one shape.

Every reader yields batches with the same columns: ``_text`` (the document text; read it only where
``_problem`` is null), ``_chars`` (its length in characters), ``_id`` (the id column's value as a string; null when there is no id column),
``_problem`` (why the row fails, or null), the pass-through and template columns by name, and for
text formats ``_offset`` / ``_line`` (byte offset and line number where the row starts), which the
plan keeps at unit starts so a worker reads only its unit's bytes (Parquet units start at a row
group and an offset into it). Texts, ids and problems are computed with Arrow compute on whole
batches; only the lines Arrow's JSON parser rejects, and CSV records, go through Python one by one.

A reader never raises on a bad row: the row is kept with its problem, which becomes a ``failed``
result. Only errors of the whole input (no files, a missing text column) are raised, as
:class:`ConfigError`, before any work starts.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import glob
import io
import json
import logging
import posixpath
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

from shardinfer.config import InputConfig
from shardinfer.errors import ConfigError, missing_dependency
from shardinfer.inputs import parquet_slice, storage
from shardinfer.inputs.digest import ChunkDigest, aligned, check_chunks
from shardinfer.results import CHARS, ID, LINE, OFFSET, PROBLEM, TEXT

log = logging.getLogger(__name__)

BATCH_ROWS = 65536
BLOCK_BYTES = 16 << 20  # JSONL/CSV bytes parsed at once (whole lines)

_SUFFIXES = {
    ".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow",
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
    ".csv": "csv",
}
_SCHEMA_PEEK_ROWS = 1000
_SCAN_CHUNK = 4 << 20  # bytes of a block searched (or checked for UTF-8) at once
_CSV_REPLAY_BYTES = BLOCK_BYTES  # a broken CSV record this long is read again from memory, a longer one from the file
_MAX_JSON_DEPTH = 256  # JSONL lines nested deeper fail (bad_json); Python's parser stops near 1000
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_WHITESPACE = np.array([9, 10, 13, 32], dtype=np.uint8)


@dataclass(frozen=True)
class InputFile:
    """One input file: where it is (a local path or a URL), its short name in row ids, and how to
    read it."""

    path: str
    source: str
    format: str  # parquet | jsonl | csv | openai-batch
    compression: str | None = None  # .gz | .zst | .bz2 | .xz

    @property
    def gzip(self) -> bool:
        return self.compression == ".gz"

    @property
    def local(self) -> bool:
        return not storage.is_remote(self.path)


@dataclass
class ReadStats:
    """What a read saw besides the rows: rows whose invalid UTF-8 was replaced by U+FFFD, and the
    (uncompressed) bytes a whole-file scan went through."""

    replaced_utf8: int = 0
    bytes_read: int = 0
    digest: ChunkDigest | None = None  # fed every byte of a JSONL scan (the plan's checksums)


@dataclass(frozen=True)
class Columns:
    """Which input columns a read keeps, and what the text column holds: text, a chat (``messages``,
    kept as JSON text) or, in an OpenAI batch file, the whole request line (``openai``)."""

    text: str
    id: str | None
    extra: tuple[str, ...] = ()  # pass-through and request columns (template fields, per-row options)
    kind: str = "text"  # text | messages | openai

    @property
    def wanted(self) -> list[str]:
        return list(dict.fromkeys(c for c in (self.text, self.id, *self.extra) if c))


# An OpenAI batch file's rows: the request line whole, identified by its custom_id.
OPENAI_REQUEST, OPENAI_ID = "request", "custom_id"


def columns_for(cfg: InputConfig, used: list[tuple[str, str]], *, with_extra: bool = True) -> Columns:
    """The columns to read: the text (or chat, or request line), the id and the ``used`` ones
    ((config key, column) pairs that a row's request reads)."""
    if cfg.format == "openai-batch":
        return Columns(OPENAI_REQUEST, OPENAI_ID, kind="openai")
    extra = tuple(extra_columns(cfg, used)) if with_extra else ()
    if cfg.messages_column:
        return Columns(cfg.messages_column, cfg.id_column, extra, kind="messages")
    return Columns(cfg.text_column, cfg.id_column, extra)


def resolve_files(cfg: InputConfig) -> list[str]:
    """Input files in a deterministic order: a file, every corpus file of a directory, or a glob;
    local paths or URLs (``s3://bucket/docs/*.parquet``)."""
    if cfg.format == "hf-dataset":
        files = hf_dataset_files(cfg)
    elif storage.is_remote(cfg.path):
        files = storage.expand(cfg.path, keep=_suffix_format)
    elif (saved := saved_dataset_files(Path(cfg.path), cfg.split)) is not None:
        files = saved
    else:
        files = [str(p) for p in _local_files(cfg.path)]
    if not files:
        raise ConfigError(
            f"input.path: {cfg.path!r} matches no input file. Give a file, a directory holding "
            f".parquet/.jsonl/.jsonl.gz/.csv files, or a glob such as 'data/*.parquet'."
        )
    for f in files:
        file_format(f, cfg.format)
    return files


def saved_dataset_files(path: Path, split: str | None) -> list[str] | None:
    """The Arrow files of a directory written by ``datasets``' ``save_to_disk`` (a Dataset, or a
    DatasetDict whose split is ``split``), in order; None when ``path`` is not one."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in splits:
            raise ConfigError(f"input.split: {path} holds the splits {', '.join(splits)}; "
                              f"{'choose one' if split is None else repr(split) + ' is not one of them'} "
                              f"(input.split=...)")
        path = path / str(split)
    state = path / "state.json"
    if not state.is_file():
        return None
    return [str(path / entry["filename"]) for entry in json.loads(state.read_text()).get("_data_files", [])]


def hf_dataset_files(cfg: InputConfig) -> list[str]:
    """The cached Arrow files of a Hugging Face dataset (``input.path``: its name), found by the
    datasets library in its cache; nothing is downloaded when HF_DATASETS_OFFLINE is set."""
    try:
        import datasets
    except ImportError as exc:
        raise missing_dependency("datasets", "datasets", "input.format: hf-dataset") from exc
    try:
        loaded = datasets.load_dataset(cfg.path, cfg.config, split=cfg.split)
    except Exception as exc:
        raise ConfigError(f"input.path: the dataset {cfg.path!r} (config {cfg.config!r}, split {cfg.split!r}) "
                          f"cannot be loaded: {exc}. Download it first (datasets.load_dataset) or point "
                          f"input.path at a save_to_disk directory.") from exc
    if isinstance(loaded, dict):
        raise ConfigError(f"input.split: the dataset {cfg.path!r} has the splits {', '.join(loaded)}; choose one")
    return [entry["filename"] for entry in loaded.cache_files]


def _local_files(pattern: str) -> list[Path]:
    path = Path(pattern)
    if path.is_file():
        return [path]
    if path.is_dir():
        return [p for p in sorted(path.rglob("*")) if p.is_file() and _suffix_format(p)]
    return [Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if Path(p).is_file()]


def input_files(cfg: InputConfig) -> list[InputFile]:
    files = resolve_files(cfg)
    return [InputFile(path, name, file_format(path, cfg.format), storage.compression(path))
            for path, name in zip(files, source_names(files))]


def file_format(path: str | Path, explicit: str = "auto") -> str:
    if explicit == "hf-dataset":
        return "arrow"
    if explicit != "auto":
        return explicit
    fmt = _suffix_format(path)
    if fmt is None:
        raise ConfigError(
            f"input.format: cannot tell the format of {str(path)!r} from its suffix. "
            f"Set input.format to parquet, jsonl or csv."
        )
    return fmt


def _suffix_format(path: str | Path) -> str | None:
    suffixes = [s.lower() for s in PurePosixPath(str(path).split("://")[-1]).suffixes]
    if suffixes and suffixes[-1] in storage.COMPRESSIONS:
        suffixes = suffixes[:-1]
    return _SUFFIXES.get(suffixes[-1]) if suffixes else None


def source_names(files: list[str]) -> list[str]:
    """Short, stable names of the files (relative to their common directory), used in row ids."""
    absolute = [f if storage.is_remote(f) else str(Path(f).resolve()) for f in files]
    names = [f.split("://", 1)[-1] for f in absolute]
    if len(names) == 1:
        return [PurePosixPath(names[0]).name]
    root = posixpath.commonpath([posixpath.dirname(n) for n in names])
    return [posixpath.relpath(n, root) for n in names]


def extra_columns(cfg: InputConfig, used: list[tuple[str, str]]) -> list[str]:
    """Columns kept per row besides the text: pass-through and request columns."""
    names = list(cfg.passthrough) + [c for _, c in used if c != "text"]
    return list(dict.fromkeys(names))


def check_columns(files: list[str], cfg: InputConfig, used: list[tuple[str, str]]) -> None:
    """Fail before the run when a configured column is in none of the first file's rows.

    The first file with any column is checked; a corpus of empty files has nothing to check.
    An OpenAI batch file has no configured columns.
    """
    if cfg.format == "openai-batch":
        return
    for path in files:
        found = _peek_columns(path, file_format(path, cfg.format))
        if found:
            break
    else:
        return
    for key, name in _configured_columns(cfg, used):
        if name not in found:
            raise ConfigError(
                f"{key}: column {name!r} is not in {str(path)!r}. Columns found: "
                f"{', '.join(sorted(found)) or '(none)'}. Set {key} to one of them."
            )


def _configured_columns(cfg: InputConfig, used: list[tuple[str, str]]) -> list[tuple[str, str]]:
    pairs = [("input.messages_column", cfg.messages_column) if cfg.messages_column
             else ("input.text_column", cfg.text_column)]
    if cfg.id_column:
        pairs.append(("input.id_column", cfg.id_column))
    pairs += [("input.passthrough", c) for c in cfg.passthrough]
    pairs += [(key, c) for key, c in used if c != "text" and c != cfg.text_column]
    return pairs


def _peek_columns(path: str, fmt: str) -> set[str]:
    if fmt == "parquet":
        return set(_parquet(path).schema_arrow.names)
    if fmt == "arrow":
        return set(arrow_table(path).column_names)
    with storage.open_decompressed(path) as fh:
        if fmt == "csv":
            return set(_csv_header(fh))
        keys: set[str] = set()
        for i, raw in enumerate(fh):
            try:
                obj = json.loads(raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "replace"))
            except (json.JSONDecodeError, RecursionError):
                obj = None
            if isinstance(obj, dict):
                keys.update(obj)
            if i >= _SCHEMA_PEEK_ROWS:
                break
        return keys


# ---- the one row shape ------------------------------------------------------------------------


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


def _coalesce(first: pa.Array | None, second: pa.Array) -> pa.Array:
    return second if first is None else pc.coalesce(first, second)


def _normalize(table: pa.Table, f: InputFile, cols: Columns, first_row: int,
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


# ---- scanning a whole file (plan) and reading a range of it (worker) --------------------------


def scan(f: InputFile, cols: Columns, invalid_utf8: str, stats: ReadStats,
         gz_index: Path | None = None) -> Iterator[pa.Table]:
    """Every row of a file, in order, as tables of the one row shape (with positions)."""
    if f.format == "parquet":
        yield from _scan_parquet(f, cols, invalid_utf8, stats)
    elif f.format == "arrow":
        yield from _scan_arrow(f, cols, invalid_utf8, stats)
    elif f.format in ("jsonl", "openai-batch"):
        yield from _scan_jsonl(f, cols, invalid_utf8, stats, gz_index)
    else:
        yield from _scan_csv(f, cols, invalid_utf8, stats, gz_index)


def read_table(f: InputFile, cfg: InputConfig, extra: list[str] | tuple[str, ...] = (),
               stats: ReadStats | None = None) -> pa.Table:
    """A whole file in the one row shape (small files: tests, the benchmark's source text)."""
    cols = dataclasses.replace(columns_for(cfg, [], with_extra=False), extra=tuple(extra))
    tables = list(scan(f, cols, cfg.invalid_utf8, stats or ReadStats()))
    if not tables:
        return _normalize(pa.table({}), f, cols, 0)
    return pa.concat_tables(tables, promote_options="permissive")


def read_range(f: InputFile, cols: Columns, invalid_utf8: str, first_row: int, rows: int,
               begin: int | None, end: int | None, line: int | None, gz_index: Path | None = None,
               cursor: ParquetCursor | None = None, crcs: np.ndarray | None = None) -> pa.Table:
    """Rows ``first_row``..``first_row + rows`` of a file. Text formats read bytes ``begin``..``end``
    (the plan's positions), checked against the plan's chunk checksums ``crcs`` when given;
    Parquet decodes from where ``cursor`` stands (the end of the previous range read) or from the
    start of the row group that holds ``first_row``."""
    stats = ReadStats()
    if f.format == "parquet":
        table = _read_parquet_range(f, cols, first_row, rows, cursor, invalid_utf8, stats)
    elif f.format == "arrow":
        table = _read_arrow_range(f, cols, first_row, rows, invalid_utf8, stats)
    elif begin is None or end is None:  # a plan without positions: read up to the range
        table = _slice_scan(scan(f, cols, invalid_utf8, stats, gz_index), first_row, rows)
    else:
        data = _read_bytes(f, begin, end, gz_index, crcs)
        parse = _BLOCK_PARSERS[f.format]
        header = _csv_header_of(f, gz_index) if f.format == "csv" else None
        table = parse(data, begin, line or 1, f, cols, invalid_utf8, stats, first_row, header)
    return table.drop_columns([c for c in (OFFSET, LINE) if c in table.column_names])


def _read_bytes(f: InputFile, begin: int, end: int, gz_index: Path | None, crcs: np.ndarray | None) -> bytes:
    """Bytes ``begin``..``end``; with ``crcs``, the whole chunks around them are read and checked."""
    if crcs is None:
        with open_at(f, begin, gz_index) as fh:
            return fh.read(end - begin)
    start, stop = aligned(begin, end)
    with open_at(f, start, gz_index) as fh:
        data = fh.read(stop - start)
    check_chunks(crcs, start, data, f.path)
    return data[begin - start:end - start]


def _slice_scan(batches: Iterator[pa.Table], first_row: int, rows: int) -> pa.Table:
    kept, seen = [], 0
    for batch in batches:
        lo, hi = max(first_row - seen, 0), min(first_row + rows - seen, batch.num_rows)
        if lo < hi:
            kept.append(batch.slice(lo, hi - lo))
        seen += batch.num_rows
        if seen >= first_row + rows:
            break
    return pa.concat_tables(kept, promote_options="permissive")


# ---- Parquet ----------------------------------------------------------------------------------


def _scan_parquet(f: InputFile, cols: Columns, invalid_utf8: str, stats: ReadStats) -> Iterator[pa.Table]:
    pf = _parquet(f.path)
    present = [c for c in cols.wanted if c in pf.schema_arrow.names]
    first = 0
    # One reader per row group: a reader run across many row groups keeps memory of all of them.
    for group in range(pf.metadata.num_row_groups):
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=present):
            table = pa.Table.from_batches([batch])
            yield _normalize(table, f, cols, first, invalid_utf8=invalid_utf8, stats=stats)
            first += table.num_rows


def _parquet(path: str) -> pq.ParquetFile:
    # Column chunks are streamed in 8 MiB reads, not loaded whole: memory stays that of a batch
    # even when row groups hold a million rows. A remote file is read by ranges: only the footer
    # and the row groups a unit needs are fetched.
    if storage.is_remote(path):
        return pq.ParquetFile(storage.open_bytes(path), buffer_size=8 << 20)
    return pq.ParquetFile(path, buffer_size=8 << 20)


def parquet_row_groups(path: str) -> list[int]:
    """Rows per row group."""
    md = parquet_metadata(path)
    return [md.row_group(i).num_rows for i in range(md.num_row_groups)]


def parquet_metadata(path: str) -> pq.FileMetaData:
    """The footer of a Parquet file, read now."""
    return _parquet(path).metadata


class ParquetCursor:
    """An open Parquet file and where the last range read from it ended. A worker walks its units in
    order, so its next unit usually starts there: decoding goes on from that point instead of from
    the start of the row group again."""

    def __init__(self) -> None:
        self.path: str | None = None
        self.columns: list[str] = []
        self.file: pq.ParquetFile | None = None
        self.starts = np.zeros(1, np.int64)  # first row of every row group, then the row count
        self.group = -1
        self.position = -1  # row at the start of ``rest``
        self.rest: pa.RecordBatch | None = None
        self.batches: Iterator[pa.RecordBatch] | None = None

    def open(self, path: str) -> pq.ParquetFile:
        if self.path != path or self.file is None:
            self.file = _parquet(path)
            sizes = [self.file.metadata.row_group(i).num_rows for i in range(self.file.metadata.num_row_groups)]
            self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            self.path, self.group = path, -1
        return self.file

    def rows_to_decode(self, columns: list[str], first_row: int) -> int:
        """Rows decoded and thrown away before ``first_row``: from where this cursor stands when it
        walks that row group with these columns, else from the start of the row group."""
        group = self._group_of(first_row)
        if columns == self.columns and group == self.group and self.position <= first_row:
            return first_row - self.position
        return first_row - int(self.starts[group])

    def read(self, columns: list[str], first_row: int, rows: int, batch_rows: int) -> list[pa.RecordBatch]:
        if columns != self.columns:
            self.columns, self.group = columns, -1
        group = self._group_of(first_row)
        if not (group == self.group and self.position <= first_row):
            self._seek(group, batch_rows)
        kept: list[pa.RecordBatch] = []
        end = first_row + rows
        while self.position < end:
            batch = self._next(batch_rows)
            if batch is None:
                break
            lo, hi = max(first_row - self.position, 0), min(end - self.position, batch.num_rows)
            if lo < hi:
                kept.append(batch.slice(lo, hi - lo))
            if hi < batch.num_rows:  # the rest of this batch starts the next unit
                self.rest, self.position = batch.slice(hi), self.position + hi
                break
            self.position += batch.num_rows
        return kept

    def _group_of(self, row: int) -> int:
        return int(np.searchsorted(self.starts, row, side="right") - 1)

    def _seek(self, group: int, batch_rows: int) -> None:
        assert self.file is not None
        self.group, self.position, self.rest = group, int(self.starts[group]), None
        # One reader per row group: a reader run across many row groups keeps memory of all of them.
        self.batches = self.file.iter_batches(batch_size=batch_rows, row_groups=[group], columns=self.columns)

    def _next(self, batch_rows: int) -> pa.RecordBatch | None:
        if self.rest is not None:
            batch, self.rest = self.rest, None
            return batch
        assert self.batches is not None
        batch = next(self.batches, None)
        while batch is None and self.group + 1 < len(self.starts) - 1:
            self._seek(self.group + 1, batch_rows)
            batch = next(self.batches, None)
        return batch


def _read_parquet_range(f: InputFile, cols: Columns, first_row: int, rows: int, cursor: ParquetCursor | None,
                        invalid_utf8: str = "replace", stats: ReadStats | None = None) -> pa.Table:
    """The range, decoded from where the cursor stands, or from the start of its row group."""
    cursor = cursor or ParquetCursor()
    schema = cursor.open(f.path).schema_arrow
    present = [c for c in cols.wanted if c in schema.names]
    wanted = pa.schema([schema.field(c) for c in present])
    table = None
    if cursor.rows_to_decode(present, first_row) > parquet_slice.DEEP_ROWS and not storage.is_remote(f.path):
        table = parquet_slice.read_slice(f.path, wanted, first_row, rows)
    if table is None:
        table = pa.Table.from_batches(cursor.read(present, first_row, rows, min(BATCH_ROWS, max(rows, 1024))),
                                      schema=wanted)
    return _normalize(table, f, cols, first_row, invalid_utf8=invalid_utf8, stats=stats)


# ---- Arrow (Hugging Face datasets' files) -----------------------------------------------------


_ARROW_OPEN: dict[str, pa.Table] = {}  # memory-mapped tables a worker has open (no copy in memory)


def arrow_table(path: str) -> pa.Table:
    """An Arrow IPC file (file or stream format, as the datasets library writes), memory-mapped:
    reading a range costs no copy of the corpus. Remote Arrow files are read whole."""
    table = _ARROW_OPEN.get(path)
    if table is None:
        source = pa.memory_map(path) if not storage.is_remote(path) else pa.BufferReader(
            storage.open_bytes(path).read())
        try:
            table = pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            table = pa.ipc.open_stream(source).read_all()
        if len(_ARROW_OPEN) >= 8:
            _ARROW_OPEN.pop(next(iter(_ARROW_OPEN)))
        _ARROW_OPEN[path] = table
    return table


def _scan_arrow(f: InputFile, cols: Columns, invalid_utf8: str, stats: ReadStats) -> Iterator[pa.Table]:
    table = arrow_table(f.path)
    present = [c for c in cols.wanted if c in table.column_names]
    for first in range(0, table.num_rows, BATCH_ROWS):
        yield _normalize(table.select(present).slice(first, BATCH_ROWS), f, cols, first,
                         invalid_utf8=invalid_utf8, stats=stats)


def _read_arrow_range(f: InputFile, cols: Columns, first_row: int, rows: int, invalid_utf8: str = "replace",
                      stats: ReadStats | None = None) -> pa.Table:
    table = arrow_table(f.path)
    present = [c for c in cols.wanted if c in table.column_names]
    return _normalize(table.select(present).slice(first_row, rows), f, cols, first_row,
                      invalid_utf8=invalid_utf8, stats=stats)


# ---- JSONL ------------------------------------------------------------------------------------


def _scan_jsonl(f: InputFile, cols: Columns, invalid_utf8: str, stats: ReadStats, gz_index: Path | None) -> Iterator[pa.Table]:
    first_row, line = 0, 1
    parse = _BLOCK_PARSERS[f.format]
    for offset, data in _blocks(f, gz_index, stats):
        table = parse(data, offset, line, f, cols, invalid_utf8, stats, first_row, None)
        line += data.count(b"\n")
        first_row += table.num_rows
        if table.num_rows:  # a block of blank lines holds no row
            yield table


def _blocks(f: InputFile, gz_index: Path | None, stats: ReadStats | None = None) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of whole lines, about BLOCK_BYTES at a time."""
    with open_at(f, 0, gz_index) as fh:
        offset, rest = 0, b""
        while True:
            chunk = fh.read(BLOCK_BYTES)
            if not chunk:
                if rest:
                    yield offset, rest
                return
            if stats is not None:
                stats.bytes_read += len(chunk)
                if stats.digest is not None:
                    stats.digest.update(chunk)
            data = rest + chunk
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                rest = data
                continue
            yield offset, data[:cut]
            offset += cut
            rest = data[cut:]


def _line_bounds(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Start and end (without the newline) of every line of a block, and which lines hold anything.
    A line that starts with a non-blank byte holds something; only the rare others are looked into."""
    arr = np.frombuffer(data, dtype=np.uint8)
    newlines = _positions(arr, 10)
    ends = np.concatenate([newlines, [len(arr)]]) if (len(arr) and arr[-1] != 10) else newlines
    starts = np.concatenate([[0], ends[:-1] + 1]) if len(ends) else np.zeros(0, dtype=np.int64)
    nonempty = ends > starts
    first = np.full(len(starts), 32, np.uint8)
    first[nonempty] = arr[starts[nonempty]]
    filled = nonempty & ~np.isin(first, _WHITESPACE)
    for i in np.flatnonzero(nonempty & ~filled).tolist():  # starts with a blank: blank throughout?
        filled[i] = bool(data[starts[i]:ends[i]].strip())
    return starts.astype(np.int64), ends.astype(np.int64), filled


def _jsonl_block(data: bytes, offset: int, line: int, f: InputFile, cols: Columns, invalid_utf8: str,
                 stats: ReadStats, first_row: int, header: Any = None) -> pa.Table:
    """One block of whole lines: Arrow's parser when it takes the block, else line by line."""
    starts, ends, filled = _line_bounds(data)
    rows = np.flatnonzero(filled)
    bom = offset == 0 and data.startswith(b"\xef\xbb\xbf")
    positions = {OFFSET: pa.array(offset + starts[rows] + (3 * (rows == 0) if bom else 0), pa.int64()),
                 LINE: pa.array(line + rows, pa.int64())}
    # Arrow's parser takes time quadratic in the nesting depth and crashes the process on lines
    # nested thousands deep: a block with such a line is read line by line, where it fails alone.
    deep = _too_deep(data, starts[rows], ends[rows])
    table = None if deep.any() else _arrow_json(data, len(rows), cols)
    if table is None:
        table, problems = _json_lines(data, starts[rows], ends[rows], line + rows, invalid_utf8, stats, cols, deep)
        return _normalize(table, f, cols, first_row, problems, positions)
    return _normalize(table, f, cols, first_row, None, positions)


def _too_deep(data: bytes, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Which lines nest arrays and objects more than _MAX_JSON_DEPTH deep. Only the rare lines that
    hold that many opening brackets at all are looked into (strings skipped)."""
    out = np.zeros(len(starts), dtype=bool)
    arr = np.frombuffer(data, dtype=np.uint8)
    opens = _positions(arr, 91, 123)  # [ {
    if len(opens) <= _MAX_JSON_DEPTH:
        return out
    counts = np.searchsorted(opens, ends) - np.searchsorted(opens, starts)
    for i in np.flatnonzero(counts > _MAX_JSON_DEPTH).tolist():
        out[i] = _json_depth(arr[starts[i]:ends[i]]) > _MAX_JSON_DEPTH
    return out


def _json_depth(line: np.ndarray) -> int:
    """The deepest nesting of brackets in one line of JSON, brackets inside strings left out."""
    quotes = _positions(line, 34)
    backslashes = _positions(line, 92)
    if len(quotes) and len(backslashes):  # a quote after an odd run of backslashes is inside a string
        run_starts = backslashes[np.concatenate([[0], np.flatnonzero(np.diff(backslashes) != 1) + 1])]
        before = np.searchsorted(backslashes, quotes) - 1  # the last backslash before each quote
        follows = (before >= 0) & (backslashes[np.maximum(before, 0)] == quotes - 1)
        run = quotes - run_starts[np.searchsorted(run_starts, backslashes[np.maximum(before, 0)], side="right") - 1]
        quotes = quotes[~(follows & (run % 2 == 1))]
    brackets = _positions(line, 91, 123, 93, 125)  # [ { ] }
    brackets = brackets[np.searchsorted(quotes, brackets) % 2 == 0]  # an even number of quotes before: outside
    kinds = line[brackets]
    steps = np.where((kinds == 91) | (kinds == 123), 1, -1)
    return int(np.cumsum(steps).max(initial=0))


def _positions(arr: np.ndarray, *values: int) -> np.ndarray:
    """Where any of the byte ``values`` is in ``arr``, in order, looked for a few MB at a time (no
    mask as long as a long line)."""
    found = []
    for i in range(0, max(len(arr), 1), _SCAN_CHUNK):
        chunk = arr[i:i + _SCAN_CHUNK]
        mask = chunk == values[0]
        for value in values[1:]:
            mask |= chunk == value
        found.append(np.flatnonzero(mask) + i)
    return found[0] if len(found) == 1 else np.concatenate(found)


def _valid_utf8(data: bytes) -> bool:
    """Whether the bytes are UTF-8, decoded a few MB at a time (no copy of a whole long line)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(data)
    try:
        for i in range(0, len(data), _SCAN_CHUNK):
            decoder.decode(view[i:i + _SCAN_CHUNK], final=i + _SCAN_CHUNK >= len(data))
    except UnicodeDecodeError:
        return False
    return True


def _openai_block(data: bytes, offset: int, line: int, f: InputFile, cols: Columns, invalid_utf8: str,
                  stats: ReadStats, first_row: int, header: Any = None) -> pa.Table:
    """One block of an OpenAI batch file: every line is a request, kept whole as its text and known
    by its ``custom_id``; a line that is not a JSON object fails alone."""
    starts, ends, filled = _line_bounds(data)
    rows = np.flatnonzero(filled)
    bom = offset == 0 and data.startswith(b"\xef\xbb\xbf")
    positions = {OFFSET: pa.array(offset + starts[rows] + (3 * (rows == 0) if bom else 0), pa.int64()),
                 LINE: pa.array(line + rows, pa.int64())}
    texts: list[str | None] = []
    ids: list[str | None] = []
    problems: list[str | None] = []
    for start, end, lineno in zip(starts[rows].tolist(), ends[rows].tolist(), (line + rows).tolist()):
        raw = data[start:end]
        if start == 0 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        text, problem = _decode(raw, invalid_utf8, f"line {lineno}", stats)
        custom_id, problem = _request_id(text, lineno, problem)
        texts.append(text)
        ids.append(custom_id)
        problems.append(problem)
    table = pa.table({OPENAI_REQUEST: pa.array(texts, pa.string()), OPENAI_ID: pa.array(ids, pa.string())})
    return _normalize(table, f, cols, first_row, pa.array(problems, pa.string()), positions)


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
    if isinstance(custom_id, str) and _has_surrogates(custom_id):
        custom_id = _without_surrogates(custom_id)
    return (custom_id if isinstance(custom_id, str) else None), problem


def _arrow_json(data: bytes, expected_rows: int, cols: Columns) -> pa.Table | None:
    """The block parsed by Arrow, or None when any line is not a JSON object of consistent types or
    the block is not valid UTF-8 (Arrow's parser does not check every string). Arrow takes strings
    that look like dates for timestamps: the columns read are parsed again as the strings they are."""
    read_options = pj.ReadOptions(block_size=max(len(data), 1 << 20) + 1)
    if not _valid_utf8(data):
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
        if start == 0 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        obj, problem = _json_line(raw, lineno, invalid_utf8, stats)
        records.append(obj)
        problems.append(problem)
    _set_aside_non_text(records, problems, cols)
    return _records_table(records, cols), pa.array(problems, pa.string())


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
            if isinstance(value, str) and _has_surrogates(value):
                node[key] = _without_surrogates(value)
                found = True
            elif isinstance(value, (dict, list)):
                stack.append(value)
            if isinstance(key, str) and _has_surrogates(key):
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


def _records_table(records: list[dict[str, Any]], cols: Columns) -> pa.Table:
    """Python records as columns; a column of mixed types becomes JSON text (the text column's
    non-strings were already set aside as problems)."""
    out = {name: passthrough_array([r.get(name) for r in records]) for name in cols.wanted}
    return pa.table(out) if out else pa.table({"_": pa.nulls(len(records))})


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


def passthrough_array(values: list[Any]) -> pa.Array:
    """Values as Arrow; a column of mixed types (JSONL) falls back to JSON text."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values],
                        type=pa.string())


# ---- CSV --------------------------------------------------------------------------------------


def _scan_csv(f: InputFile, cols: Columns, invalid_utf8: str, stats: ReadStats, gz_index: Path | None) -> Iterator[pa.Table]:
    with open_at(f, 0, gz_index) as fh:
        tracked = _TrackedLines(fh, reopen=lambda at: open_at(f, at, gz_index))
        try:
            header = _csv_header(tracked)
            first_row = 0
            while True:
                table = _csv_records(tracked, header, f, cols, invalid_utf8, stats, first_row, BATCH_ROWS)
                if table.num_rows == 0:
                    stats.bytes_read = tracked.offset
                    return
                first_row += table.num_rows
                yield table
        finally:
            tracked.fh.close()  # a file opened again to read lines a second time


class _TrackedLines:
    """Decoded lines of a binary file, with the byte offset and line number of the next line.

    The lines of the record being read (since :meth:`mark`) are kept, up to _CSV_REPLAY_BYTES, so
    that a record found broken can be read again from its second line (:meth:`reread_after_first`);
    a longer one is read again from the file: ``reopen(offset)`` gives its bytes from ``offset``
    (without it, ``fh`` seeks, its position 0 being the byte at ``offset``)."""

    def __init__(self, fh: IO[bytes], offset: int = 0, line: int = 1,
                 reopen: Callable[[int], IO[bytes]] | None = None):
        self.fh = fh
        self.offset = offset
        self.line = line
        self._base = offset
        self._reopen = reopen
        self._again: list[bytes] = []  # lines to read again, the next one last
        self._record: list[bytes] = []
        self._record_bytes = 0
        self._second: int | None = None  # offset of the record's second line

    def __iter__(self) -> _TrackedLines:
        return self

    def __next__(self) -> str:
        raw = self._again.pop() if self._again else self.fh.readline()
        if not raw:
            raise StopIteration
        if self.offset == 0:
            raw_text = raw.removeprefix(b"\xef\xbb\xbf")
            self.offset += len(raw) - len(raw_text)
            raw = raw_text
        self.offset += len(raw)
        self.line += 1
        if self._second is None:
            self._second = self.offset
        self._record_bytes += len(raw)
        if self._record_bytes <= _CSV_REPLAY_BYTES:
            self._record.append(raw)
        # surrogateescape keeps invalid bytes, which each field then replaces or fails on
        return raw.decode("utf-8", errors="surrogateescape")

    def mark(self) -> None:
        """A record starts at the next line."""
        self._record.clear()
        self._record_bytes = 0
        self._second = None

    def reread_after_first(self, line: int) -> None:
        """Go back to the second line of the record begun (at line ``line``) since :meth:`mark`."""
        if self._second is None:
            return
        if self._record_bytes <= _CSV_REPLAY_BYTES:
            self._again.extend(reversed(self._record[1:]))
        elif self._reopen is not None:
            self.fh.close()
            self.fh = self._reopen(self._second)
            self._again.clear()
        else:
            self.fh.seek(self._second - self._base)
            self._again.clear()
        self.offset, self.line = self._second, line + 1
        self.mark()


def _csv_header(fh: Any) -> list[str]:
    if isinstance(fh, _TrackedLines):
        return next(csv.reader(_one_line(fh)), [])
    first = fh.readline().removeprefix(b"\xef\xbb\xbf").decode("utf-8", "replace")
    return next(csv.reader([first]), [])


def _one_line(tracked: _TrackedLines) -> Iterator[str]:
    try:
        yield next(tracked)
    except StopIteration:
        return


def _csv_header_of(f: InputFile, gz_index: Path | None) -> list[str]:
    with open_at(f, 0, gz_index) as fh:
        return _csv_header(fh)


def _csv_records(tracked: _TrackedLines, header: list[str], f: InputFile, cols: Columns, invalid_utf8: str,
                 stats: ReadStats, first_row: int, limit: int | None) -> pa.Table:
    """Up to ``limit`` CSV records from the tracked lines, with their positions."""
    csv.field_size_limit(sys.maxsize)  # documents can be far longer than the 128 KiB default
    # strict: a quote inside a quoted field must be doubled, and a quoted field must close before the
    # end of the data. A record that breaks this over several lines (a quote left open swallows the
    # lines after it) fails on its first line alone, and the lines after it are read again as rows.
    # The plan and a worker reading a unit's bytes cut rows alike: a record is judged on the bytes
    # from its start, and a unit ends where the plan saw the next row start.
    reader = csv.reader(tracked, strict=True)
    records: list[dict[str, Any]] = []
    problems: list[str | None] = []
    offsets: list[int] = []
    lines: list[int] = []
    while limit is None or len(records) < limit:
        start, line = tracked.offset, tracked.line
        tracked.mark()
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            records.append({})
            if tracked.line - line > 1 or "end of data" in str(exc):
                problems.append(f"bad_csv: line {line}: a quoted field that starts on this line is not "
                                f"closed properly ({exc}); the lines after it are read as rows of their own")
                tracked.reread_after_first(line)
            else:
                problems.append(f"bad_csv: line {line}: {exc}")
        else:
            if not fields:
                continue  # a blank line is not a record
            record, problem = _csv_record(fields, header, tracked.line - 1, invalid_utf8, stats)
            records.append(record)
            problems.append(problem)
        offsets.append(start)
        lines.append(line)
    positions = {OFFSET: pa.array(offsets, pa.int64()), LINE: pa.array(lines, pa.int64())}
    return _normalize(_records_table(records, cols), f, cols, first_row, pa.array(problems, pa.string()), positions)


def _csv_record(fields: list[str], header: list[str], line: int, invalid_utf8: str,
                stats: ReadStats) -> tuple[dict[str, Any], str | None]:
    problem = None
    if len(fields) > len(header):  # fewer fields: the missing ones are null, as in any CSV reader
        problem = f"bad_csv: line {line} has {len(fields)} fields, the header has {len(header)}"
    record = dict(zip(header, fields))
    bad = [k for k, v in record.items() if _has_surrogates(v)]
    if bad and invalid_utf8 == "fail":
        problem = problem or f"invalid_utf8: line {line}, column {bad[0]!r}"
    elif bad:
        stats.replaced_utf8 += 1
        for k in bad:
            record[k] = record[k].encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return record, problem


def _has_surrogates(value: str) -> bool:
    try:
        value.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _csv_block(data: bytes, offset: int, line: int, f: InputFile, cols: Columns, invalid_utf8: str,
               stats: ReadStats, first_row: int, header: Any) -> pa.Table:
    tracked = _TrackedLines(io.BytesIO(data), offset=offset, line=line)
    return _csv_records(tracked, header, f, cols, invalid_utf8, stats, first_row, None)


_BLOCK_PARSERS = {"jsonl": _jsonl_block, "openai-batch": _openai_block, "csv": _csv_block}


# ---- opening files (gzip: an index built once makes it seekable) -----------------------------


def gzip_indexing() -> bool:
    """Whether gzipped input can be indexed (the optional indexed_gzip package)."""
    try:
        import indexed_gzip  # noqa: F401
    except ImportError:
        return False
    return True


def open_at(f: InputFile, offset: int, gz_index: Path | None) -> IO[bytes]:
    """The file's (uncompressed) bytes from ``offset``. A local gzipped file seeks through its saved
    index (indexed_gzip); other compressed files are decompressed from the start up to ``offset``."""
    if f.compression is None:
        return storage.open_bytes(f.path, offset)
    if f.gzip and f.local and gz_index is not None and gz_index.is_file() and gzip_indexing():
        import indexed_gzip

        indexed: IO[bytes] = indexed_gzip.IndexedGzipFile(str(f.path), index_file=str(gz_index))
        indexed.seek(offset)
        return indexed
    return storage.skip_to(storage.open_decompressed(f.path), offset)


def index_gzip(f: InputFile, out: Path) -> Path | None:
    """Build and save the seek index of a local gzipped file once (plan time); None without
    indexed_gzip."""
    if not f.gzip or not f.local or not gzip_indexing():
        return None
    import indexed_gzip

    with indexed_gzip.IndexedGzipFile(str(f.path), spacing=4 << 20) as fh:
        fh.build_full_index()
        out.parent.mkdir(parents=True, exist_ok=True)
        fh.export_index(str(out))
    return out
