"""Leases, commits and done records of work units on the shared filesystem.

- **Claim**: a unit is claimed by creating its claim file exclusively (O_CREAT | O_EXCL) with the
  claimer and an attempt number, so two workers never both own it. Claim files stay after the
  commit, so a done unit cannot be claimed again.
- **Lease**: the owner touches the claim file every ``lease_timeout_s / 4`` (a heartbeat thread). A
  claim whose file is older than ``lease_timeout_s`` is stale: its worker is gone. It is taken over
  by renaming it away (only one rename of a file can succeed) and claiming anew with the next
  attempt number; the old owner finds out at its next heartbeat and drops its work.
- **Commit**: the part is written under a temporary name, flushed, renamed into place, then the done
  record (rows, counts, the part's schema) naming the attempt is written the same way. A worker that
  lost its lease discards its work instead. Readers trust only units with a done record whose row
  count matches the part. A commit costs six metadata operations (claim check, part create and
  rename, record create and rename, and the claim itself) and two fsyncs.
- **Released units**: a unit given back (a draining worker, a dead worker's stale lease, a local
  launcher's dead worker) gets a marker in ``coord/released/`` so idle workers, which watch that one
  directory, claim it at once.
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

from shardinfer.ledger.rundir import FS, RunDir, unit_of, write_json_atomic
from shardinfer.results import schema_record

log = logging.getLogger(__name__)

DEFAULT_LEASE_TIMEOUT_S = 300.0
COMPLETE = "complete"  # the marker in coord/released/ that says every unit is done
COMPLETE_MTIME = 1_000_000_000.0  # and coord/released/'s modification time then: one stat tells


class Ledger:
    def __init__(self, run_dir: RunDir, worker: str = "", lease_timeout_s: float = DEFAULT_LEASE_TIMEOUT_S):
        self.run_dir = run_dir
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"
        self.lease_timeout_s = lease_timeout_s
        self.attempts: dict[int, int] = {}  # unit -> attempt this worker holds
        self._retrying: set[int] = set()  # claimed units whose earlier part was set aside

    # ---- claims and leases --------------------------------------------------------------------

    def claim(self, unit: int, *, attempt: int = 1, take_over: bool = True) -> bool:
        """True if this worker now owns the unit. An existing claim is taken over only when it is
        stale and the unit is not done (``take_over``); a worker walking its units does not look."""
        if self._create_claim(unit, attempt):
            return True
        if not take_over:
            return False
        previous = self._take_over(unit)
        return previous is not None and self._create_claim(unit, previous + 1)

    def _create_claim(self, unit: int, attempt: int) -> bool:
        data = json.dumps({"worker": self.worker, "attempt": attempt, "claimed_at": time.time()}).encode()
        if not FS.create(self.run_dir.claim(unit), data):
            return False
        self.attempts[unit] = attempt
        if attempt > 1:
            log.warning("took over unit %d (attempt %d): its worker is gone or gave it back", unit, attempt)
        return True

    def _take_over(self, unit: int) -> int | None:
        """If the claim is stale and the unit not done, move the claim aside; its attempt number."""
        path = self.run_dir.claim(unit)
        mtime = FS.mtime(path)
        if mtime is None:
            return 0
        if time.time() - mtime <= self.lease_timeout_s or self.is_done(unit):
            return None
        return _move_aside(path)

    def is_done(self, unit: int) -> bool:
        return FS.mtime(self.run_dir.done_record(unit)) is not None

    def owns(self, unit: int) -> bool:
        data = FS.read(self.run_dir.claim(unit))
        if data is None:
            return False
        try:
            claim = json.loads(data)
        except ValueError:
            return False
        return bool(claim.get("worker") == self.worker and claim.get("attempt") == self.attempts.get(unit))

    def heartbeat(self, unit: int) -> bool:
        """Renew the lease; False when it is no longer ours."""
        return self.owns(unit) and FS.touch(self.run_dir.claim(unit))

    def release(self, unit: int) -> None:
        """Give up an unfinished unit so another worker takes it at once."""
        if self.owns(unit):
            FS.unlink(self.run_dir.claim(unit))
            self.announce([(unit, self.attempts.get(unit, 1))])
        self.attempts.pop(unit, None)

    # ---- commits --------------------------------------------------------------------------------

    def commit(self, unit: int, table: pa.Table, record: dict[str, Any]) -> bool:
        """Write the unit's part atomically, then its done record. False if the lease was lost."""
        if not self.owns(unit):
            log.warning("lost the lease on unit %d to another worker; discarding this attempt", unit)
            return False
        FS.write_atomic(self.run_dir.part(unit), lambda fh: pq.write_table(table, fh, compression="zstd"))
        write_json_atomic(self.run_dir.done_record(unit),
                          {**record, "unit": unit, "rows": table.num_rows, "worker": self.worker,
                           "attempt": self.attempts.get(unit, 1), "committed_at": time.time(),
                           "schema": schema_record(table)})
        if unit in self._retrying:
            FS.unlink(self.run_dir.retry_source(unit))
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

    # ---- the whole run ------------------------------------------------------------------------

    def done_set(self) -> set[int]:
        """Units with a done record (one listing per shard, no record opened)."""
        return {u for d in self.run_dir.shard_dirs(self.run_dir.done) for u in self.units_in(d)}

    def units_in(self, directory: Path) -> set[int]:
        """Units with a record (``unit-N.json``) in one directory: one listing."""
        return {u for name in FS.listdir(directory) if name.endswith(".json") and (u := unit_of(name)) is not None}

    def recorded_among(self, root: Path, units: set[int]) -> set[int]:
        """Units of ``units`` with a record under ``root`` (``done/``, ``claims/``): one listing per
        shard holding any of them."""
        shards = {self.run_dir.shard_of(root, u) for u in units}
        return {u for shard in shards for u in self.units_in(shard) if u in units}

    def done_units(self, *, repair: bool = True) -> dict[int, dict[str, Any]]:
        """Every done record (opens them all: for the reduce, status and the start of a launch). A
        damaged record (garbled, empty, not this unit's) does not count: with ``repair`` it is set
        aside, kept for a look, so its unit is redone."""
        records = {}
        for d in self.run_dir.shard_dirs(self.run_dir.done):
            for path in d.glob("unit-*.json"):
                record, damage = _read_done_record(path)
                if record is not None:
                    records[int(record["unit"])] = record
                elif repair and damage:
                    _set_aside_damaged(path, damage)
        return records

    def claims(self) -> dict[int, Path]:
        return {u: d / name for d in self.run_dir.shard_dirs(self.run_dir.claims) for name in FS.listdir(d)
                if name.endswith(".json") and (u := unit_of(name)) is not None}

    def release_unfinished_claims(self) -> list[int]:
        """At the start of a launch (no worker of an earlier one runs): drop the claims of units that
        have no done record, the given-back markers and the watcher lease; returns the units."""
        done = self.done_set()
        released = []
        for unit, path in self.claims().items():
            if unit not in done:
                FS.unlink(path)
                released.append(unit)
        for d in self.run_dir.shard_dirs(self.run_dir.parts):
            for tmp in d.glob(".unit-*.tmp-*"):
                tmp.unlink(missing_ok=True)
        self._clear_released()
        FS.unlink(self.run_dir.watcher)  # a watcher of an earlier launch is gone too
        return sorted(released)

    def expire_claims_of(self, worker: str) -> list[int]:
        """A worker is known dead (its launcher saw it exit): give its units back now, with their
        next attempt, instead of a lease timeout later; the idle workers see them at their next look."""
        done = self.done_set()
        given_back = []
        for unit, path in self.claims().items():
            data = FS.read(path) if unit not in done else None
            if data is None or _claim_field(data, "worker") != worker:
                continue
            attempt = _move_aside(path)  # None: a watcher took it over already
            if attempt is not None:
                given_back.append((unit, attempt))
        self.announce(given_back)
        return sorted(u for u, _ in given_back)

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

    # ---- released units and completion: what idle workers watch ------------------------------

    def announce(self, units: list[tuple[int, int]]) -> None:
        """Mark given-back units (with the attempt they were at) for idle workers to claim."""
        if units:
            self.run_dir.released.mkdir(parents=True, exist_ok=True)
        for unit, attempt in units:
            FS.create(self.run_dir.released / f"unit-{unit:06d}.a{attempt}", b"")

    def released_units(self) -> list[tuple[int, int]] | None:
        """Units given back, with their attempt; None once the run is complete."""
        names = FS.listdir(self.run_dir.released)
        if COMPLETE in names:
            return None
        out = []
        for name in names:
            unit, _, attempt = name.partition(".a")
            number = unit_of(unit)
            if number is not None and attempt.isdigit():
                out.append((number, int(attempt)))
        return out

    def claim_released(self, unit: int, attempt: int) -> bool:
        """Claim a given-back unit (the next attempt); its marker goes once it is claimed."""
        if not self._create_claim(unit, attempt + 1):
            return False
        FS.unlink(self.run_dir.released / f"unit-{unit:06d}.a{attempt}")
        return True

    def tidy_released(self, pending: set[int]) -> None:
        """The watcher drops markers of units that are done or held again."""
        for name in FS.listdir(self.run_dir.released):
            unit, _, attempt = name.partition(".a")
            number = unit_of(unit)
            if number is None or not attempt.isdigit():
                continue
            if number not in pending or self._held(number):
                FS.unlink(self.run_dir.released / name)

    def _held(self, unit: int) -> bool:
        mtime = FS.mtime(self.run_dir.claim(unit))
        return mtime is not None and time.time() - mtime <= self.lease_timeout_s

    def released_changed_at(self) -> float | None:
        """When a unit was last given back or claimed from the markers (one stat)."""
        return FS.mtime(self.run_dir.released)

    def mark_complete(self) -> None:
        """The marker, then a modification time no change gives: idle workers see it in their stat."""
        self.run_dir.released.mkdir(parents=True, exist_ok=True)
        FS.create(self.run_dir.released / COMPLETE, b"")
        try:
            FS.touch(self.run_dir.released, mtime=COMPLETE_MTIME)
        except OSError as exc:  # a filesystem that refuses it: idle workers list the marker instead
            log.info("could not set %s's modification time (%s); idle workers will list it", self.run_dir.released, exc)

    def _clear_released(self) -> None:
        for name in FS.listdir(self.run_dir.released):
            FS.unlink(self.run_dir.released / name)

    # ---- the watcher's lease ------------------------------------------------------------------

    def watch(self) -> bool:
        """Become the run's watcher (one idle worker at a time); a stale watcher lease is taken over.
        One stat while a watcher is alive."""
        mtime = FS.mtime(self.run_dir.watcher)
        if mtime is not None and time.time() - mtime <= self.lease_timeout_s:
            return False
        self.run_dir.coord.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"worker": self.worker, "since": time.time()}).encode()
        if mtime is None:
            return FS.create(self.run_dir.watcher, data)
        aside = self.run_dir.watcher.with_name(f"watcher.stale-{uuid.uuid4().hex[:8]}")
        return FS.rename(self.run_dir.watcher, aside) and FS.create(self.run_dir.watcher, data)

    def keep_watching(self) -> None:
        FS.touch(self.run_dir.watcher)

    def stop_watching(self) -> None:
        FS.unlink(self.run_dir.watcher)

    def take_stale(self, units: list[int], due: dict[int, float], most: int) -> list[tuple[int, int]]:
        """Of claimed units not done, the claims gone stale, moved aside here (up to ``most``), with
        the attempt each was at. ``due`` (kept by the caller, updated here) says when a claim can go
        stale at the earliest: a claim is looked at (one stat) only once that time has come, so each
        is looked at about once per lease, however often this is called."""
        stale: list[tuple[int, int]] = []
        now = time.time()
        for unit in units:
            if due.get(unit, 0.0) > now:
                continue
            path = self.run_dir.claim(unit)
            mtime = FS.mtime(path)
            if mtime is None:  # done and given back meanwhile
                due.pop(unit, None)
            elif now - mtime <= self.lease_timeout_s:
                due[unit] = mtime + self.lease_timeout_s
            elif len(stale) < most:
                attempt = _move_aside(path)
                if attempt is not None:
                    stale.append((unit, attempt))
                due.pop(unit, None)
        return stale


