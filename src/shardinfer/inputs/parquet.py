"""Parquet files: read a row group at a time, a range from the row group that holds its first row.

A scan decodes each row group on its own (a reader run across many row groups keeps memory of all of
them). A worker's range read goes on from where its previous one ended (:class:`ParquetCursor`);
one that starts deep in a local row group skips the pages before it
(:mod:`shardinfer.inputs.parquet_slice`). A remote file is read by ranges: only the footer and the
row groups a unit needs are fetched.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shardinfer.inputs import parquet_slice, storage
from shardinfer.inputs.files import Columns, InputFile
from shardinfer.inputs.reader import BATCH_ROWS, Reader, Span
from shardinfer.inputs.rows import ReadStats, normalize


class ParquetReader(Reader):
    """Parquet: the columns read are those of the file's schema that a read wants."""

    def scan(self, f: InputFile, cols: Columns, invalid_utf8: str, stats: ReadStats,
             gz_index: Path | None = None) -> Iterator[pa.Table]:
        pf = open_parquet(f.path)
        present = [c for c in cols.wanted if c in pf.schema_arrow.names]
        first = 0
        # One reader per row group: a reader run across many row groups keeps memory of all of them.
        for group in range(pf.metadata.num_row_groups):
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=present):
                table = pa.Table.from_batches([batch])
                yield normalize(table, f, cols, first, invalid_utf8=invalid_utf8, stats=stats)
                first += table.num_rows

    def read_range(self, f: InputFile, cols: Columns, invalid_utf8: str, stats: ReadStats, span: Span,
                   gz_index: Path | None = None, cursor: ParquetCursor | None = None) -> pa.Table:
        """The range, decoded from where the cursor stands, or from the start of its row group."""
        first_row, rows = span.first_row, span.rows
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
        return normalize(table, f, cols, first_row, invalid_utf8=invalid_utf8, stats=stats)

    def columns(self, path: str) -> set[str]:
        return set(open_parquet(path).schema_arrow.names)


def open_parquet(path: str) -> pq.ParquetFile:
    """A Parquet file opened for reading (its footer read), local or remote."""
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
    return open_parquet(path).metadata


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
            self.file = open_parquet(path)
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
