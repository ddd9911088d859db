"""Merge committed parts into ``results/`` and write the report.

Parts are streamed in unit order (units are ascending row ranges), so the results come out in input
order with memory bounded by one unit. Every part is checked to hold exactly its unit's rows, once
each; anything missing or inconsistent fails loudly with what to do.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shardinfer.errors import RunError
from shardinfer.ledger import Ledger
from shardinfer.report import build_report, write_report
from shardinfer.results import ROW, Totals, empty_result_schema
from shardinfer.rundir import RunDir
from shardinfer.runstate import load_run

log = logging.getLogger(__name__)

ROWS_PER_RESULT_FILE = 1_000_000


def reduce_run(run_dir: RunDir) -> dict[str, Any]:
    """Write merged results and the report; return the report."""
    cfg, plan = load_run(run_dir)
    done = Ledger(run_dir).done_units()
    missing = [u.unit for u in plan.units if u.unit not in done]
    if missing:
        raise RunError(
            f"{len(missing)} of {len(plan.units)} units are not done (units {_few(missing)}); "
            f"see {run_dir.logs} for the workers' errors. Run the same command again to finish them."
        )
    schema = _result_schema(run_dir, plan, cfg.input.passthrough)
    totals = _write_results(run_dir, plan, done, schema)
    _check_counts(totals, plan.total_rows)
    report = build_report(cfg, plan, run_dir, totals)
    write_report(run_dir, report)
    return report


def _result_schema(run_dir: RunDir, plan: Any, passthrough: list[str]) -> pa.Schema:
    """One schema for all parts; pass-through columns whose types disagree become strings."""
    schemas = [_read_part(run_dir, u.unit, pq.read_schema) for u in plan.units]
    if not schemas:  # an empty corpus still gets a (empty) result set with the contract's columns
        return empty_result_schema(passthrough)
    try:
        unified = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        unified = _string_fallback(schemas)
    return pa.schema([f for f in unified if f.name != ROW])


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


def _write_results(run_dir: RunDir, plan: Any, done: dict[int, Any], schema: pa.Schema) -> Totals:
    tmp = run_dir.path / ".results.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    totals, writer, file_index, in_file = Totals(), None, 0, 0
    for unit in plan.units:
        table = _checked_part(run_dir, unit, done[unit.unit])
        totals.add(table)
        if writer is None or in_file >= ROWS_PER_RESULT_FILE:
            if writer is not None:
                writer.close()
            writer = pq.ParquetWriter(tmp / f"part-{file_index:05d}.parquet", schema, compression="zstd")
            file_index, in_file = file_index + 1, 0
        writer.write_table(_conform(table.drop_columns([ROW]), schema))
        in_file += table.num_rows
    if writer is None:
        pq.write_table(schema.empty_table(), tmp / "part-00000.parquet")
    else:
        writer.close()
    shutil.rmtree(run_dir.results, ignore_errors=True)
    tmp.rename(run_dir.results)
    return totals


def _read_part(run_dir: RunDir, unit: int, reader: Callable[[Any], Any]) -> Any:
    try:
        return reader(run_dir.part(unit))
    except (OSError, pa.ArrowInvalid) as exc:
        raise RunError(f"part of unit {unit} is unreadable ({exc}). {_redo_hint(run_dir, unit)}") from exc


def _redo_hint(run_dir: RunDir, unit: int) -> str:
    return f"Delete {run_dir.done_record(unit)} and {run_dir.part(unit)} and run again to redo the unit."


def _checked_part(run_dir: RunDir, unit: Any, record: dict[str, Any]) -> pa.Table:
    table = _read_part(run_dir, unit.unit, pq.read_table)
    expected = list(range(unit.first_row, unit.first_row + unit.rows))
    if table.column(ROW).to_pylist() != expected or record.get("rows") != unit.rows:
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
