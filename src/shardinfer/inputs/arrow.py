"""Arrow IPC files, as Hugging Face ``datasets`` writes them (``save_to_disk``, its cache).

A local file is memory-mapped: reading a range of it costs no copy of the corpus.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from shardinfer.inputs import storage
from shardinfer.inputs.files import Columns, InputFile
from shardinfer.inputs.reader import BATCH_ROWS, Reader, Span
from shardinfer.inputs.rows import ReadStats, normalize

if TYPE_CHECKING:
    from shardinfer.inputs.parquet import ParquetCursor

_ARROW_OPEN: dict[str, pa.Table] = {}  # memory-mapped tables a worker has open (no copy in memory)


class ArrowReader(Reader):
    """Arrow IPC, file or stream format: the columns read are those of the table that a read wants."""

    def scan(self, f: InputFile, cols: Columns, invalid_utf8: str, stats: ReadStats,
             gz_index: Path | None = None) -> Iterator[pa.Table]:
        table = arrow_table(f.path)
        present = [c for c in cols.wanted if c in table.column_names]
        for first in range(0, table.num_rows, BATCH_ROWS):
            yield normalize(table.select(present).slice(first, BATCH_ROWS), f, cols, first,
                            invalid_utf8=invalid_utf8, stats=stats)

    def read_range(self, f: InputFile, cols: Columns, invalid_utf8: str, stats: ReadStats, span: Span,
                   gz_index: Path | None = None, cursor: ParquetCursor | None = None) -> pa.Table:
        table = arrow_table(f.path)
        present = [c for c in cols.wanted if c in table.column_names]
        return normalize(table.select(present).slice(span.first_row, span.rows), f, cols, span.first_row,
                         invalid_utf8=invalid_utf8, stats=stats)

    def columns(self, path: str) -> set[str]:
        return set(arrow_table(path).column_names)


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
