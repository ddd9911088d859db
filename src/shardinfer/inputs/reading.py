"""Reading the corpus: a whole file (the plan), a range of its rows (a worker), its columns (the
config check), each file by the :class:`Reader` of its format in :data:`READERS`.

The formats: Parquet (:mod:`.parquet`), Arrow files of Hugging Face datasets (:mod:`.arrow`), JSONL
and OpenAI batch files (:mod:`.jsonl`) and CSV (:mod:`.csv`), the text formats also compressed
(:mod:`.compressed`). Every reader gives the one row shape (:mod:`.rows`): texts, ids and problems
are computed with Arrow compute on whole batches; only the lines Arrow's JSON parser rejects, and
CSV records, go through Python one by one. A bad row is kept with its problem; only errors of the
whole input (no files, a missing column) are raised, as :class:`ConfigError`, before any work starts.

This module also gives, under one name, everything callers read the input with (the files, the row
shape, Parquet footers, gzip indexes): earlier versions had it all in ``shardinfer.corpus``, which
still imports as this module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from shardinfer.config import InputConfig
from shardinfer.errors import ConfigError
from shardinfer.inputs.arrow import ArrowReader, arrow_table
from shardinfer.inputs.compressed import gzip_indexing, index_gzip, open_at
from shardinfer.inputs.csv import CsvReader
from shardinfer.inputs.files import (
    OPENAI_ID,
    OPENAI_REQUEST,
    Columns,
    InputFile,
    columns_for,
    configured_columns,
    extra_columns,
    file_format,
    hf_dataset_files,
    input_files,
    resolve_files,
    saved_dataset_files,
    source_names,
)
from shardinfer.inputs.jsonl import JsonlReader, OpenAIBatchReader
from shardinfer.inputs.lines import BLOCK_BYTES
from shardinfer.inputs.parquet import ParquetCursor, ParquetReader, parquet_metadata, parquet_row_groups
from shardinfer.inputs.reader import BATCH_ROWS, Reader, Span
from shardinfer.inputs.rows import (
    ReadStats,
    default_ids,
    import_lazy_modules,
    normalize,
    passthrough_array,
    row_ids,
    text_problem,
    text_problems,
)
from shardinfer.results import CHARS, ID, LINE, OFFSET, PROBLEM, TEXT

__all__ = [
    "BATCH_ROWS", "BLOCK_BYTES", "CHARS", "ID", "LINE", "OFFSET", "OPENAI_ID", "OPENAI_REQUEST", "PROBLEM",
    "READERS", "TEXT", "Columns", "InputFile", "ParquetCursor", "ReadStats", "Reader", "Span", "arrow_table",
    "check_columns", "columns_for", "default_ids", "extra_columns", "file_format", "gzip_indexing",
    "hf_dataset_files", "import_lazy_modules", "index_gzip", "input_files", "open_at", "parquet_metadata",
    "parquet_row_groups", "passthrough_array", "peek_columns", "read_range", "read_table", "reader_for",
    "resolve_files", "row_ids", "saved_dataset_files", "scan", "source_names", "text_problem", "text_problems",
]

READERS: dict[str, Reader] = {
    "parquet": ParquetReader(),
    "arrow": ArrowReader(),
    "jsonl": JsonlReader(),
    "openai-batch": OpenAIBatchReader(),
    "csv": CsvReader(),
}


def reader_for(fmt: str) -> Reader:
    """The reader of a file format (an :attr:`InputFile.format`)."""
    try:
        return READERS[fmt]
    except KeyError:
        raise ConfigError(f"input.format: no reader for {fmt!r}; the formats read are "
                          f"{', '.join(READERS)}") from None


def scan(f: InputFile, cols: Columns, invalid_utf8: str, stats: ReadStats,
         gz_index: Path | None = None) -> Iterator[pa.Table]:
    """Every row of a file, in order, as tables of the one row shape (with positions)."""
    return reader_for(f.format).scan(f, cols, invalid_utf8, stats, gz_index)


def read_range(f: InputFile, cols: Columns, invalid_utf8: str, first_row: int, rows: int,
               begin: int | None, end: int | None, line: int | None, gz_index: Path | None = None,
               cursor: ParquetCursor | None = None, crcs: np.ndarray | None = None) -> pa.Table:
    """Rows ``first_row``..``first_row + rows`` of a file. Text formats read bytes ``begin``..``end``
    (the plan's positions), checked against the plan's chunk checksums ``crcs`` when given;
    Parquet decodes from where ``cursor`` stands (the end of the previous range read) or from the
    start of the row group that holds ``first_row``."""
    span = Span(first_row, rows, begin, end, line, crcs)
    table = reader_for(f.format).read_range(f, cols, invalid_utf8, ReadStats(), span, gz_index, cursor)
    return table.drop_columns([c for c in (OFFSET, LINE) if c in table.column_names])


def read_table(f: InputFile, cfg: InputConfig, extra: list[str] | tuple[str, ...] = (),
               stats: ReadStats | None = None) -> pa.Table:
    """A whole file in the one row shape (small files: tests, the benchmark's source text)."""
    cols = dataclasses.replace(columns_for(cfg, [], with_extra=False), extra=tuple(extra))
    tables = list(scan(f, cols, cfg.invalid_utf8, stats or ReadStats()))
    if not tables:
        return normalize(pa.table({}), f, cols, 0)
    return pa.concat_tables(tables, promote_options="permissive")


def peek_columns(path: str, fmt: str) -> set[str]:
    """The columns of a file: its schema, or the keys or header names at its start."""
    return reader_for(fmt).columns(path)


def check_columns(files: list[str], cfg: InputConfig, used: list[tuple[str, str]]) -> None:
    """Fail before the run when a configured column is in none of the first file's rows.

    The first file with any column is checked; a corpus of empty files has nothing to check.
    An OpenAI batch file has no configured columns.
    """
    if cfg.format == "openai-batch":
        return
    for path in files:
        found = peek_columns(path, file_format(path, cfg.format))
        if found:
            break
    else:
        return
    for key, name in configured_columns(cfg, used):
        if name not in found:
            raise ConfigError(
                f"{key}: column {name!r} is not in {str(path)!r}. Columns found: "
                f"{', '.join(sorted(found)) or '(none)'}. Set {key} to one of them."
            )
