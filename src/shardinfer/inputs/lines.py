"""What the text formats (JSONL, OpenAI batch files, CSV) share: a file read in blocks of whole
lines, a range read as one read of the bytes the plan saw it in, and lines found in a block with
NumPy instead of a loop over its bytes.
"""

from __future__ import annotations

import codecs
from abc import abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from shardinfer.inputs.compressed import open_at
from shardinfer.inputs.digest import aligned, check_chunks
from shardinfer.inputs.files import Columns, InputFile
from shardinfer.inputs.reader import Reader, Span
from shardinfer.inputs.rows import ReadStats
from shardinfer.results import LINE, OFFSET

if TYPE_CHECKING:
    from shardinfer.inputs.parquet import ParquetCursor

BLOCK_BYTES = 16 << 20  # JSONL/CSV bytes parsed at once (whole lines)
_SCAN_CHUNK = 4 << 20  # bytes of a block searched (or checked for UTF-8) at once
_WHITESPACE = np.array([9, 10, 13, 32], dtype=np.uint8)


class LineReader(Reader):
    """A format of text lines. A range is one read of the bytes the plan saw it in, parsed by
    :meth:`block`; in a plan without positions, the file is scanned up to the range."""

    def read_range(self, f: InputFile, cols: Columns, invalid_utf8: str, stats: ReadStats, span: Span,
                   gz_index: Path | None = None, cursor: ParquetCursor | None = None) -> pa.Table:
        if span.begin is None or span.end is None:  # a plan without positions: read up to the range
            return slice_rows(self.scan(f, cols, invalid_utf8, stats, gz_index), span.first_row, span.rows)
        data = read_bytes(f, span.begin, span.end, gz_index, span.crcs)
        return self.block(data, span.begin, span.line or 1, f, cols, invalid_utf8, stats, span.first_row, gz_index)

    @abstractmethod
    def block(self, data: bytes, offset: int, line: int, f: InputFile, cols: Columns, invalid_utf8: str,
              stats: ReadStats, first_row: int, gz_index: Path | None = None) -> pa.Table:
        """The rows of ``data``, whole lines of file ``f`` from byte ``offset`` (line ``line``), the
        first of them row ``first_row`` of the file, in the one row shape with their positions."""


def blocks(f: InputFile, gz_index: Path | None, stats: ReadStats | None = None) -> Iterator[tuple[int, bytes]]:
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


def read_bytes(f: InputFile, begin: int, end: int, gz_index: Path | None, crcs: np.ndarray | None) -> bytes:
    """Bytes ``begin``..``end``; with ``crcs``, the whole chunks around them are read and checked."""
    if crcs is None:
        with open_at(f, begin, gz_index) as fh:
            return fh.read(end - begin)
    start, stop = aligned(begin, end)
    with open_at(f, start, gz_index) as fh:
        data = fh.read(stop - start)
    check_chunks(crcs, start, data, f.path)
    return data[begin - start:end - start]


def slice_rows(batches: Iterator[pa.Table], first_row: int, rows: int) -> pa.Table:
    """Rows ``first_row``..``first_row + rows`` of a scan, reading no further than them."""
    kept, seen = [], 0
    for batch in batches:
        lo, hi = max(first_row - seen, 0), min(first_row + rows - seen, batch.num_rows)
        if lo < hi:
            kept.append(batch.slice(lo, hi - lo))
        seen += batch.num_rows
        if seen >= first_row + rows:
            break
    return pa.concat_tables(kept, promote_options="permissive")


# ---- finding lines and bytes in a block -------------------------------------------------------


def line_bounds(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Start and end (without the newline) of every line of a block, and which lines hold anything.
    A line that starts with a non-blank byte holds something; only the rare others are looked into."""
    arr = np.frombuffer(data, dtype=np.uint8)
    newlines = byte_positions(arr, 10)
    ends = np.concatenate([newlines, [len(arr)]]) if (len(arr) and arr[-1] != 10) else newlines
    starts = np.concatenate([[0], ends[:-1] + 1]) if len(ends) else np.zeros(0, dtype=np.int64)
    nonempty = ends > starts
    first = np.full(len(starts), 32, np.uint8)
    first[nonempty] = arr[starts[nonempty]]
    filled = nonempty & ~np.isin(first, _WHITESPACE)
    for i in np.flatnonzero(nonempty & ~filled).tolist():  # starts with a blank: blank throughout?
        filled[i] = bool(data[starts[i]:ends[i]].strip())
    return starts.astype(np.int64), ends.astype(np.int64), filled


def row_positions(data: bytes, offset: int, line: int, starts: np.ndarray, rows: np.ndarray) -> dict[str, pa.Array]:
    """Where rows start: the byte offset and line number of lines ``rows`` of a block (``starts``:
    the offsets of its lines in the block). A byte order mark at the start of a file is not part of
    its first row."""
    bom = offset == 0 and data.startswith(b"\xef\xbb\xbf")
    return {OFFSET: pa.array(offset + starts[rows] + (3 * (rows == 0) if bom else 0), pa.int64()),
            LINE: pa.array(line + rows, pa.int64())}


def byte_positions(arr: np.ndarray, *values: int) -> np.ndarray:
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


def valid_utf8(data: bytes) -> bool:
    """Whether the bytes are UTF-8, decoded a few MB at a time (no copy of a whole long line)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(data)
    try:
        for i in range(0, len(data), _SCAN_CHUNK):
            decoder.decode(view[i:i + _SCAN_CHUNK], final=i + _SCAN_CHUNK >= len(data))
    except UnicodeDecodeError:
        return False
    return True
