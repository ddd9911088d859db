"""Which unit a worker tries to claim next, and what a worker with nothing left to claim does.

Every claim attempt is a metadata operation on the shared filesystem, so a worker does not walk
every unit of the run:

- **Home range first.** Worker ``r`` of ``W`` owns the ``r``-th of ``W`` contiguous slices of the
  units not done when it started, and walks it forward.
- **Then steal from the end** of the next workers' slices, walking backward (owners walk forward,
  so owner and thief rarely meet); a few fruitless slices and the worker stops stealing.
- **Then wait, quietly.** One idle worker at a time is the *watcher* (a lease in ``coord/``): it
  tracks the units not done, gives back claims gone stale and units nobody claimed (markers in
  ``coord/released/``), and marks the run complete. Every other idle worker sleeps with exponential
  backoff and jitter and looks at one thing: the modification time of ``coord/released/`` (one
  stat), listing it only when it changed. So an idle worker costs about one operation per 10 s at
  1,000 workers, and the run still finishes when workers die.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable

from shardinfer.ledger import Ledger
from shardinfer.rundir import FS

log = logging.getLogger(__name__)

FRUITLESS_VICTIMS = 8  # slices tried without a stolen unit before a worker stops stealing
ANNOUNCE_MAX = 64  # units the watcher gives back at once (the last of those nobody holds)
TAKE_RELEASED = 3  # given-back units a woken idle worker tries
MIN_WAIT_S = 0.5
JITTER = (1.0, 1.25)


class Candidates:
    """The units a worker tries, in order: its home slice, then stolen ones, then released ones."""

    def __init__(self, todo: list[int], rank: int, world: int):
        world = max(world, 1)
        slices = [todo[r * len(todo) // world:(r + 1) * len(todo) // world] for r in range(world)]
        self.home: deque[int] = deque(slices[rank])
        self.victims: deque[list[int]] = deque(slices[(rank + k) % world] for k in range(1, world))
        self.stealing: deque[int] = deque()
        self.fruitless = 0
        self.stolen_here = 0
        self.released: deque[tuple[int, int]] = deque()  # (unit, attempt it was at)
        self.from_steal = False

    def next(self) -> tuple[int, int | None] | None:
        """The next unit to try and, for a released one, the attempt it was at; None when none is left."""
        if self.released:
            self.from_steal = False
            return self.released.popleft()
        if self.home:
            self.from_steal = False
            return self.home.popleft(), None
        while not self.stealing and self.victims and self.fruitless < FRUITLESS_VICTIMS:
            self.stealing = deque(reversed(self.victims.popleft()))
            self.stolen_here = 0
        if self.stealing:
            self.from_steal = True
            return self.stealing.popleft(), None
        return None

    def claimed(self) -> None:
        if self.from_steal:
            self.stolen_here += 1

    def missed(self) -> None:
        """The last unit tried was held: a thief that meets the owner moves on to another slice."""
        if self.from_steal:
            if not self.stolen_here:
                self.fruitless += 1
            self.stealing.clear()

    def add_released(self, units: list[tuple[int, int]]) -> None:
        self.released.extend(units)


class IdleWait:
    """What a worker holding nothing, with nothing to claim, does until work appears or the run ends.

    Kept across the idle spells of one worker: what it last saw of ``coord/released/`` and which
    given-back units it already tried, so a woken worker never spins on markers others took."""

    def __init__(self, ledger: Ledger, units: int, world: int, lease_timeout_s: float):
        self.ledger = ledger
        self.units = units
        self.lease_timeout_s = lease_timeout_s
        # 1,000 idle workers look at the run about 100 times a second in all; 2 look every second.
        self.max_wait_s = min(10.0, max(1.0, world / 100))
        self.watcher_check_s = max(lease_timeout_s / 4, MIN_WAIT_S)  # the watcher's own pace
        self.watcher_try_s = max(lease_timeout_s / 2, MIN_WAIT_S)  # how often the others look at it
        self.watch_s = 0.0  # time spent as the watcher, and its metadata operations
        self.watch_ops = 0
        self._seen: float | None = -1.0  # modification time of coord/released/ when last listed
        self._tried: set[tuple[int, int]] = set()
        self._next_watch_try = 0.0
        self._delay = MIN_WAIT_S  # the backoff goes on until this worker gets work again
        self._look_first = True  # false after handing out units that others may have taken

    def worked(self) -> None:
        """This worker claimed a unit: its next idle spell starts afresh."""
        self._delay, self._look_first = MIN_WAIT_S, True

    def wait(self, stop: Callable[[], bool]) -> list[tuple[int, int]] | None:
        """Released units to claim, or None when the run is complete; [] when ``stop`` says so."""
        while not stop():
            if self._look_first:
                found = self._look()
                if found is None:
                    return None
                if found:
                    self._look_first = False  # if none of them can be claimed, wait before looking again
                    return found
            self._look_first = True
            if time.monotonic() >= self._next_watch_try:
                self._next_watch_try = time.monotonic() + self.watcher_try_s
                if self.ledger.watch():
                    return self._timed_watch(stop)
            time.sleep(self._delay * random.uniform(*JITTER))
            self._delay = min(self._delay * 2, self.max_wait_s)
        return []

    def _look(self) -> list[tuple[int, int]] | None:
        """One stat; a listing only when something was given back or taken since the last one.
        A few untried given-back units, picked at random; None once the run is complete."""
        changed = self.ledger.released_changed_at()
        if changed == self._seen:
            return []
        self._next_watch_try = 0.0  # a watcher that gave units back has stopped watching: look now
        released = self.ledger.released_units()
        if released is None:
            return None
        fresh = [r for r in released if r not in self._tried]
        picked = random.sample(fresh, min(TAKE_RELEASED, len(fresh)))
        self._tried.update(picked)
        # list again next time when more were left (or the clock cannot tell two changes apart)
        self._seen = changed if len(fresh) <= len(picked) else None
        return picked

    def _timed_watch(self, stop: Callable[[], bool]) -> list[tuple[int, int]] | None:
        start, ops = time.monotonic(), FS.total
        try:
            return self._watch(stop)
        finally:
            self.watch_s += time.monotonic() - start
            self.watch_ops += FS.total - ops

    def _watch(self, stop: Callable[[], bool]) -> list[tuple[int, int]] | None:
        """The watcher: follow the units not done; give back claims gone stale at once, and units
        nobody claimed at two of its looks in a row (their owner is gone or far behind); end the run."""
        log.info("watching the run: no unit left to claim here")
        pending = set(range(self.units)) - self.ledger.done_set()
        unclaimed_before: set[int] = set()
        try:
            while not stop():
                pending -= self._done_among(pending)
                self.ledger.tidy_released(pending)
                if not pending:
                    self.ledger.mark_complete()
                    log.info("every unit is done")
                    return None
                stale, unclaimed = self.ledger.inspect_claims(sorted(pending), ANNOUNCE_MAX)
                overdue = sorted(unclaimed_before & set(unclaimed), reverse=True)  # the ends of slices first
                unclaimed_before = set(unclaimed)
                free = stale + [(u, 0) for u in overdue[:ANNOUNCE_MAX - len(stale)]]
                if free:
                    log.warning("giving back %d unit(s) nobody holds: %s", len(free), [u for u, _ in free][:10])
                    self.ledger.announce(free)
                    return free
                self.ledger.keep_watching()
                time.sleep(min(max(len(pending) * 0.01, MIN_WAIT_S), self.watcher_check_s))
            return []
        finally:
            self.ledger.stop_watching()

    def _done_among(self, pending: set[int]) -> set[int]:
        """Done units among ``pending``: one listing of each shard that holds any of them."""
        run_dir = self.ledger.run_dir
        shards = {run_dir.shard_of(run_dir.done, u) for u in pending}
        done: set[int] = set()
        for shard in shards:
            done |= {u for u in self.ledger.done_set_of(shard) if u in pending}
        return done
