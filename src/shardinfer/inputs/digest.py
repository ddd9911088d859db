"""Checksums of the input as it was planned, so a worker notices a file edited during the run.

Size and modification time miss an edit that keeps both (``cp -p``, ``rsync -t``). While the plan
scans a JSONL or CSV file it computes a CRC-32 of every :data:`CHUNK` bytes (uncompressed), at no
extra read; the list is saved beside the gzip indexes (``index/file-N.crc.npy``). A worker reading a
unit's byte range reads the whole chunks around it (at most two chunks more) and checks them.
Parquet units are checked by their row groups' metadata (offsets, sizes, statistics), read from the
footer. Files in object stores are checked by their version (ETag, generation) instead.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow.parquet as pq

from shardinfer.errors import ConfigError

CHUNK = 1 << 20


class InputChanged(ConfigError):
    """An input file differs from what the run planned: running on would mix two versions of it."""

    def __init__(self, path: str, what: str, unit: int | None = None):
        self.path, self.what = path, what
        where = f" (read for unit {unit})" if unit is not None else ""
        super().__init__(f"input file {path}{where} changed since the run was planned: {what}. The rows of a run "
                         f"come from one version of its input: restore the file, or start a new run on the new "
                         f"data (another run.directory).")

    def of_unit(self, unit: int) -> InputChanged:
        return InputChanged(self.path, self.what, unit)


class ChunkDigest:
    """CRC-32 of each CHUNK bytes of a stream read from its start, fed as it is read."""

    def __init__(self) -> None:
        self.crcs: list[int] = []
        self._crc = 0
        self._filled = 0

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while len(view):
            take = min(CHUNK - self._filled, len(view))
            self._crc = zlib.crc32(view[:take], self._crc)
            self._filled += take
            view = view[take:]
            if self._filled == CHUNK:
                self.crcs.append(self._crc)
                self._crc, self._filled = 0, 0

    def finish(self) -> np.ndarray:
        if self._filled:
            self.crcs.append(self._crc)
            self._crc, self._filled = 0, 0
        return np.array(self.crcs, dtype=np.uint32)


def digest_stream(fh: IO[bytes]) -> np.ndarray:
    """The chunk checksums of a whole stream (read from its start)."""
    digest = ChunkDigest()
    with fh:
        while chunk := fh.read(8 << 20):
            digest.update(chunk)
    return digest.finish()


def save(crcs: np.ndarray, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, crcs, allow_pickle=False)
    return path.name


def load(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def aligned(begin: int, end: int) -> tuple[int, int]:
    """The byte range of the whole chunks around ``begin``..``end``."""
    return begin // CHUNK * CHUNK, -(-end // CHUNK) * CHUNK


def check_chunks(crcs: np.ndarray, start: int, data: bytes, path: str) -> None:
    """``data`` is the file's bytes from ``start`` (a chunk boundary) to a chunk boundary or the end
    of the file: each whole chunk must have the CRC the plan saw."""
    first = start // CHUNK
    for i in range(0, len(data), CHUNK):
        k = first + i // CHUNK
        if k >= len(crcs) or zlib.crc32(data[i:i + CHUNK]) != int(crcs[k]):
            raise InputChanged(path, f"its bytes {start + i}-{start + min(i + CHUNK, len(data)) - 1} differ")


def row_groups_digest(metadata: pq.FileMetaData, groups: list[int]) -> str:
    """A digest of row groups' metadata: where each column chunk is, its sizes and statistics."""
    parts: list[Any] = []
    for g in groups:
        rg = metadata.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            stats = col.statistics
            parts.append([g, c, col.file_offset, col.data_page_offset, col.total_compressed_size,
                          col.total_uncompressed_size, col.num_values,
                          None if stats is None or not stats.has_min_max else [repr(stats.min), repr(stats.max)],
                          None if stats is None else stats.null_count])
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]
