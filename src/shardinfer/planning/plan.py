"""Work units: contiguous row ranges balanced by estimated token cost, deterministic.

Cost of a row = estimated prompt tokens (capped at the prompt limit) + max_tokens. Prompt tokens are
estimated from characters with a characters-per-token ratio measured on a sample of the corpus with
the model's tokenizer, so planning 10^8 rows never tokenizes them all and never loads a model.

The corpus is streamed in Arrow record batches, files in parallel: per row the plan keeps only its
character count (and, for text formats, where the row starts in the file), never the text. Units
are cut with cumulative sums and searches, duplicate ids are found with Arrow hashing, and each
unit records where it starts in its files (byte offsets for JSONL and CSV, row group and offset for
Parquet) so a worker reads only its own rows.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shardinfer.config import Config
from shardinfer.errors import ConfigError
from shardinfer.inputs import compressed, reading, storage
from shardinfer.inputs import digest as input_digest
from shardinfer.models.info import resolve_max_model_len, token_counter
from shardinfer.planning.records import Plan, Segment, Unit
from shardinfer.requests.prompts import request_columns

DEFAULT_UNITS_PER_WORKER = 8
_SAMPLE_ROWS = 1000
_SAMPLE_CHARS = 2_000_000
_SAMPLE_TEXT_CHARS = 20_000  # characters of each sampled text given to the tokenizer
_FALLBACK_CHARS_PER_TOKEN = 4.0
_SCAN_THREADS = 4
# A unit this many rows into a remote Parquet row group costs its worker a fetch and decode of them.
_ROW_GROUP_WARN_ROWS = 131_072
_EXAMPLES = 20  # ids shown of rows over the length limit


def cut_units(costs: Sequence[int] | np.ndarray, target: int, max_rows: int) -> list[tuple[int, int]]:
    """Split rows 0..n into contiguous [start, end) ranges of about ``target`` cost each.

    A range closes before the row that would take it past the target (a range always holds at
    least one row), or when it reaches ``max_rows``. Every row lands in exactly one range. One
    search per range on the cumulative costs, not a step per row.
    """
    cumulative = np.concatenate([[0], np.cumsum(np.asarray(costs, dtype=np.int64))])
    n = len(cumulative) - 1
    ranges: list[tuple[int, int]] = []
    start = 0
    while start < n:
        fits = int(np.searchsorted(cumulative, cumulative[start] + target, side="right")) - 1
        end = min(max(fits, start + 1), start + max_rows, n)
        ranges.append((start, end))
        start = end
    return ranges


def segments_for(first: int, end: int, file_offsets: Sequence[int]) -> list[tuple[int, int, int]]:
    """Map global rows [first, end) onto (file index, start, end) pieces."""
    pieces = []
    for f in range(len(file_offsets) - 1):
        lo, hi = max(first, file_offsets[f]), min(end, file_offsets[f + 1])
        if lo < hi:
            pieces.append((f, lo - file_offsets[f], hi - file_offsets[f]))
    return pieces


@dataclass
class FileScan:
    """What the plan keeps of one file: per row its characters (0 for rows that will fail) and,
    for text formats, where it starts; plus ids (when there is an id column) and a text sample."""

    rows: int = 0
    chars: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    offsets: np.ndarray | None = None
    lines: np.ndarray | None = None
    size: int = 0  # bytes read (uncompressed): where the last row ends
    id_hashes: tuple[np.ndarray, np.ndarray] | None = None  # two 64-bit hashes of each row's id
    longest: list[tuple[int, int, str]] = field(default_factory=list)  # (chars, row, id) of the longest rows
    sample: list[str] = field(default_factory=list)
    problem_rows: int = 0
    replaced_utf8: int = 0
    row_groups: list[int] | None = None
    crcs: np.ndarray | None = None  # checksum of each chunk of a local JSONL/CSV file (input_digest)
    row_group_digests: list[str] | None = None  # of each row group's metadata (local Parquet)


def scan_file(f: reading.InputFile, cfg: Config, gz_index: Path | None = None, *, digest: bool = False) -> FileScan:
    """Stream one file batch by batch; memory stays that of a batch plus a few numbers per row. A
    file that cannot be read (truncated, not of its format) is a config error naming it. With
    ``digest``, what workers check the file against is computed too (a local file's checksums)."""
    try:
        out = _scan_file(f, cfg, gz_index, digest and f.local)
        if digest and f.local:
            _add_digests(out, f, gz_index)
        return out
    except (pa.ArrowException, OSError, EOFError, zlib.error) as exc:
        raise ConfigError(
            f"input.path: {f.path} cannot be read as {f.format}{' (gzip)' if f.gzip else ''}: {str(exc).rstrip('.')}. Re-export "
            f"the file, or leave it out of input.path (a narrower glob or directory)."
        ) from exc


def _add_digests(out: FileScan, f: reading.InputFile, gz_index: Path | None) -> None:
    """Chunk checksums of a CSV file (a JSONL scan computed them as it read), row group digests of
    a Parquet file."""
    if f.format == "csv":
        out.crcs = input_digest.digest_stream(compressed.open_at(f, 0, gz_index))
    elif f.format == "parquet":
        metadata = reading.parquet_metadata(f.path)
        out.row_group_digests = [input_digest.row_groups_digest(metadata, [g]) for g in range(metadata.num_row_groups)]


def _scan_file(f: reading.InputFile, cfg: Config, gz_index: Path | None = None, digest: bool = False) -> FileScan:
    cols = reading.columns_for(cfg.input, [], with_extra=False)
    stats = reading.ReadStats(digest=input_digest.ChunkDigest() if digest and f.format in ("jsonl", "openai-batch")
                             else None)
    chars, offsets, lines, hashes = [], [], [], []
    out = FileScan()
    for batch in reading.scan(f, cols, cfg.input.invalid_utf8, stats, gz_index):
        ok = batch.column(reading.PROBLEM).is_null()
        chars.append(pc.if_else(ok, batch.column(reading.CHARS), 0).to_numpy().astype(np.int32, copy=False))
        out.problem_rows += batch.num_rows - (pc.sum(ok.cast(pa.int64())).as_py() or 0)  # None: no rows
        if reading.OFFSET in batch.column_names:
            offsets.append(batch.column(reading.OFFSET).to_numpy())
            lines.append(batch.column(reading.LINE).to_numpy())
        if cols.id:
            hashes.append(id_hashes(batch.column(reading.ID)))
        _keep_longest(out, chars[-1], batch, f.source)
        _add_sample(out, batch, ok)
        out.rows += batch.num_rows
    out.chars = np.concatenate(chars) if chars else np.zeros(0, np.int32)
    if f.format == "parquet":
        out.row_groups = reading.parquet_row_groups(f.path)
    elif f.format != "arrow":
        out.offsets = np.concatenate(offsets) if offsets else np.zeros(0, np.int64)
        out.lines = np.concatenate(lines) if lines else np.zeros(0, np.int64)
        out.size = stats.bytes_read  # the whole (uncompressed) file went through the scan
    if cols.id:
        out.id_hashes = (np.concatenate([h for h, _ in hashes] or [np.zeros(0, np.uint64)]),
                         np.concatenate([h for _, h in hashes] or [np.zeros(0, np.uint64)]))
    out.replaced_utf8 = stats.replaced_utf8
    if stats.digest is not None:
        out.crcs = stats.digest.finish()
    return out


def _keep_longest(out: FileScan, chars: np.ndarray, batch: pa.Table, source: str) -> None:
    """The longest rows so far (their ids name examples of rows over the length limit)."""
    if not len(chars):
        return
    top = np.argpartition(chars, -min(_EXAMPLES, len(chars)))[-_EXAMPLES:]
    ids = batch.column(reading.ID).take(pa.array(top)).to_pylist()
    found = [(int(chars[i]), out.rows + int(i), ident or f"{source}:{out.rows + int(i)}") for i, ident in zip(top, ids)]
    out.longest = sorted(out.longest + found, key=lambda t: (-t[0], t[1]))[:_EXAMPLES]


def _add_sample(out: FileScan, batch: pa.Table, ok: pa.ChunkedArray) -> None:
    room = _SAMPLE_ROWS - len(out.sample)
    chars = _SAMPLE_CHARS - sum(map(len, out.sample))
    if room <= 0 or chars <= 0:
        return
    # The beginning of each text is enough to measure characters per token; a whole document of
    # tens of MB would cost the tokenizer gigabytes.
    beginnings = pc.utf8_slice_codeunits(batch.column(reading.TEXT), 0, _SAMPLE_TEXT_CHARS)
    for text in beginnings.filter(ok).slice(0, room).to_pylist():
        if chars <= 0:
            break
        out.sample.append(text[:chars])
        chars -= len(out.sample[-1])


def make_plan(cfg: Config, workers: int, *, index_dir: Path | None = None) -> Plan:
    """Stream the corpus once and cut it into units for ``workers`` workers. Gzipped files are
    indexed for seeking (saved in ``index_dir``, the run directory's) when indexed_gzip is there."""
    files = reading.input_files(cfg.input)
    fields = request_columns(cfg)
    reading.check_columns([f.path for f in files], cfg.input, fields)
    max_model_len = resolve_max_model_len(cfg.model)
    output = output_budget(cfg)
    limit = max_model_len - output
    indexes = _gzip_indexes(files, index_dir)
    with ThreadPoolExecutor(max_workers=max(1, min(_SCAN_THREADS, os.cpu_count() or 1, len(files)))) as pool:
        scans = list(pool.map(lambda fi: scan_file(fi[0], cfg, fi[1], digest=index_dir is not None),
                              zip(files, indexes)))
    sample = _first_sample(scans)
    cpt, estimate = _chars_per_token(cfg, sample)
    chars = np.concatenate([s.chars for s in scans]) if scans else np.zeros(0, np.int32)
    for s in scans:
        s.chars = np.zeros(0, np.int32)  # one copy of the per-row numbers at a time
    tokens = np.ceil(chars / cpt).astype(np.int32)
    # Over-long rows are truncated (or fail), so they cost at most the limit; rows that fail cost 1.
    costs = np.where(chars > 0, np.minimum(tokens, limit) + output, 1).astype(np.int32)
    target = cfg.run.unit_tokens or max(1, math.ceil(int(costs.sum()) / (workers * DEFAULT_UNITS_PER_WORKER)))
    offsets = np.concatenate([[0], np.cumsum([s.rows for s in scans])]).astype(np.int64)
    cumulative = np.concatenate([[0], np.cumsum(costs)])
    units = [Unit(unit=i, first_row=a, rows=b - a, cost=int(cumulative[b] - cumulative[a]),
                  segments=[_segment(scans, f, lo, hi) for f, lo, hi in segments_for(a, b, offsets.tolist())])
             for i, (a, b) in enumerate(cut_units(costs, target, cfg.run.max_unit_rows))]
    over = np.flatnonzero(tokens > limit)
    running = chars > 0
    return Plan(
        files=[_file_info(i, f, s, idx, index_dir) for i, (f, s, idx) in enumerate(zip(files, scans, indexes))],
        total_rows=len(costs), units=units, max_model_len=max_model_len, prompt_limit=limit,
        chars_per_token=round(cpt, 4), estimate=estimate, duplicates=_duplicates(scans, files),
        histogram=token_histogram(tokens[chars > 0]), over_limit=len(over),
        over_limit_ids=_over_limit_examples(scans, limit * cpt),
        problem_rows=sum(s.problem_rows for s in scans), replaced_utf8=sum(s.replaced_utf8 for s in scans),
        notes=_notes(files, scans, indexes, units),
        prompt_tokens=int(np.minimum(tokens[running], limit).sum()),
        output_tokens=int(running.sum()) * output * cfg.sampling.n,
    )


def _gzip_indexes(files: list[reading.InputFile], index_dir: Path | None) -> list[Path | None]:
    """Build each gzipped file's seek index once, where the workers will find it."""
    if index_dir is None or not compressed.gzip_indexing():
        return [None] * len(files)
    return [compressed.index_gzip(f, index_dir / f"file-{i:05d}.gzidx") if f.gzip else None
            for i, f in enumerate(files)]


def _first_sample(scans: list[FileScan]) -> list[str]:
    sample: list[str] = []
    for s in scans:
        for text in s.sample:
            if len(sample) >= _SAMPLE_ROWS or sum(map(len, sample)) >= _SAMPLE_CHARS:
                return sample
            sample.append(text)
    return sample


def _segment(scans: list[FileScan], f: int, lo: int, hi: int) -> Segment:
    s = scans[f]
    if s.offsets is None and s.row_groups is None:  # Arrow files: rows are read by index
        return Segment(f, lo, hi)
    if s.row_groups is not None:
        starts = np.concatenate([[0], np.cumsum(s.row_groups)])
        group = int(np.searchsorted(starts, lo, side="right") - 1)
        return Segment(f, lo, hi, row_group=group, group_offset=int(lo - starts[group]))
    assert s.offsets is not None and s.lines is not None
    stop = int(s.offsets[hi]) if hi < s.rows else s.size
    return Segment(f, lo, hi, begin=int(s.offsets[lo]), stop=stop, line=int(s.lines[lo]))


def _duplicates(scans: list[FileScan], files: list[reading.InputFile]) -> dict[int, int]:
    """Rows whose id an earlier row already has -> that earlier row. Ids are compared by two
    64-bit hashes, sorted by the first; the few rows that share it are told apart by the second."""
    if not scans or scans[0].id_hashes is None:
        return {}  # '<file>:<row>' ids are unique by construction
    first = np.concatenate([s.id_hashes[0] for s in scans if s.id_hashes is not None])
    order = np.argsort(first, kind="stable")
    ordered = first[order]
    shared = np.flatnonzero(ordered[1:] == ordered[:-1])
    if not len(shared):
        return {}
    second = np.concatenate([s.id_hashes[1] for s in scans if s.id_hashes is not None])
    rows = np.sort(order[np.unique(np.concatenate([shared, shared + 1]))])
    earliest: dict[tuple[int, int], int] = {}
    out: dict[int, int] = {}
    for row, key in zip(rows.tolist(), zip(first[rows].tolist(), second[rows].tolist())):
        if key in earliest:
            out[row] = earliest[key]
        else:
            earliest[key] = row
    return out


_MULTIPLIERS = (np.uint64(0x100000001B3), np.uint64(0x9E3779B97F4A7C15))


def id_hashes(ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Two independent 64-bit polynomial hashes of each string, computed on the Arrow buffers
    (no Python string per row). Equal ids have equal hashes; two different ids of a corpus share
    both with a probability of about 10^-24."""
    ids = (ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids).cast(pa.large_string())
    n = len(ids)
    offsets = np.frombuffer(ids.buffers()[1], dtype=np.int64)[ids.offset:ids.offset + n + 1]
    data = ids.buffers()[2]
    raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    filled = np.flatnonzero(lengths > 0)
    values = raw[offsets[0]:offsets[-1]].astype(np.uint64) + np.uint64(1)
    power_index = np.repeat(offsets[1:] - offsets[0], lengths) - 1 - np.arange(len(values))
    out = []
    with np.errstate(over="ignore"):
        for multiplier in _MULTIPLIERS:
            longest = int(lengths.max(initial=0))
            powers = np.cumprod(np.concatenate([[np.uint64(1)], np.full(max(longest - 1, 0), multiplier, np.uint64)]))
            h = np.zeros(n, np.uint64)
            if len(filled):
                h[filled] = np.add.reduceat(values * powers[power_index], (offsets[:-1] - offsets[0])[filled])
            h ^= lengths.astype(np.uint64) * np.uint64(0xFF51AFD7ED558CCD)
            h ^= h >> np.uint64(33)
            h *= np.uint64(0xC4CEB9FE1A85EC53)
            out.append(h ^ (h >> np.uint64(29)))
    return out[0], out[1]


def _over_limit_examples(scans: list[FileScan], limit_chars: float) -> list[str]:
    """Ids of the longest rows over the limit, longest first."""
    longest = sorted((t for s in scans for t in s.longest), key=lambda t: -t[0])
    return [ident for chars, _, ident in longest if chars > limit_chars][:_EXAMPLES]


def _chars_per_token(cfg: Config, sample: list[str]) -> tuple[float, str]:
    count = token_counter(cfg.model) if sample else None
    if count is None:
        return _FALLBACK_CHARS_PER_TOKEN, "characters / 4 (no tokenizer available)"
    tokens = sum(count(sample))
    chars = sum(map(len, sample))
    return max(chars / max(tokens, 1), 0.5), f"tokenizer on a sample of {len(sample)} rows"


def token_histogram(tokens: Sequence[int] | np.ndarray) -> list[tuple[str, int]]:
    """Counts of rows per power-of-two bucket of prompt tokens (0-63, 64-127, 128-255, ...)."""
    values = np.asarray(tokens, dtype=np.int64)
    if not len(values):
        return []
    buckets = np.where(values < 64, 0, np.floor(np.log2(np.maximum(values, 1))).astype(np.int64) - 5)
    counts = np.bincount(buckets)
    return [(f"{0 if b == 0 else 1 << (b + 5)}-{(1 << (b + 6)) - 1}", int(c)) for b, c in enumerate(counts)]


def _file_info(i: int, f: reading.InputFile, s: FileScan, gz_index: Path | None,
               index_dir: Path | None) -> dict[str, Any]:
    path = f.path if not f.local else str(Path(f.path).resolve())
    info = {"path": path, "source": f.source, "format": f.format, "gzip": f.gzip, "compression": f.compression,
            "rows": s.rows, **storage.stat(f.path)}
    if s.row_groups is not None:
        info["row_groups"] = len(s.row_groups)
    if gz_index is not None:
        info["gzip_index"] = gz_index.name
    if s.crcs is not None and index_dir is not None:
        info["chunk_crcs"] = input_digest.save(s.crcs, index_dir / f"file-{i:05d}.crc.npy")
    if s.row_group_digests is not None:
        info["row_group_digests"] = s.row_group_digests
    return info


def _notes(files: list[reading.InputFile], scans: list[FileScan], indexes: list[Path | None],
           units: list[Unit]) -> list[str]:
    """What reading the input will cost the workers, where the layout of a file makes it slow."""
    notes = []
    unindexed = [f.source for f, idx in zip(files, indexes) if f.gzip and idx is None]
    if unindexed:
        notes.append(f"{len(unindexed)} gzipped file(s) ({', '.join(unindexed[:3])}{', ...' if len(unindexed) > 3 else ''}) "
                     f"cannot be read from the middle: each worker decompresses from the start to reach its "
                     f"unit. Install indexed_gzip (pip install 'shardinfer[gzip]') to index them once when the "
                     f"run is planned, or split them into files of a few hundred MB.")
    # local files skip the pages before a unit (shardinfer.parquet_slice); remote ones decode them
    deep = max((seg.group_offset or 0 for u in units for seg in u.segments
                if storage.is_remote(files[seg.file].path)), default=0)
    if deep > _ROW_GROUP_WARN_ROWS:
        biggest = max(max(s.row_groups or [0]) for s in scans)
        notes.append(f"Parquet row groups of up to {biggest} rows in an object store: a unit starting deep in "
                     f"one makes its worker fetch and decode up to {deep} rows before it. Files written with "
                     f"row groups of at most {_ROW_GROUP_WARN_ROWS} rows are read faster "
                     f"(pyarrow.parquet.write_table(..., row_group_size={_ROW_GROUP_WARN_ROWS}).")
    return notes


def describe(plan: Plan, cfg: Config) -> str:
    """Human-readable plan summary for ``shardinfer plan``."""
    lines = [f"corpus: {len(plan.files)} file(s), {plan.total_rows} rows"]
    for f in plan.files[:10]:
        lines.append(f"  {f['source']}: {f['rows']} rows, {f['bytes']} bytes")
    lines.append(f"token estimate: {plan.estimate}, {plan.chars_per_token} characters/token")
    lines.append(f"prompt limit: {plan.prompt_limit} tokens (max_model_len {plan.max_model_len} - "
                 f"max_tokens {output_budget(cfg)})")
    lines.append(f"tokens (estimated): {plan.prompt_tokens:,} prompt + up to {plan.output_tokens:,} output "
                 f"(max_tokens x n for every row that runs)")
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
    lines += [f"note: {note}" for note in plan.notes]
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


def output_budget(cfg: Config) -> int:
    """Tokens a row may generate: ``sampling.max_tokens``; none for a pooling task."""
    return cfg.sampling.max_tokens if cfg.task == "generate" else 0