def _move_aside(claim: Path) -> int | None:
    """Move a claim out of the way (exactly one of several racing workers succeeds): the attempt it
    was at, or None when another worker moved it first."""
    aside = claim.with_name(f"{claim.name}.stale-{uuid.uuid4().hex[:8]}")
    if not FS.rename(claim, aside):
        return None
    return _attempt_of(FS.read(aside))


def _attempt_of(data: bytes | None) -> int:
    try:
        return int(_claim_field(data or b"{}", "attempt") or 1)
    except (TypeError, ValueError):
        return 1


def _claim_field(data: bytes, key: str) -> Any:
    """One field of a claim file; None when the file is garbled."""
    try:
        claim = json.loads(data)
    except ValueError:
        return None
    return claim.get(key) if isinstance(claim, dict) else None


def _read_done_record(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """A done record, or None and what is wrong with it (None too when it vanished meanwhile)."""
    data = FS.read(path)
    if data is None:
        return None, None
    try:
        record = json.loads(data)
    except ValueError as exc:
        return None, f"not JSON ({exc})"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    if record.get("unit") != unit_of(path.name) or not isinstance(record.get("rows"), int):
        return None, "its unit or row count is missing or wrong"
    return record, None


def _set_aside_damaged(path: Path, damage: str) -> None:
    aside = path.with_name(f"{path.name}.damaged-{uuid.uuid4().hex[:8]}")
    if FS.rename(path, aside):
        log.warning("done record %s is damaged (%s): unit %s will be redone; the record is kept as %s",
                    path, damage, unit_of(path.name), aside.name)


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
