"""Leases, commits and done records of work units on the shared filesystem.

- **Claim**: a unit is claimed by creating its claim file exclusively (O_CREAT | O_EXCL) with the
  claimer and an attempt number, so two workers never both own it.
- **Lease**: the owner touches the claim file every ``lease_timeout_s / 4`` (a heartbeat thread). A
  claim whose file is older than ``lease_timeout_s`` is stale: its worker is gone. Another worker
  takes it over by renaming it away (only one rename of a file can succeed) and claiming anew with
  the next attempt number.
- **Commit**: the part is written under a temporary name, flushed, renamed into place, then the done
  record naming the attempt is written. A worker that lost its lease discards its work instead.
  Readers trust only units with a done record whose row count matches the part.
- **Retry of failed rows**: ``resume --retry-failed`` sets a committed part with failed rows aside
  and un-commits its unit; the worker that claims it next redoes only those rows and merges them in.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shardinfer.rundir import RunDir, read_json, write_json_atomic

log = logging.getLogger(__name__)

DEFAULT_LEASE_TIMEOUT_S = 300.0


class Ledger:
    def __init__(self, run_dir: RunDir, worker: str = "", lease_timeout_s: float = DEFAULT_LEASE_TIMEOUT_S):
        self.run_dir = run_dir
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"
        self.lease_timeout_s = lease_timeout_s
        self.attempts: dict[int, int] = {}  # unit -> attempt this worker holds
        self._retrying: set[int] = set()  # claimed units whose earlier part was set aside

    def is_done(self, unit: int) -> bool:
        return self.run_dir.done_record(unit).is_file()

    def claim(self, unit: int) -> bool:
        """True if this worker now owns the unit (fresh, or taken over from a stale lease)."""
        if self.is_done(unit):
            return False
        attempt = 1
        path = self.run_dir.claim(unit)
        if path.exists():
            previous = self._take_over(path)
            if previous is None:
                return False
            attempt = previous + 1
        return self._create_claim(unit, attempt)

    def _create_claim(self, unit: int, attempt: int) -> bool:
        try:
            fd = os.open(self.run_dir.claim(unit), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump({"worker": self.worker, "attempt": attempt, "claimed_at": time.time()}, fh)
        self.attempts[unit] = attempt
        if attempt > 1:
            log.warning("took over unit %d (attempt %d): its lease was stale", unit, attempt)
        return True

    def _take_over(self, path: Path) -> int | None:
        """If the lease is stale, move it aside and return its attempt number; else None."""
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return 0
        if age <= self.lease_timeout_s:
            return None
        aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, aside)  # exactly one of several racing workers succeeds
        except FileNotFoundError:
            return None
        try:
            return int(read_json(aside).get("attempt", 1))
        except (OSError, ValueError):
            return 1

    def owns(self, unit: int) -> bool:
        try:
            claim = read_json(self.run_dir.claim(unit))
        except (OSError, ValueError):
            return False
        return claim.get("worker") == self.worker and claim.get("attempt") == self.attempts.get(unit)

    def heartbeat(self, unit: int) -> bool:
        """Renew the lease; False when it is no longer ours."""
        if not self.owns(unit):
            return False
        try:
            os.utime(self.run_dir.claim(unit))
        except FileNotFoundError:
            return False
        return True

    def release(self, unit: int) -> None:
        """Give up an unfinished unit so another worker takes it at once."""
        if self.owns(unit):
            self.run_dir.claim(unit).unlink(missing_ok=True)
        self.attempts.pop(unit, None)

    def commit(self, unit: int, table: pa.Table, record: dict[str, Any]) -> bool:
        """Write the unit's part atomically, then its done record. False if the lease was lost."""
        if not self.owns(unit):
            log.warning("lost the lease on unit %d to another worker; discarding this attempt", unit)
            return False
        part = self.run_dir.part(unit)
        tmp = part.with_name(f".{part.name}.tmp-{os.getpid()}")
        with tmp.open("wb") as fh:
            pq.write_table(table, fh, compression="zstd")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, part)
        write_json_atomic(self.run_dir.done_record(unit),
                          {**record, "unit": unit, "rows": table.num_rows, "worker": self.worker,
                           "attempt": self.attempts.get(unit, 1), "committed_at": time.time()})
        if unit in self._retrying:
            self.run_dir.retry_source(unit).unlink(missing_ok=True)
            self._retrying.discard(unit)
        return True

    def set_aside_for_retry(self, unit: int) -> None:
        """Un-commit a unit, keeping its part aside: its failed rows are redone and merged in."""
        os.replace(self.run_dir.part(unit), self.run_dir.retry_source(unit))
        self.run_dir.done_record(unit).unlink(missing_ok=True)
        self.run_dir.claim(unit).unlink(missing_ok=True)

    def earlier_results(self, unit: int) -> pa.Table | None:
        """A claimed unit's part set aside for a retry of its failed rows, if any."""
        path = self.run_dir.retry_source(unit)
        if not path.is_file():
            return None
        self._retrying.add(unit)
        return pq.read_table(path)

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

    def verify_committed(self, expected_rows: dict[int, int]) -> list[int]:
        """Undo commits whose part is missing, unreadable or of the wrong size, so they are redone."""
        redo = []
        for unit, record in self.done_units().items():
            if not _part_ok(self.run_dir.part(unit), record.get("rows"), expected_rows.get(unit)):
                self.run_dir.done_record(unit).unlink(missing_ok=True)
                self.run_dir.part(unit).unlink(missing_ok=True)
                self.run_dir.claim(unit).unlink(missing_ok=True)
                redo.append(unit)
        if redo:
            log.warning("units %s had a missing or corrupt part; they will be redone", sorted(redo))
        return sorted(redo)


def _part_ok(path: Path, recorded: int | None, expected: int | None) -> bool:
    try:
        rows = pq.read_metadata(path).num_rows
    except (OSError, pa.ArrowInvalid):
        return False
    return rows == recorded == expected


class Heartbeat:
    """Renews the leases of the units being worked on, from a background thread."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self.units: set[int] = set()
        self._lost: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def hold(self, unit: int) -> None:
        with self._lock:
            self.units.add(unit)
            self._lost.discard(unit)

    def drop(self, unit: int) -> None:
        with self._lock:
            self.units.discard(unit)

    def _loop(self) -> None:
        interval = max(self.ledger.lease_timeout_s / 4, 0.05)
        while not self._stop.wait(interval):
            with self._lock:
                units = list(self.units)
            for unit in units:
                if not self.ledger.heartbeat(unit):
                    with self._lock:
                        self.units.discard(unit)
                        self._lost.add(unit)

    def take_lost(self) -> set[int]:
        """Units whose lease another worker took over since the last call: drop their work now."""
        with self._lock:
            lost, self._lost = self._lost, set()
        return lost

    def stop(self) -> None:
        self._stop.set()
