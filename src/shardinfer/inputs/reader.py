"""The one interface every input format is read through: :class:`Reader`.

A reader reads a whole file (the plan scans every file once), a range of its rows (a worker reads
its units) and the columns at its start (the config is checked against them), always as Arrow
tables of the one row shape (:mod:`shardinfer.inputs.rows`).

A reader never raises on a bad row: the row is kept with its problem, which becomes a ``failed``
result. Only errors of the whole input (no files, a missing text column) are raised, as
:class:`ConfigError`, before any work starts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from shardinfer.inputs.files import Columns, InputFile
from shardinfer.inputs.rows import ReadStats

if TYPE_CHECKING:
    from shardinfer.inputs.parquet import ParquetCursor

BATCH_ROWS = 65536  # rows of the tables a scan yields


@dataclass(frozen=True)
class Span:
    """Rows ``first_row``..``first_row + rows`` of a file and where the plan saw them: in a text
    format, bytes ``begin``..``end`` starting on line ``line`` (None in a plan without positions),
    checked against the plan's chunk checksums ``crcs`` when given."""

    first_row: int
    rows: int
    begin: int | None = None
    end: int | None = None
    line: int | None = None
    crcs: np.ndarray | None = None


class Reader(ABC):
    """How one input format is read. ``invalid_utf8`` (input.invalid_utf8) says whether text that
    is not valid UTF-8 is replaced (``replace``, counted in ``stats``) or fails its row (``fail``);
    ``gz_index`` is the seek index of a gzipped file, built at plan time (text formats)."""

    @abstractmethod
    def scan(self, f: InputFile, cols: Columns, invalid_utf8: str, stats: ReadStats,
             gz_index: Path | None = None) -> Iterator[pa.Table]:
        """Every row of a file, in order, as tables of the one row shape (text formats with their
        positions: ``_offset`` and ``_line``)."""

    @abstractmethod
    def read_range(self, f: InputFile, cols: Columns, invalid_utf8: str, stats: ReadStats, span: Span,
                   gz_index: Path | None = None, cursor: ParquetCursor | None = None) -> pa.Table:
        """The span's rows in the one row shape. ``cursor`` (Parquet) is where the previous range
        read of the file ended."""

    @abstractmethod
    def columns(self, path: str) -> set[str]:
        """The columns of a file: its schema, or the keys found in its first rows."""
