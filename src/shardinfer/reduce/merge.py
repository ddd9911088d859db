"""Merge committed parts into ``results/`` and write the report.

Parts are read once each, in unit order (units are ascending row ranges), so the results come out in
input order. The schema of the merged results is known before the first part is read: each done
record carries its part's schema (parts committed by older versions have their footer read). Rows
are buffered into row groups of ``run.results_row_group_rows`` (fewer rows for embeddings, so a group
stays under 256 MB; memory bounded by one row group)
and files hold up to eight row groups. Every part is checked, in Arrow, to hold exactly its unit's
rows once each; anything missing or inconsistent fails loudly with what to do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shardinfer.config import Config
from shardinfer.errors import RunError, disk_full, is_disk_full
from shardinfer.inputs import storage
from shardinfer.ledger.claims import Ledger
from shardinfer.ledger.rundir import RunDir
from shardinfer.ledger.runstate import load_run
from shardinfer.planning.plan import Plan, Unit
from shardinfer.reduce.report import build_report, write_report
from shardinfer.reduce.result_set import new_version, publish_version, results_lock
from shardinfer.requests.builder import result_extras
from shardinfer.requests.openai_batch import OutputFile
from shardinfer.results import ROW, ResultExtras, Totals, empty_result_schema, schema_from_record

log = logging.getLogger(__name__)

ROW_GROUPS_PER_FILE = 8


def reduce_run(run_dir: RunDir) -> dict[str, Any]:
    """Write merged results and the report; return the report. Reduces of one run take turns, and
    each publishes its result set whole (see :mod:`shardinfer.result_set`)."""
    with results_lock(run_dir) as locked:
        return _reduce(run_dir, tidy=locked)


def _reduce(run_dir: RunDir, *, tidy: bool) -> dict[str, Any]:
    cfg, plan = load_run(run_dir)
    done = Ledger(run_dir).done_units()
    missing = [u.unit for u in plan.units if u.unit not in done]
    if missing:
        raise RunError(
            f"{len(missing)} of {len(plan.units)} units are not done (units {_few(missing)}); "
            f"see {run_dir.logs} for the workers' errors. Run the same command again to finish them."
        )
    schema = _result_schema(run_dir, plan, done, cfg.input.passthrough, result_extras(cfg))
    openai = OutputFile(run_dir.openai_output, run_id(run_dir)) if writes_openai_output(cfg) else None
    totals = _write_results(run_dir, plan, schema, group_rows(cfg.run.results_row_group_rows, schema), openai,
                            tidy=tidy)
    _check_counts(totals, plan.total_rows)
    report = build_report(cfg, plan, run_dir, totals)
    if cfg.run.output:
        report["output"] = publish(run_dir, cfg.run.output, writes_openai_output(cfg))
    write_report(run_dir, report)
    return report


GROUP_BYTES = 256 << 20  # the most a row group of fixed-size columns (embeddings) may hold in memory


def group_rows(configured: int, schema: pa.Schema) -> int:
    """Rows per row group: ``run.results_row_group_rows``, fewer where the fixed-size columns (a
    1024-dimension embedding is 4 KB a row) would make a group larger than :data:`GROUP_BYTES`."""
    row_bytes = sum(f.type.list_size * f.type.value_type.bit_width // 8 for f in schema
                    if pa.types.is_fixed_size_list(f.type) and pa.types.is_floating(f.type.value_type))
    if not row_bytes:
        return configured
    return max(1024, min(configured, GROUP_BYTES // row_bytes))


def publish(run_dir: RunDir, output: str, openai: bool) -> list[str]:
    """Copy the merged results (and the OpenAI output file) to ``run.output``: a directory or an
    object store URL. Each file is written under a temporary name first where the store renames
    cheaply (local); objects appear whole when their upload completes."""
    files = sorted(run_dir.results.glob("part-*.parquet")) + ([run_dir.openai_output] if openai else [])
    fs, root = storage.filesystem(output)
    written = []
    with storage.errors(output, "run.output"):
        fs.makedirs(f"{root}/results", exist_ok=True)
        for old in fs.glob(f"{root}/results/part-*.parquet"):  # an earlier reduce's files
            fs.rm_file(old)
        for path in files:
            target = f"{root}/results/{path.name}" if path.suffix == ".parquet" else f"{root}/{path.name}"
            fs.put_file(str(path), target)
            written.append(storage.url(fs, target))
    log.info("results copied to %s (%d files)", output, len(written))
    return written


def writes_openai_output(cfg: Config) -> bool:
    """output.openai_batch, by default on for OpenAI batch input."""
    if cfg.output.openai_batch is not None:
        return cfg.output.openai_batch
    return cfg.input.format == "openai-batch"


def run_id(run_dir: RunDir) -> str:
    """A short id of the run directory, in the ids of the OpenAI output lines."""
    return hashlib.sha256(str(run_dir.path.resolve()).encode()).hexdigest()[:12]


def _result_schema(run_dir: RunDir, plan: Plan, done: dict[int, Any], passthrough: list[str],
                   extras: ResultExtras) -> pa.Schema:
    """One schema for all parts; pass-through columns whose types disagree become strings."""
    schemas = [_schema_of(run_dir, u.unit, done[u.unit]) for u in plan.units]
    if not schemas:  # an empty corpus still gets a (empty) result set with the contract's columns
        return empty_result_schema(passthrough, extras)
    try:
        unified = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        unified = _string_fallback(schemas)
    return pa.schema([f for f in unified if f.name != ROW])


def _schema_of(run_dir: RunDir, unit: int, record: dict[str, Any]) -> pa.Schema:
    if record.get("schema"):
        return schema_from_record(record["schema"])
    try:  # committed before done records carried the schema
        return pq.read_schema(run_dir.part(unit))
    except (OSError, pa.ArrowInvalid) as exc:
        raise RunError(f"part of unit {unit} is unreadable ({exc}). {_redo_hint(run_dir, unit)}") from exc


def _string_fallback(schemas: list[pa.Schema]) -> pa.Schema:
    fields: dict[str, pa.Field] = {}
    for schema in schemas:
        for f in schema:
            known = fields.get(f.name)
            if known is None or known.type == pa.null():
                fields[f.name] = f
            elif known.type != f.type and f.type != pa.null():
                fields[f.name] = pa.field(f.name, pa.string())
    return pa.schema(list(fields.values()))


class _Writer:
    """Result files of up to ROW_GROUPS_PER_FILE row groups, each of ``group_rows`` rows."""

    def __init__(self, directory: Path, schema: pa.Schema, group_rows: int):
        self.directory = directory
        self.schema = schema
        self.group_rows = group_rows
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.files = 0
        self.groups_in_file = 0
        self.writer: pq.ParquetWriter | None = None

    def add(self, table: pa.Table) -> None:
        self.buffer.append(table)
        self.buffered += table.num_rows
        while self.buffered >= self.group_rows:
            self._flush(self.group_rows)

    def close(self) -> None:
        if self.buffered:
            self._flush(self.buffered)
        if self.writer is None:
            pq.write_table(self.schema.empty_table(), self.directory / "part-00000.parquet")
        else:
            self.writer.close()

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self.buffer)
        group, rest = table.slice(0, rows), table.slice(rows)
        if self.writer is None or self.groups_in_file >= ROW_GROUPS_PER_FILE:
            if self.writer is not None:
                self.writer.close()
            self.writer = pq.ParquetWriter(self.directory / f"part-{self.files:05d}.parquet", self.schema,
                                           compression="zstd")
            self.files, self.groups_in_file = self.files + 1, 0
        self.writer.write_table(group, row_group_size=max(rows, 1))
        self.groups_in_file += 1
        self.buffer = [rest] if rest.num_rows else []
        self.buffered = rest.num_rows


def _write_results(run_dir: RunDir, plan: Plan, schema: pa.Schema, group_rows: int,
                   openai: OutputFile | None = None, *, tidy: bool = True) -> Totals:
    """Merged results from the parts read once each, published whole; the OpenAI output file, when
    asked, from the same tables."""
    tmp = new_version(run_dir)
    try:
        return _write_version(run_dir, tmp, plan, schema, group_rows, openai, tidy=tidy)
    except OSError as exc:  # a full disk: the incomplete version goes, the published set stays
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            raise disk_full(tmp.parent) from exc
        raise


def _write_version(run_dir: RunDir, tmp: Path, plan: Plan, schema: pa.Schema, group_rows: int,
                   openai: OutputFile | None, *, tidy: bool) -> Totals:
    totals = Totals()
    writer = _Writer(tmp, schema, group_rows)
    for unit in plan.units:
        table = _checked_part(run_dir, unit)
        totals.add(table)
        merged = _conform(table.drop_columns([ROW]), schema)
        writer.add(merged)
        if openai is not None:
            openai.add(merged)
    writer.close()
    if openai is not None:
        log.info("wrote %d lines to %s", openai.close(), openai.out)
    publish_version(run_dir, tmp, tidy=tidy)
    return totals


def _redo_hint(run_dir: RunDir, unit: int) -> str:
    return f"Delete {run_dir.done_record(unit)} and {run_dir.part(unit)} and run again to redo the unit."


def _checked_part(run_dir: RunDir, unit: Unit) -> pa.Table:
    """The unit's part, read once; its ``_row`` column must be exactly the unit's rows, in order."""
    try:
        table = pq.ParquetFile(run_dir.part(unit.unit)).read(use_threads=False)  # small: no thread pool
    except (OSError, pa.ArrowInvalid) as exc:
        raise RunError(f"part of unit {unit.unit} is unreadable ({exc}). {_redo_hint(run_dir, unit.unit)}") from exc
    expected = pa.array(np.arange(unit.first_row, unit.first_row + unit.rows, dtype=np.int64))
    rows = table.column(ROW).combine_chunks() if table.num_rows else pa.array([], pa.int64())
    if len(rows) != unit.rows or not pc.all(pc.equal(rows, expected)).as_py():
        raise RunError(f"part of unit {unit.unit} does not hold rows {unit.first_row}-"
                       f"{unit.first_row + unit.rows - 1} once each. {_redo_hint(run_dir, unit.unit)}")
    return table


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    columns = []
    for f in schema:
        if f.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, f.type))
            continue
        col = table.column(f.name)
        if col.type != f.type:
            col = _cast(col, f.type)
        columns.append(col)
    return pa.table(columns, schema=schema)


def _cast(col: pa.ChunkedArray, to: pa.DataType) -> pa.ChunkedArray | pa.Array:
    try:
        return col.cast(to)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.array([None if v is None else json.dumps(v) for v in col.to_pylist()], type=pa.string())


def _check_counts(totals: Totals, total_rows: int) -> None:
    if totals.rows != total_rows or totals.accounted != total_rows:
        raise RunError(f"results hold {totals.rows} rows ({totals.by_status()}) for {total_rows} input rows: "
                       f"the run directory is inconsistent. Start a new run.")


def _few(items: list[int]) -> str:
    return ", ".join(map(str, items[:10])) + (", ..." if len(items) > 10 else "")
