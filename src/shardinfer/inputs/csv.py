"""CSV files (also compressed): a header line, then a record a row.

Records are parsed by Python's csv module one by one, strictly: a record that breaks the rules
fails alone (``bad_csv``), and when a quote left open swallowed the lines after it, those lines are
read again as rows of their own. Fields that are not valid UTF-8 are replaced or fail their row, as
input.invalid_utf8 says.
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa

from shardinfer.inputs import storage
from shardinfer.inputs.compressed import open_at
from shardinfer.inputs.files import Columns, InputFile
from shardinfer.inputs.lines import BLOCK_BYTES, LineReader
from shardinfer.inputs.reader import BATCH_ROWS
from shardinfer.inputs.rows import ReadStats, has_surrogates, normalize, records_table
from shardinfer.results import LINE, OFFSET

_REPLAY_BYTES = BLOCK_BYTES  # a broken record this long is read again from memory, a longer one from the file


class CsvReader(LineReader):
    """CSV with a header line; blank lines are no records."""

    def scan(self, f: InputFile, cols: Columns, invalid_utf8: str, stats: ReadStats,
             gz_index: Path | None = None) -> Iterator[pa.Table]:
        with open_at(f, 0, gz_index) as fh:
            tracked = _TrackedLines(fh, reopen=lambda at: open_at(f, at, gz_index))
            try:
                header = _header(tracked)
                first_row = 0
                while True:
                    table = _records(tracked, header, f, cols, invalid_utf8, stats, first_row, BATCH_ROWS)
                    if table.num_rows == 0:
                        stats.bytes_read = tracked.offset
                        return
                    first_row += table.num_rows
                    yield table
            finally:
                tracked.fh.close()  # a file opened again to read lines a second time

    def block(self, data: bytes, offset: int, line: int, f: InputFile, cols: Columns, invalid_utf8: str,
              stats: ReadStats, first_row: int, gz_index: Path | None = None) -> pa.Table:
        """The records of ``data``, named by the header line of the file."""
        tracked = _TrackedLines(io.BytesIO(data), offset=offset, line=line)
        return _records(tracked, _header_of(f, gz_index), f, cols, invalid_utf8, stats, first_row, None)

    def columns(self, path: str) -> set[str]:
        """The names in the header line."""
        with storage.open_decompressed(path) as fh:
            return set(_header(fh))


class _TrackedLines:
    """Decoded lines of a binary file, with the byte offset and line number of the next line.

    The lines of the record being read (since :meth:`mark`) are kept, up to _REPLAY_BYTES, so
    that a record found broken can be read again from its second line (:meth:`reread_after_first`);
    a longer one is read again from the file: ``reopen(offset)`` gives its bytes from ``offset``
    (without it, ``fh`` seeks, its position 0 being the byte at ``offset``)."""

    def __init__(self, fh: IO[bytes], offset: int = 0, line: int = 1,
                 reopen: Callable[[int], IO[bytes]] | None = None):
        self.fh = fh
        self.offset = offset
        self.line = line
        self._base = offset
        self._reopen = reopen
        self._again: list[bytes] = []  # lines to read again, the next one last
        self._record: list[bytes] = []
        self._record_bytes = 0
        self._second: int | None = None  # offset of the record's second line

    def __iter__(self) -> _TrackedLines:
        return self

    def __next__(self) -> str:
        raw = self._again.pop() if self._again else self.fh.readline()
        if not raw:
            raise StopIteration
        if self.offset == 0:
            raw_text = raw.removeprefix(b"\xef\xbb\xbf")
            self.offset += len(raw) - len(raw_text)
            raw = raw_text
        self.offset += len(raw)
        self.line += 1
        if self._second is None:
            self._second = self.offset
        self._record_bytes += len(raw)
        if self._record_bytes <= _REPLAY_BYTES:
            self._record.append(raw)
        # surrogateescape keeps invalid bytes, which each field then replaces or fails on
        return raw.decode("utf-8", errors="surrogateescape")

    def mark(self) -> None:
        """A record starts at the next line."""
        self._record.clear()
        self._record_bytes = 0
        self._second = None

    def reread_after_first(self, line: int) -> None:
        """Go back to the second line of the record begun (at line ``line``) since :meth:`mark`."""
        if self._second is None:
            return
        if self._record_bytes <= _REPLAY_BYTES:
            self._again.extend(reversed(self._record[1:]))
        elif self._reopen is not None:
            self.fh.close()
            self.fh = self._reopen(self._second)
            self._again.clear()
        else:
            self.fh.seek(self._second - self._base)
            self._again.clear()
        self.offset, self.line = self._second, line + 1
        self.mark()


# ---- header and records -----------------------------------------------------------------------


def _header(fh: Any) -> list[str]:
    """The names in the header line: the next tracked line (a scan), or the first line of a binary file."""
    if isinstance(fh, _TrackedLines):
        return next(csv.reader(_one_line(fh)), [])
    first = fh.readline().removeprefix(b"\xef\xbb\xbf").decode("utf-8", "replace")
    return next(csv.reader([first]), [])


def _one_line(tracked: _TrackedLines) -> Iterator[str]:
    try:
        yield next(tracked)
    except StopIteration:
        return


def _header_of(f: InputFile, gz_index: Path | None) -> list[str]:
    """The header of the file, for a range read that starts past it."""
    with open_at(f, 0, gz_index) as fh:
        return _header(fh)


def _records(tracked: _TrackedLines, header: list[str], f: InputFile, cols: Columns, invalid_utf8: str,
             stats: ReadStats, first_row: int, limit: int | None) -> pa.Table:
    """Up to ``limit`` CSV records from the tracked lines, with their positions."""
    csv.field_size_limit(sys.maxsize)  # documents can be far longer than the 128 KiB default
    # strict: a quote inside a quoted field must be doubled, and a quoted field must close before the
    # end of the data. A record that breaks this over several lines (a quote left open swallows the
    # lines after it) fails on its first line alone, and the lines after it are read again as rows.
    # The plan and a worker reading a unit's bytes cut rows alike: a record is judged on the bytes
    # from its start, and a unit ends where the plan saw the next row start.
    reader = csv.reader(tracked, strict=True)
    records: list[dict[str, Any]] = []
    problems: list[str | None] = []
    offsets: list[int] = []
    lines: list[int] = []
    while limit is None or len(records) < limit:
        start, line = tracked.offset, tracked.line
        tracked.mark()
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            records.append({})
            if tracked.line - line > 1 or "end of data" in str(exc):
                problems.append(f"bad_csv: line {line}: a quoted field that starts on this line is not "
                                f"closed properly ({exc}); the lines after it are read as rows of their own")
                tracked.reread_after_first(line)
            else:
                problems.append(f"bad_csv: line {line}: {exc}")
        else:
            if not fields:
                continue  # a blank line is not a record
            record, problem = _record(fields, header, tracked.line - 1, invalid_utf8, stats)
            records.append(record)
            problems.append(problem)
        offsets.append(start)
        lines.append(line)
    positions = {OFFSET: pa.array(offsets, pa.int64()), LINE: pa.array(lines, pa.int64())}
    return normalize(records_table(records, cols), f, cols, first_row, pa.array(problems, pa.string()), positions)


def _record(fields: list[str], header: list[str], line: int, invalid_utf8: str,
            stats: ReadStats) -> tuple[dict[str, Any], str | None]:
    """One record as a row named by the header, and why it fails (too many fields, invalid UTF-8)."""
    problem = None
    if len(fields) > len(header):  # fewer fields: the missing ones are null, as in any CSV reader
        problem = f"bad_csv: line {line} has {len(fields)} fields, the header has {len(header)}"
    record = dict(zip(header, fields))
    bad = [k for k, v in record.items() if has_surrogates(v)]
    if bad and invalid_utf8 == "fail":
        problem = problem or f"invalid_utf8: line {line}, column {bad[0]!r}"
        for k in bad:  # the row fails; its undecodable values are not kept
            record[k] = ""
    elif bad:
        stats.replaced_utf8 += 1
        for k in bad:
            record[k] = record[k].encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return record, problem
