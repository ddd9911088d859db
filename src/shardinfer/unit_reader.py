"""Reading one work unit's rows, and only those, as an Arrow table.

The plan says which rows of which files a unit holds and where they start: JSONL and CSV units are
one read of their byte range (gzipped files seek through the index built at plan time), Parquet
units read from the row group that holds their first row. The table has the corpus's row shape
plus ``_row`` (the global row index) and ids filled in ('<file>:<row>' without an id column).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from shardinfer import corpus, parquet_slice, storage
from shardinfer.config import Config
from shardinfer.errors import ConfigError, RunError
from shardinfer.plan import Plan, Unit
from shardinfer.prompts import request_columns
from shardinfer.results import ROW


class UnitReader:
    def __init__(self, plan: Plan, cfg: Config, index_dir: Path | None = None):
        self.plan = plan
        self.cfg = cfg
        self.cols = corpus.columns_for(cfg.input, request_columns(cfg))
        self.files = [_input_file(info, cfg) for info in plan.files]
        self.indexes = [index_dir / info["gzip_index"] if index_dir and info.get("gzip_index") else None
                        for info in plan.files]
        self.offsets = [0]
        for info in plan.files:
            self.offsets.append(self.offsets[-1] + info["rows"])
        self._checked: set[int] = set()
        self._cursors: dict[int, corpus.ParquetCursor] = {}  # per Parquet file: where the last read ended
        self._warm_up()

    def _warm_up(self) -> None:
        """Import now what the first read would import: pyarrow's lazy pandas shim (pandas, where
        installed: ~0.3 s) and, when units start deep in a local Parquet row group, polars."""
        corpus.import_lazy_modules()
        local = [f.format == "parquet" and not storage.is_remote(f.path) for f in self.files]
        if any(local[seg.file] and (seg.group_offset or 0) > parquet_slice.DEEP_ROWS
               for unit in self.plan.units for seg in unit.segments):
            parquet_slice.load()

    def read(self, unit: Unit) -> pa.Table:
        tables = [self._segment(seg.file, seg.start, seg.rows, seg.begin, seg.stop, seg.line)
                  for seg in unit.segments]
        if not tables:
            return _empty(self.cols)
        return pa.concat_tables(tables, promote_options="permissive")

    def _segment(self, index: int, start: int, rows: int, begin: int | None, stop: int | None,
                 line: int | None) -> pa.Table:
        f, info = self.files[index], self.plan.files[index]
        if index not in self._checked:
            check_unchanged(f.path, info)
            self._checked.add(index)
        cursor = self._cursors.setdefault(index, corpus.ParquetCursor()) if f.format == "parquet" else None
        table = corpus.read_range(f, self.cols, self.cfg.input.invalid_utf8, start, rows, begin, stop, line,
                                  self.indexes[index], cursor)
        if table.num_rows != rows:
            raise RunError(f"{f.path}: rows {start}-{start + rows - 1} read as {table.num_rows} rows, the plan has "
                           f"{rows}: the input changed since the run was planned. Start a new run.")
        table = table.set_column(table.column_names.index(corpus.ID), corpus.ID,
                                 corpus.row_ids(table, f.source, start))
        first = self.offsets[index] + start
        return table.append_column(ROW, pa.array(range(first, first + rows), pa.int64()))


def keep_rows(table: pa.Table, rows: pa.Array) -> pa.Table:
    """The rows of a unit's table whose global index is in ``rows``, in order."""
    return table.filter(pc.is_in(table.column(ROW), value_set=rows))


def _input_file(info: dict[str, Any], cfg: Config) -> corpus.InputFile:
    path = str(info["path"])
    fmt = info.get("format") or corpus.file_format(path, cfg.input.format)
    compression = info["compression"] if "compression" in info else (".gz" if info.get("gzip") else None)
    return corpus.InputFile(path, info["source"], fmt, compression)


def _empty(cols: corpus.Columns) -> pa.Table:
    fields = [(corpus.TEXT, pa.string()), (corpus.ID, pa.string()), (corpus.PROBLEM, pa.string())]
    return pa.table({**{n: pa.array([], t) for n, t in fields}, **{c: pa.nulls(0) for c in cols.extra},
                     ROW: pa.array([], pa.int64())})


def check_unchanged(path: str, info: dict[str, Any]) -> None:
    """The file is as it was planned: same size and modification time (local), same size and
    version (ETag, generation) in an object store."""
    try:
        now = storage.stat(path)
    except (FileNotFoundError, ConfigError):
        raise RunError(f"input file {path} is gone since the run was planned") from None
    changed = now["bytes"] != info["bytes"]
    if now.get("version") is not None or info.get("version") is not None:
        changed = changed or now.get("version") != info.get("version")
    elif now.get("mtime") is not None and info.get("mtime") is not None:
        changed = changed or abs(now["mtime"] - info["mtime"]) > 1e-3
    # else: a server that gives neither a version nor a time: the size is all there is to compare
    if changed:
        raise RunError(f"input file {path} changed since the run was planned (size, modification time or "
                       f"version). Start a new run (another run.directory) to process the new data.")
