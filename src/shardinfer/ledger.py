"""Claims and commits of work units on the shared filesystem.

A unit is claimed by creating its claim file exclusively (O_CREAT | O_EXCL), so two workers never
both own it. It is finished only when its part has been written under a temporary name, flushed,
renamed into place, and its done record written after it; readers trust only units with a done
record whose row count matches the part.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shardinfer.rundir import RunDir, read_json, write_json_atomic


class Ledger:
    def __init__(self, run_dir: RunDir, worker: str = ""):
        self.run_dir = run_dir
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"

    def is_done(self, unit: int) -> bool:
        return self.run_dir.done_record(unit).is_file()

    def claim(self, unit: int) -> bool:
        """True if this worker now owns the unit; False if it is taken or done."""
        if self.is_done(unit):
            return False
        try:
            fd = os.open(self.run_dir.claim(unit), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump({"worker": self.worker, "claimed_at": time.time()}, fh)
        return True

    def commit(self, unit: int, table: pa.Table, record: dict[str, Any]) -> None:
        """Write the unit's part atomically, then its done record."""
        part = self.run_dir.part(unit)
        tmp = part.with_name(f".{part.name}.tmp-{os.getpid()}")
        with tmp.open("wb") as fh:
            pq.write_table(table, fh, compression="zstd")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, part)
        write_json_atomic(self.run_dir.done_record(unit),
                          {**record, "unit": unit, "rows": table.num_rows, "worker": self.worker,
                           "committed_at": time.time()})

    def done_units(self) -> dict[int, dict[str, Any]]:
        records = {}
        for path in self.run_dir.done.glob("unit-*.json"):
            record = read_json(path)
            records[int(record["unit"])] = record
        return records

    def release_unfinished_claims(self) -> list[int]:
        """Drop claims of units that have no done record (their workers are gone); returns them."""
        released = []
        for path in self.run_dir.claims.glob("unit-*.json"):
            unit = int(path.stem.split("-")[1])
            if not self.is_done(unit):
                path.unlink(missing_ok=True)
                released.append(unit)
        for tmp in self.run_dir.parts.glob(".unit-*.tmp-*"):
            tmp.unlink(missing_ok=True)
        return sorted(released)


def read_part(path: Path) -> pa.Table:
    return pq.read_table(path)
