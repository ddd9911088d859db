"""Which unit a worker tries to claim next, and what a worker with nothing left to claim does.

Every claim attempt is a metadata operation on the shared filesystem, so a worker does not walk
every unit of the run:

- **Home range first.** Worker ``r`` of ``W`` owns the ``r``-th of ``W`` contiguous slices of the
  units not done when it started, and walks it forward.
- **Then steal from the end** of the next workers' slices, walking backward (owners walk forward,
  so owner and thief rarely meet); a few fruitless slices and the worker stops stealing.
- **Then wait, quietly.** One idle worker at a time is the *watcher* (a lease in ``coord/``): it
  tracks the units not done, gives back claims gone stale and units nobody claimed (markers in
  ``coord/released/``), and marks the run complete, all within a budget of metadata operations per
  second. Every other idle worker sleeps with exponential backoff and jitter and looks at one thing:
  the modification time of ``coord/released/`` (one stat; a time no change gives once the run is
  complete), listing it only when it changed, and then only about ``LISTERS`` of them at once. In
  a run of ``QUIET_WORLD`` workers or more an idle worker looks about once every 20 s, in smaller
  ones more often (every second for a few workers on one machine, so such a run ends promptly),
  and the run still finishes when workers die.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable

from shardinfer.ledger.claims import COMPLETE_MTIME, Ledger
from shardinfer.ledger.rundir import FS

log = logging.getLogger(__name__)

FRUITLESS_VICTIMS = 8  # slices tried without a stolen unit before a worker stops stealing
ANNOUNCE_MAX = 64  # units the watcher gives back at once (the last of those nobody holds)
TAKE_RELEASED = 3  # given-back units a woken idle worker tries
MIN_WAIT_S = 0.5
JITTER = (1.0, 1.25)
SMALL_WORLD = 8  # up to this many workers, an idle worker looks at once and then every second
IDLE_LOOK_S = 20.0  # the longest sleep of an idle worker between two looks, from QUIET_WORLD workers on
QUIET_WORLD = 100  # in smaller runs it is shorter in proportion: all idle workers together look ~5 times a second
WATCHER_TRY_S = 60.0  # at least this long between two tries of an idle worker to become the watcher
WATCH_OPS_PER_S = 2.0  # the watcher's pace when following the done units
LISTERS = 16  # idle workers expected to list coord/released/ when it changed (the others later)
_LIST_AGAIN = -1.0  # what was seen of coord/released/ when the next look must list it


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
        small = world <= SMALL_WORLD
        self.max_wait_s = 1.0 if small else max(1.0, IDLE_LOOK_S * min(1.0, world / QUIET_WORLD))
        self.first_wait_s = max(MIN_WAIT_S, self.max_wait_s / 2)
        self.look_at_start = small  # a large run's idle worker sleeps before its first look
        # of the idle workers that see units given back, about LISTERS list them at once (at most
        # TAKE_RELEASED units each), the others at a later look
        self.list_odds = min(1.0, LISTERS / max(world, 1))
        self.watcher_check_s = max(lease_timeout_s / 4, MIN_WAIT_S)  # the watcher's slowest pace
        self.watcher_try_s = max(lease_timeout_s / 2, MIN_WAIT_S if small else WATCHER_TRY_S)
        self.watch_s = 0.0  # time spent as the watcher, and its metadata operations
        self.watch_ops = 0
        self._seen: float | None = None  # modification time of coord/released/ when last listed
        self._tried: set[tuple[int, int]] = set()
        # in a large run, a worker idle within WATCHER_TRY_S of its start tries to become the watcher
        # at once only by chance (about LISTERS of them do); every idle worker tries every
        # WATCHER_TRY_S: a watcher is there long before the end, for a stat from a few workers
        try_now = small or random.random() < self.list_odds
        self._next_watch_try = 0.0 if try_now else time.monotonic() + self.watcher_try_s
        self._delay = self.first_wait_s  # the backoff goes on until this worker gets work again
        self._look_first = self.look_at_start  # false after handing out units that others may have taken

    def worked(self) -> None:
        """This worker claimed a unit: its next idle spell starts afresh."""
        self._delay, self._look_first = self.first_wait_s, self.look_at_start

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
        """One stat; a listing only when something was given back or taken since the last one (and
        then by about LISTERS of the idle workers). A few untried given-back units, picked at
        random; None once the run is complete (the stat says so)."""
        changed = self.ledger.released_changed_at()
        if changed == COMPLETE_MTIME:
            return None
        if changed == self._seen or random.random() >= self.list_odds:
            return []
        self._next_watch_try = 0.0  # a watcher that gave units back has stopped watching
        released = self.ledger.released_units()
        if released is None:
            return None
        fresh = [r for r in released if r not in self._tried]
        picked = random.sample(fresh, min(TAKE_RELEASED, len(fresh)))
        self._tried.update(picked)
        # list again next time when more were left (or the clock cannot tell two changes apart)
        self._seen = changed if len(fresh) <= len(picked) else _LIST_AGAIN
        return picked

    def _timed_watch(self, stop: Callable[[], bool]) -> list[tuple[int, int]] | None:
        start, ops = time.monotonic(), FS.total
        try:
            with FS.scope("watch"):
                return self._watch(stop)
        finally:
            self.watch_s += time.monotonic() - start
            self.watch_ops += FS.total - ops

    def _watch(self, stop: Callable[[], bool]) -> list[tuple[int, int]] | None:
        """The watcher: follow the units not done; give back claims gone stale at once, and units
        nobody claimed at two of its steps in a row (their owner is gone or far behind); end the run.

        Its pace keeps its metadata operations few: a step lists the done and the claims shards that
        hold units not done, and the next step waits until the operations so far make
        ``WATCH_OPS_PER_S``; a claim is looked at (a stat) only when its lease can have run out, about
        once per claim and lease."""
        log.info("watching the run: no unit left to claim here")
        pending = set(range(self.units)) - self.ledger.done_set()
        unclaimed_before: set[int] = set()
        # claimed unit -> when its lease can run out at the earliest; not known yet: the first looks are
        # spread over half a lease instead of one stat per unit not done at once
        now = time.time()
        due = {u: now + random.uniform(0, self.lease_timeout_s / 2) for u in pending}
        tidied = touched = time.monotonic()
        try:
            while not stop():
                ops = FS.total
                pending -= self.ledger.recorded_among(self.ledger.run_dir.done, pending)
                if not pending:
                    self.ledger.mark_complete()
                    log.info("every unit is done")
                    return None
                if time.monotonic() - tidied >= self.watcher_check_s:
                    self.ledger.tidy_released(pending)
                    tidied = time.monotonic()
                free, unclaimed_before = self._free(pending, unclaimed_before, due)
                if free:
                    return free
                if time.monotonic() - touched >= self.watcher_check_s:
                    self.ledger.keep_watching()
                    touched = time.monotonic()
                step = (FS.total - ops) / WATCH_OPS_PER_S
                time.sleep(min(max(step, MIN_WAIT_S), self.watcher_check_s))
            return []
        finally:
            self.ledger.stop_watching()

    def _free(self, pending: set[int], unclaimed_before: set[int],
              due: dict[int, float]) -> tuple[list[tuple[int, int]], set[int]]:
        """Units for idle workers, with the attempt each was at, and the units unclaimed now: claims
        gone stale and units unclaimed at the last step too are given back (announced); those among
        them that were given back already (by a launcher whose worker died, a draining worker) are
        taken as they are, with their attempt."""
        claimed = self.ledger.recorded_among(self.ledger.run_dir.claims, pending)
        stale = self.ledger.take_stale(sorted(claimed), due, ANNOUNCE_MAX)
        unclaimed = pending - claimed
        overdue = sorted(unclaimed_before & unclaimed, reverse=True)  # the ends of slices first
        marked = dict(self.ledger.released_units() or []) if overdue else {}  # a listing, only then
        free = stale + [(u, 0) for u in overdue if u not in marked][:ANNOUNCE_MAX - len(stale)]
        if free:
            log.warning("giving back %d unit(s) nobody holds: %s", len(free), [u for u, _ in free][:10])
            self.ledger.announce(free)
        return free + [(u, marked[u]) for u in overdue if u in marked], unclaimed
