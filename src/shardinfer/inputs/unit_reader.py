"""Reading one work unit's rows, and only those, as an Arrow table.

The plan says which rows of which files a unit holds and where they start: JSONL and CSV units are
one read of their byte range (gzipped files seek through the index built at plan time), Parquet
units read from the row group that holds their first row. The table has the corpus's row shape
plus ``_row`` (the global row index) and ids filled in ('<file>:<row>' without an id column).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shardinfer.config import Config
from shardinfer.errors import ConfigError
from shardinfer.inputs import digest as input_digest
from shardinfer.inputs import parquet_slice, reading, storage
from shardinfer.inputs.digest import InputChanged, row_groups_digest
from shardinfer.planning.plan import Plan, Segment, Unit
from shardinfer.requests.prompts import request_columns
from shardinfer.results import ROW


class UnitReader:
    def __init__(self, plan: Plan, cfg: Config, index_dir: Path | None = None):
        self.plan = plan
        self.cfg = cfg
        self.cols = reading.columns_for(cfg.input, request_columns(cfg))
        self.files = [_input_file(info, cfg) for info in plan.files]
        self.indexes = [index_dir / info["gzip_index"] if index_dir and info.get("gzip_index") else None
                        for info in plan.files]
        self.offsets = [0]
        for info in plan.files:
            self.offsets.append(self.offsets[-1] + info["rows"])
        self.crcs = [input_digest.load(index_dir / info["chunk_crcs"]) if index_dir and info.get("chunk_crcs") else None
                     for info in plan.files]
        self._cursors: dict[int, reading.ParquetCursor] = {}  # per Parquet file: where the last read ended
        self._warm_up()

    def _warm_up(self) -> None:
        """Import now what the first read would import: pyarrow's lazy pandas shim (pandas, where
        installed: ~0.3 s) and, when units start deep in a local Parquet row group, polars."""
        reading.import_lazy_modules()
        local = [f.format == "parquet" and not storage.is_remote(f.path) for f in self.files]
        if any(local[seg.file] and (seg.group_offset or 0) > parquet_slice.DEEP_ROWS
               for unit in self.plan.units for seg in unit.segments):
            parquet_slice.load()

    def read(self, unit: Unit) -> pa.Table:
        """The unit's rows, from the input as it was planned: each file is checked when a unit of it
        is read (InputChanged, a config error, when it was edited since)."""
        try:
            tables = [self._segment(seg) for seg in unit.segments]
        except InputChanged as exc:
            raise exc.of_unit(unit.unit) from None
        if not tables:
            return _empty(self.cols)
        return pa.concat_tables(tables, promote_options="permissive")

    def _segment(self, seg: Segment) -> pa.Table:
        index, start, rows = seg.file, seg.start, seg.rows
        f, info = self.files[index], self.plan.files[index]
        check_unchanged(f.path, info)
        if info.get("row_group_digests"):
            _check_row_groups(f.path, info["row_group_digests"], seg)
        cursor = self._cursors.setdefault(index, reading.ParquetCursor()) if f.format == "parquet" else None
        table = reading.read_range(f, self.cols, self.cfg.input.invalid_utf8, start, rows, seg.begin, seg.stop,
                                  seg.line, self.indexes[index], cursor, self.crcs[index])
        if table.num_rows != rows:
            raise InputChanged(f.path, f"rows {start}-{start + rows - 1} read as {table.num_rows} rows, the plan "
                                       f"has {rows}")
        table = table.set_column(table.column_names.index(reading.ID), reading.ID,
                                 reading.row_ids(table, f.source, start))
        first = self.offsets[index] + start
        return table.append_column(ROW, pa.array(range(first, first + rows), pa.int64()))


def keep_rows(table: pa.Table, rows: pa.Array) -> pa.Table:
    """The rows of a unit's table whose global index is in ``rows``, in order."""
    return table.filter(pc.is_in(table.column(ROW), value_set=rows))


def _input_file(info: dict[str, Any], cfg: Config) -> reading.InputFile:
    path = str(info["path"])
    fmt = info.get("format") or reading.file_format(path, cfg.input.format)
    compression = info["compression"] if "compression" in info else (".gz" if info.get("gzip") else None)
    return reading.InputFile(path, info["source"], fmt, compression)


def _empty(cols: reading.Columns) -> pa.Table:
    fields = [(reading.TEXT, pa.string()), (reading.ID, pa.string()), (reading.PROBLEM, pa.string())]
    return pa.table({**{n: pa.array([], t) for n, t in fields}, **{c: pa.nulls(0) for c in cols.extra},
                     ROW: pa.array([], pa.int64())})


def _check_row_groups(path: str, planned: list[str], seg: Segment) -> None:
    """The Parquet row groups a segment reads have the metadata the plan saw."""
    metadata = reading.parquet_metadata(path)
    starts = np.cumsum([0] + [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)])
    first = int(np.searchsorted(starts, seg.start, side="right") - 1)
    last = int(np.searchsorted(starts, max(seg.end - 1, seg.start), side="right") - 1)
    for group in range(first, min(last, len(planned) - 1) + 1):
        if group >= metadata.num_row_groups or row_groups_digest(metadata, [group]) != planned[group]:
            raise InputChanged(path, f"row group {group} differs")


def check_unchanged(path: str, info: dict[str, Any]) -> None:
    """The file is as it was planned: same size and modification time (local), same size and
    version (ETag, generation) in an object store."""
    try:
        now = storage.stat(path)
    except (FileNotFoundError, ConfigError):
        raise InputChanged(path, "it is gone") from None
    changed = now["bytes"] != info["bytes"]
    if now.get("version") is not None or info.get("version") is not None:
        changed = changed or now.get("version") != info.get("version")
    elif now.get("mtime") is not None and info.get("mtime") is not None:
        changed = changed or abs(now["mtime"] - info["mtime"]) > 1e-3
    # else: a server that gives neither a version nor a time: the size is all there is to compare
    if changed:
        raise InputChanged(path, "its size, modification time or version differ")
