"""Rows from deep inside a big Parquet row group, without decoding the rows before them.

pyarrow decodes a row group from its start: a unit that starts 100,000 rows into a row group of
131,072 rows pays for decompressing and decoding those 100,000 rows first. polars' Parquet reader
reads the page headers and skips whole pages before a slice without decompressing them, so the read
costs about the same wherever the unit starts. Used for local files; the result is cast back to the
file's own Arrow types (polars reads strings as ``large_string``), and anything polars cannot read
(or a missing polars) falls back to pyarrow.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import pyarrow as pa

log = logging.getLogger(__name__)

DEEP_ROWS = 8192  # a unit starting further than this into its row group is read by page skipping
_UNAVAILABLE: set[str] = set()  # files polars could not read: not tried again


def load() -> Any:
    """polars, imported once per process (a worker does it when it opens its corpus, not in its
    first read); None when it is not installed."""
    os.environ.setdefault("POLARS_MAX_THREADS", "2")  # a worker reads one small slice at a time
    try:
        import polars as pl
    except ImportError:
        log.info("polars is not installed: Parquet units deep in a row group are decoded from its start "
                 "(pip install polars)")
        return None
    return pl


def read_slice(path: str, schema: pa.Schema, first_row: int, rows: int) -> pa.Table | None:
    """Rows ``[first_row, first_row + rows)`` of the file (counted from its first row), with the
    columns and types of ``schema``; None when polars is missing or cannot read this file."""
    if path in _UNAVAILABLE:
        return None
    pl = load()
    if pl is None:
        _UNAVAILABLE.add(path)
        return None
    try:
        frame = (pl.scan_parquet(path, glob=False, hive_partitioning=False)
                 .select(schema.names).slice(first_row, rows).collect())
        return frame.to_arrow().cast(schema)
    except Exception as exc:  # noqa: BLE001 - any failure of the fast path falls back to pyarrow
        _UNAVAILABLE.add(path)
        log.info("%s: reading by page skipping failed (%s); decoding row groups from their start", path, exc)
        return None
