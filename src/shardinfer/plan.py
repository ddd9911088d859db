"""Work units: contiguous row ranges balanced by estimated token cost, deterministic.

Cost of a row = estimated prompt tokens (capped at the prompt limit) + max_tokens. Prompt tokens are
estimated from characters with a characters-per-token ratio measured on a sample of the corpus with
the model's tokenizer, so planning 10^8 rows never tokenizes them all and never loads a model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shardinfer import corpus
from shardinfer.config import Config
from shardinfer.model_info import load_tokenizer, resolve_max_model_len
from shardinfer.prompts import template_fields

DEFAULT_UNITS_PER_WORKER = 8
_SAMPLE_ROWS = 1000
_SAMPLE_CHARS = 2_000_000
_FALLBACK_CHARS_PER_TOKEN = 4.0


@dataclass
class Unit:
    unit: int
    first_row: int  # global index of the unit's first row
    rows: int
    cost: int
    segments: list[tuple[int, int, int]]  # (file index, start row, end row) within each file


@dataclass
class Plan:
    files: list[dict[str, Any]]
    total_rows: int
    units: list[Unit]
    max_model_len: int
    prompt_limit: int
    chars_per_token: float
    estimate: str
    duplicates: dict[int, int] = field(default_factory=dict)  # global row -> first row with that id
    histogram: list[tuple[str, int]] = field(default_factory=list)
    over_limit: int = 0
    over_limit_ids: list[str] = field(default_factory=list)
    problem_rows: int = 0
    replaced_utf8: int = 0  # rows whose invalid UTF-8 bytes were replaced with U+FFFD

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["duplicates"] = [[k, v] for k, v in sorted(self.duplicates.items())]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        data = dict(data)
        data["units"] = [Unit(**{**u, "segments": [tuple(s) for s in u["segments"]]}) for u in data["units"]]
        data["duplicates"] = {int(k): int(v) for k, v in data["duplicates"]}
        data["histogram"] = [tuple(h) for h in data["histogram"]]
        return cls(**data)


def cut_units(costs: Sequence[int], target: int, max_rows: int) -> list[tuple[int, int]]:
    """Split rows 0..n into contiguous [start, end) ranges of about ``target`` cost each.

    A range closes before the row that would take it past the target (a range always holds at
    least one row), or when it reaches ``max_rows``. Every row lands in exactly one range.
    """
    ranges: list[tuple[int, int]] = []
    start, acc = 0, 0
    for i, cost in enumerate(costs):
        if i > start and (acc + cost > target or i - start >= max_rows):
            ranges.append((start, i))
            start, acc = i, 0
        acc += cost
    if start < len(costs):
        ranges.append((start, len(costs)))
    return ranges


def segments_for(first: int, end: int, file_offsets: Sequence[int]) -> list[tuple[int, int, int]]:
    """Map global rows [first, end) onto (file index, start, end) pieces."""
    pieces = []
    for f in range(len(file_offsets) - 1):
        lo, hi = max(first, file_offsets[f]), min(end, file_offsets[f + 1])
        if lo < hi:
            pieces.append((f, lo - file_offsets[f], hi - file_offsets[f]))
    return pieces


def make_plan(cfg: Config, workers: int) -> Plan:
    """Read the corpus once and cut it into units for ``workers`` workers."""
    files = corpus.resolve_files(cfg.input)
    fields = template_fields(cfg.prompt.user)
    corpus.check_columns(files, cfg.input, fields)
    max_model_len = resolve_max_model_len(cfg.model)
    limit = max_model_len - cfg.sampling.max_tokens
    scan = _scan(files, cfg, fields)
    cpt, estimate = _chars_per_token(cfg, scan.sample)
    prompt_tokens = [math.ceil(n / cpt) for n in scan.chars]
    # Over-long rows are truncated (or fail), so they cost at most the limit.
    costs = [min(t, limit) + cfg.sampling.max_tokens if t else 1 for t in prompt_tokens]
    target = cfg.run.unit_tokens or max(1, math.ceil(sum(costs) / (workers * DEFAULT_UNITS_PER_WORKER)))
    offsets = [0]
    for n in scan.rows_per_file:
        offsets.append(offsets[-1] + n)
    units = [
        Unit(unit=i, first_row=a, rows=b - a, cost=sum(costs[a:b]), segments=segments_for(a, b, offsets))
        for i, (a, b) in enumerate(cut_units(costs, target, cfg.run.max_unit_rows))
    ]
    over = [i for i, t in enumerate(prompt_tokens) if t > limit]
    return Plan(
        files=[_file_info(f, name, n) for f, name, n in zip(files, scan.names, scan.rows_per_file)],
        total_rows=len(costs), units=units, max_model_len=max_model_len, prompt_limit=limit,
        chars_per_token=round(cpt, 4), estimate=estimate, duplicates=scan.duplicates,
        histogram=token_histogram([t for t in prompt_tokens if t]), over_limit=len(over),
        over_limit_ids=[scan.ids[i] for i in over[:20]], problem_rows=scan.problem_rows,
        replaced_utf8=scan.replaced_utf8,
    )


@dataclass
class _Scan:
    names: list[str]
    rows_per_file: list[int] = field(default_factory=list)
    chars: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    duplicates: dict[int, int] = field(default_factory=dict)
    sample: list[str] = field(default_factory=list)
    problem_rows: int = 0
    replaced_utf8: int = 0
    sample_chars: int = 0


def _scan(files: list[Path], cfg: Config, fields: list[str]) -> _Scan:
    scan = _Scan(names=corpus.source_names(files))
    first_seen: dict[str, int] = {}
    extra = corpus.extra_columns(cfg.input, fields)
    for path, name in zip(files, scan.names):
        rows = corpus.read_rows(path, name, cfg.input, extra)
        scan.rows_per_file.append(len(rows))
        scan.replaced_utf8 += rows.replaced_utf8
        for text, row_id, problem in zip(rows.texts, rows.ids, rows.problems):
            _scan_row(scan, first_seen, text, row_id, problem, cfg.input.text_column)
    return scan


def _scan_row(scan: _Scan, first_seen: dict[str, int], text: Any, row_id: str,
              problem: str | None, column: str) -> None:
    index = len(scan.chars)
    bad = problem or corpus.text_problem(text, column)
    scan.problem_rows += bool(bad)
    scan.chars.append(0 if bad else len(text))
    scan.ids.append(row_id)
    if row_id in first_seen:
        scan.duplicates[index] = first_seen[row_id]
    else:
        first_seen[row_id] = index
    if not bad and len(scan.sample) < _SAMPLE_ROWS and scan.sample_chars < _SAMPLE_CHARS:
        scan.sample.append(text)
        scan.sample_chars += len(text)


def _chars_per_token(cfg: Config, sample: list[str]) -> tuple[float, str]:
    tokenizer = load_tokenizer(cfg.model, required=False) if sample else None
    if tokenizer is None:
        return _FALLBACK_CHARS_PER_TOKEN, "characters / 4 (no tokenizer available)"
    tokens = sum(len(ids) for ids in tokenizer(sample, add_special_tokens=False)["input_ids"])
    chars = sum(map(len, sample))
    return max(chars / max(tokens, 1), 0.5), f"tokenizer on a sample of {len(sample)} rows"


def token_histogram(tokens: list[int]) -> list[tuple[str, int]]:
    """Counts of rows per power-of-two bucket of prompt tokens."""
    if not tokens:
        return []
    top = max(tokens)
    buckets, lo = [], 0
    hi = 64
    while lo <= top:
        buckets.append((f"{lo}-{hi - 1}", sum(1 for t in tokens if lo <= t < hi)))
        lo, hi = hi, hi * 2
    return buckets


def _file_info(path: Path, name: str, rows: int) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path.resolve()), "source": name, "rows": rows, "bytes": stat.st_size,
            "mtime": stat.st_mtime}


def describe(plan: Plan, cfg: Config) -> str:
    """Human-readable plan summary for ``shardinfer plan``."""
    lines = [f"corpus: {len(plan.files)} file(s), {plan.total_rows} rows"]
    for f in plan.files[:10]:
        lines.append(f"  {f['source']}: {f['rows']} rows, {f['bytes']} bytes")
    lines.append(f"token estimate: {plan.estimate}, {plan.chars_per_token} characters/token")
    lines.append(f"prompt limit: {plan.prompt_limit} tokens (max_model_len {plan.max_model_len} - "
                 f"max_tokens {cfg.sampling.max_tokens})")
    lines += _unit_lines(plan)
    lines.append("estimated prompt tokens per row:")
    width = max((c for _, c in plan.histogram), default=1)
    for label, count in plan.histogram:
        lines.append(f"  {label:>13} {count:8d} {'#' * math.ceil(40 * count / width) if count else ''}")
    lines.append(f"rows over the limit (estimated): {plan.over_limit} -> prompt.too_long={cfg.prompt.too_long}")
    if plan.over_limit_ids:
        lines.append("  e.g. " + ", ".join(plan.over_limit_ids[:10]))
    lines.append(f"rows that will fail on input (empty, not text, unreadable): {plan.problem_rows}")
    lines.append(f"duplicate ids (later rows fail): {len(plan.duplicates)}")
    lines.append(f"rows with invalid UTF-8 replaced by U+FFFD: {plan.replaced_utf8}")
    return os.linesep.join(lines)


def _unit_lines(plan: Plan) -> list[str]:
    costs = [u.cost for u in plan.units]
    lines = [f"units: {len(plan.units)}, estimated tokens per unit min {min(costs, default=0)} "
             f"/ mean {sum(costs) // max(len(costs), 1)} / max {max(costs, default=0)}"]
    shown = plan.units if len(plan.units) <= 12 else plan.units[:6] + plan.units[-6:]
    for u in shown:
        lines.append(f"  unit {u.unit:6d}: rows {u.first_row}-{u.first_row + u.rows - 1} ({u.rows}), "
                     f"~{u.cost} tokens")
        if len(plan.units) > 12 and u.unit == plan.units[5].unit:
            lines.append("  ...")
    return lines
