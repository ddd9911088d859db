"""Claims, atomic commits and the reducer's checks, on a real run directory (no engine needed)."""

import json
import multiprocessing as mp
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardinfer.config import config_from_dict
from shardinfer.engines import Completion
from shardinfer.engines.retry import generate_isolating, generate_with_retries
from shardinfer.errors import RunError
from shardinfer.ledger.claims import Heartbeat, Ledger
from shardinfer.ledger.rundir import RunDir
from shardinfer.reduce.merge import reduce_run
from shardinfer.requests.prompts import Prompt
from shardinfer.results import result_table


def _rows(first: int, n: int, ids: list[str]) -> pa.Table:
    """A unit's rows in the corpus's row shape (only what result_table reads)."""
    return pa.table({"_row": pa.array(range(first, first + n), pa.int64()), "_id": pa.array(ids, pa.string())})


def _claim_all(run_dir: str, units: int, queue) -> None:
    ledger = Ledger(RunDir(run_dir))
    queue.put([u for u in range(units) if ledger.claim(u)])


def test_racing_processes_never_claim_a_unit_twice(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.make(units=300)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(str(tmp_path), 300, queue)) for _ in range(6)]
    for p in procs:
        p.start()
    claimed = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    flat = sorted(u for c in claimed for u in c)
    assert flat == list(range(300))


def _commit(run_dir, unit, rows=None):
    """Commit a unit with made-up completions (the reducer is what is under test)."""
    n = rows if rows is not None else unit.rows
    ur = _rows(unit.first_row, n, [f"d{i}" for i in range(n)])
    prompts = [Prompt([1, 2, 3]) for _ in range(n)]
    completions = [Completion([4, 5], "out", "length") for _ in range(n)]
    ledger = Ledger(run_dir)
    assert ledger.claim(unit.unit)
    ledger.commit(unit.unit, result_table(ur, [None] * n, prompts, completions, []), {"attempt": 1})


def test_reduce_merges_committed_parts_in_input_order(planned):
    run_dir, plan = planned
    assert len(plan.units) > 3
    for unit in reversed(plan.units):
        _commit(run_dir, unit)
    report = reduce_run(run_dir)
    table = pq.read_table(run_dir.results)
    assert table.num_rows == 40 and report["rows"] == {"in": 40, "ok": 40, "truncated": 0, "failed": 0}
    assert report["tokens"] == {"prompt": 120, "output": 80, "total": 200}
    assert "_row" not in table.column_names


def test_reduce_reads_each_part_once_into_row_groups_of_the_configured_size(planned, monkeypatch):
    run_dir, plan = planned
    for unit in plan.units:
        _commit(run_dir, unit)
    old = run_dir.done_record(plan.units[0].unit)  # committed by a version without schemas in records
    record = json.loads(old.read_text())
    del record["schema"]
    old.write_text(json.dumps(record))
    state = json.loads(run_dir.run_json.read_text())
    state["config"]["run"]["results_row_group_rows"] = 7
    run_dir.run_json.write_text(json.dumps(state))
    opened = []

    class CountingParquetFile(pq.ParquetFile):
        def __init__(self, source, *args, **kwargs):
            opened.append(("open", str(source)))
            super().__init__(source, *args, **kwargs)

    monkeypatch.setattr(pq, "ParquetFile", CountingParquetFile)
    for name in ("read_table", "read_schema", "read_metadata"):
        real = getattr(pq, name)
        monkeypatch.setattr(pq, name, lambda path, *a, _real=real, _name=name, **k: opened.append((_name, str(path)))
                            or _real(path, *a, **k))
    reduce_run(run_dir)
    reads = [p for n, p in opened if "/parts/" in p and n in ("open", "read_table")]
    assert len(reads) == len(set(reads)) == len(plan.units)  # each part read once
    assert [n for n, p in opened if "/parts/" in p].count("read_schema") == 1  # only the record without one
    monkeypatch.undo()
    groups = [pq.ParquetFile(f).metadata for f in sorted((run_dir.results).glob("*.parquet"))]
    sizes = [md.row_group(i).num_rows for md in groups for i in range(md.num_row_groups)]
    assert sizes == [7] * 5 + [5] and all(md.num_row_groups <= 8 for md in groups)


def test_reduce_refuses_missing_units_and_ignores_uncommitted_parts(planned):
    run_dir, plan = planned
    for unit in plan.units[1:]:
        _commit(run_dir, unit)
    # a crash mid-write leaves only a temporary file; a crash before the done record leaves a part
    (run_dir.part(0).parent / ".unit-000000.parquet.tmp-123").write_bytes(b"PAR1 half")
    with pytest.raises(RunError, match=r"1 of \d+ units are not done \(units 0\)"):
        reduce_run(run_dir)
    assert not run_dir.results.exists()
    released = Ledger(run_dir).release_unfinished_claims()
    assert released == [] and not list(run_dir.parts.rglob(".unit-*"))


def test_reduce_detects_a_part_with_the_wrong_rows(planned):
    run_dir, plan = planned
    for unit in plan.units:
        _commit(run_dir, unit, rows=unit.rows - 1 if unit.unit == 2 else None)
    with pytest.raises(RunError, match="part of unit 2 does not hold rows .* Delete .*unit-000002"):
        reduce_run(run_dir)


def test_reduce_detects_a_corrupt_part(planned):
    run_dir, plan = planned
    for unit in plan.units:
        _commit(run_dir, unit)
    run_dir.part(1).write_bytes(run_dir.part(1).read_bytes()[:50])
    with pytest.raises(RunError, match="part of unit 1 is unreadable"):
        reduce_run(run_dir)


def test_a_claim_of_a_dead_worker_is_released_on_the_next_launch(planned):
    run_dir, plan = planned
    ledger = Ledger(run_dir)
    assert ledger.claim(0) and not ledger.claim(0)
    _commit(run_dir, plan.units[1])
    assert ledger.release_unfinished_claims() == [0]
    assert ledger.claim(0)
    assert not ledger.claim(1)  # done units are never claimed again


class FlakyEngine:
    """Raises on any batch holding the poisoned prompt, like an engine rejecting one bad request."""

    def __init__(self, poisoned):
        self.poisoned = poisoned
        self.calls = 0

    def generate(self, prompts):
        self.calls += 1
        if self.poisoned in prompts:
            raise ValueError("request rejected")
        return [Completion(p, "ok", "length") for p in prompts]


def test_an_engine_error_fails_only_the_row_that_causes_it():
    prompts = [[i] for i in range(16)]
    out = generate_isolating(FlakyEngine([5]), prompts)
    assert [isinstance(o, Exception) for o in out] == [i == 5 for i in range(16)]
    assert [o.token_ids for o in out if not isinstance(o, Exception)] == [[i] for i in range(16) if i != 5]


def test_a_stale_lease_is_taken_over_once_and_the_old_owner_cannot_commit(planned):
    run_dir, plan = planned
    unit = plan.units[0]
    old = Ledger(run_dir, worker="old", lease_timeout_s=0.3)
    assert old.claim(unit.unit)
    new = Ledger(run_dir, worker="new", lease_timeout_s=0.3)
    rival = Ledger(run_dir, worker="rival", lease_timeout_s=0.3)
    assert not new.claim(unit.unit)  # the lease is fresh
    time.sleep(0.5)
    assert new.claim(unit.unit) and not rival.claim(unit.unit)  # stale: exactly one takes it over
    assert json.loads(run_dir.claim(unit.unit).read_text())["attempt"] == 2
    ur = _rows(unit.first_row, unit.rows, ["x"] * unit.rows)
    result = result_table(ur, [None] * unit.rows, [Prompt([1])] * unit.rows,
                          [Completion([2], "o", "length")] * unit.rows, [])
    assert not old.commit(unit.unit, result, {})  # lost its lease: its work is discarded
    assert not run_dir.done_record(unit.unit).exists()
    assert new.commit(unit.unit, result, {})
    assert json.loads(run_dir.done_record(unit.unit).read_text())["attempt"] == 2


def test_a_heartbeat_keeps_a_slow_unit_from_being_taken(planned):
    run_dir, plan = planned
    owner = Ledger(run_dir, worker="owner", lease_timeout_s=0.4)
    assert owner.claim(1)
    beat = Heartbeat(owner)
    beat.hold(1)
    try:
        time.sleep(1.0)
        assert not Ledger(run_dir, worker="other", lease_timeout_s=0.4).claim(1)
        assert not beat.take_lost()
    finally:
        beat.stop()


def test_a_lease_taken_over_is_reported_lost_once_so_the_owner_drops_its_work(planned):
    run_dir, _ = planned
    owner = Ledger(run_dir, worker="owner", lease_timeout_s=0.2)
    assert owner.claim(2)
    beat = Heartbeat(owner)
    try:
        time.sleep(0.3)  # the owner stalled (no heartbeat held): its lease went stale
        assert Ledger(run_dir, worker="other", lease_timeout_s=0.2).claim(2)
        beat.hold(2)
        deadline = time.time() + 5
        lost: set[int] = set()
        while not lost and time.time() < deadline:
            lost = beat.take_lost()
            time.sleep(0.02)
        assert lost == {2} and not beat.take_lost()  # said once
        assert 2 not in beat.units
    finally:
        beat.stop()


def test_released_units_are_claimable_at_once(planned):
    run_dir, _ = planned
    a, b = Ledger(run_dir, worker="a"), Ledger(run_dir, worker="b")
    assert a.claim(3) and not b.claim(3)
    a.release(3)
    assert b.claim(3)


def test_verify_committed_redoes_corrupt_and_truncated_parts(planned):
    run_dir, plan = planned
    for unit in plan.units:
        _commit(run_dir, unit)
    run_dir.part(1).write_bytes(run_dir.part(1).read_bytes()[:50])
    run_dir.part(2).unlink()
    expected = {u.unit: u.rows for u in plan.units}
    assert Ledger(run_dir).verify_committed(expected) == [1, 2]
    assert not run_dir.done_record(1).exists() and not run_dir.claim(2).exists()
    assert Ledger(run_dir).verify_committed(expected) == []


class DownThenUp:
    """Fails every call (like an engine out of memory) for the first ``down`` calls."""

    def __init__(self, down):
        self.down = down
        self.calls = 0

    def generate(self, prompts):
        self.calls += 1
        if self.calls <= self.down:
            raise RuntimeError("CUDA out of memory")
        return [Completion(p, "ok", "length") for p in prompts]


def test_a_failing_unit_is_retried_with_backoff_then_its_rows_fail():
    prompts = [[1], [2]]
    recovered = generate_with_retries(DownThenUp(3), prompts, attempts=3, backoff_s=0.01)
    assert [c.text for c in recovered] == ["ok", "ok"]  # 1st try: 3 failed calls (batch + halves)
    engine = DownThenUp(10**6)
    failed = generate_with_retries(engine, prompts, attempts=3, backoff_s=0.01)
    assert all(isinstance(c, RuntimeError) for c in failed) and engine.calls == 9


def test_a_unit_costs_six_metadata_operations_and_two_fsyncs(planned):
    from shardinfer.ledger.rundir import FS

    run_dir, plan = planned
    before, fsyncs = FS.total, FS.fsyncs
    _commit(run_dir, plan.units[0])  # claim, then commit
    assert FS.total - before <= 6 and FS.fsyncs - fsyncs == 2
    assert run_dir.claim(0).parent.name == run_dir.part(0).parent.name == run_dir.done_record(0).parent.name == "0000"


def test_a_run_directory_of_the_flat_layout_is_continued(planned):
    """Run directories made before claims/, parts/ and done/ were sharded still resume and reduce."""
    run_dir, plan = planned
    half = len(plan.units) // 2
    for unit in plan.units[:half]:
        _commit(run_dir, unit)
    for top in (run_dir.claims, run_dir.parts, run_dir.done):
        for shard in [p for p in top.iterdir() if p.is_dir()]:
            for f in shard.iterdir():
                f.rename(top / f.name)
            shard.rmdir()
    state = json.loads(run_dir.run_json.read_text())
    del state["layout"]
    run_dir.run_json.write_text(json.dumps(state))
    old = RunDir(run_dir.path)
    assert old.layout == 1 and old.claim(3) == old.claims / "unit-000003.json"
    assert Ledger(old).done_set() == set(range(half))
    for unit in plan.units[half:]:
        _commit(old, unit)
    assert reduce_run(old)["rows"]["in"] == 40


def test_candidates_walk_the_home_slice_then_steal_from_the_end_of_others():
    from shardinfer.ledger.scheduler import Candidates

    c = Candidates(list(range(16)), rank=1, world=4)
    tried = [c.next()[0] for _ in range(4)]
    assert tried == [4, 5, 6, 7]  # home slice, forward
    assert c.next() == (11, None)  # then the end of rank 2's slice, backward
    c.claimed()
    assert c.next() == (10, None)
    c.missed()  # met rank 2 walking forward: on to rank 3's slice
    assert c.next() == (15, None)
    c.add_released([(2, 1)])
    assert c.next() == (2, 1)  # given-back units come first


def test_an_idle_worker_becomes_the_watcher_gives_back_a_stale_unit_and_ends_the_run(planned):
    from shardinfer.ledger.scheduler import IdleWait

    run_dir, plan = planned
    dead = _all_done_but_unit_0_held_by_a_dead_worker(run_dir, plan, lease_timeout_s=0.3)
    idle = Ledger(run_dir, worker="idle", lease_timeout_s=0.3)
    time.sleep(0.4)  # the dead worker's lease goes stale
    released = IdleWait(idle, len(plan.units), 2, 0.3).wait(lambda: False)
    assert released == [(0, 1)]
    assert not run_dir.watcher.exists()  # the watcher stopped watching to do the work
    assert idle.claim_released(0, 1) and idle.attempts[0] == 2
    assert not dead.commit(0, pa.table({"_row": [0]}), {})  # the dead worker's attempt cannot commit
    _commit_claimed(idle, run_dir, plan.units[0])
    other = Ledger(run_dir, worker="other", lease_timeout_s=0.3)
    assert IdleWait(idle, len(plan.units), 2, 0.3).wait(lambda: False) is None  # every unit is done
    assert (run_dir.released / "complete").exists()
    assert IdleWait(other, len(plan.units), 2, 0.3).wait(lambda: False) is None


def _all_done_but_unit_0_held_by_a_dead_worker(run_dir, plan, lease_timeout_s):
    """Every unit committed but unit 0, claimed by a worker called "dead"; its ledger."""
    dead = Ledger(run_dir, worker="dead", lease_timeout_s=lease_timeout_s)
    assert dead.claim(0)
    for unit in plan.units[1:]:
        _commit(run_dir, unit)
    return dead


def _commit_claimed(ledger, run_dir, unit):
    ur = _rows(unit.first_row, unit.rows, [f"d{i}" for i in range(unit.rows)])
    table = result_table(ur, [None] * unit.rows, [Prompt([1])] * unit.rows,
                         [Completion([2], "o", "length")] * unit.rows, [])
    assert ledger.commit(unit.unit, table, {})


def test_an_idle_worker_that_is_not_the_watcher_looks_at_one_file(planned):
    from shardinfer.ledger.rundir import FS
    from shardinfer.ledger.scheduler import IDLE_LOOK_S, IdleWait

    run_dir, plan = planned
    watcher = Ledger(run_dir, worker="watcher", lease_timeout_s=60)
    assert watcher.watch()
    busy = Ledger(run_dir, worker="busy", lease_timeout_s=60)
    assert busy.claim(0)
    idle = Ledger(run_dir, worker="idle", lease_timeout_s=60)
    wait = IdleWait(idle, len(plan.units), 100, 60)
    wait.first_wait_s = wait._delay = 0.2  # the backoff of a 100-worker run, 25 times faster
    wait.max_wait_s = IDLE_LOOK_S / 25
    before, listings = FS.total, FS.counts.get("listdir", 0)
    deadline = time.monotonic() + 3
    assert wait.wait(lambda: time.monotonic() > deadline) == []
    ops = FS.total - before
    # a watcher try at the start (by chance), then one stat per wake (0.2, 0.4, 0.6 ... s); at most one
    # listing, by chance (1 in 100 / LISTERS), of what was given back before this worker looked
    listed = FS.counts.get("listdir", 0) - listings
    assert listed <= 1 and 4 <= ops - listed <= 1 + 7, (ops, listed)
    listings += listed
    for unit in plan.units:
        if unit.unit:
            _commit(run_dir, unit)
    _commit_claimed(busy, run_dir, plan.units[0])
    watcher.mark_complete()
    before = FS.total
    assert wait.wait(lambda: False) is None  # the end of the run, seen in one stat
    assert FS.total - before == 1 and FS.counts.get("listdir", 0) == listings


def test_idle_workers_of_a_large_run_look_about_once_in_20_seconds(planned):
    """The per-idle-worker figure the scale targets ask for: at most one operation per 10 s."""
    from shardinfer.ledger.scheduler import IDLE_LOOK_S, QUIET_WORLD, SMALL_WORLD, WATCHER_TRY_S, IdleWait

    run_dir, plan = planned

    def idle_wait(world: int) -> IdleWait:
        return IdleWait(Ledger(run_dir, lease_timeout_s=300), len(plan.units), world, 300)

    large, medium, small = idle_wait(1000), idle_wait(QUIET_WORLD // 2), idle_wait(SMALL_WORLD)
    assert large.max_wait_s == idle_wait(QUIET_WORLD).max_wait_s == IDLE_LOOK_S >= 10
    assert large.first_wait_s >= 5 and large.watcher_try_s >= WATCHER_TRY_S and not large.look_at_start
    assert medium.max_wait_s == IDLE_LOOK_S / 2  # all idle workers together: the same looks per second
    assert small.max_wait_s == 1.0 and small.look_at_start  # a few workers on one machine end promptly


def test_a_watcher_sweeps_the_claims_within_its_budget_and_still_finds_a_stale_one(planned):
    from shardinfer.ledger.rundir import FS
    from shardinfer.ledger.scheduler import WATCH_OPS_PER_S, IdleWait

    run_dir, plan = planned
    units = len(plan.units)
    holders = [Ledger(run_dir, worker=f"busy{u}", lease_timeout_s=2) for u in range(units)]
    for unit, holder in enumerate(holders):
        assert holder.claim(unit)
    watcher = Ledger(run_dir, worker="watcher", lease_timeout_s=2)
    assert watcher.watch()
    renew_ops = 0

    def renew_all_but_unit_1() -> bool:  # unit 1's holder died: its claim goes stale after 2 s
        nonlocal renew_ops
        before = FS.total
        for unit, holder in enumerate(holders):
            if unit != 1:
                holder.heartbeat(unit)
        renew_ops += FS.total - before
        return time.monotonic() > start + 8

    before, start = FS.total, time.monotonic()
    found = IdleWait(watcher, units, 100, 2)._watch(renew_all_but_unit_1)
    elapsed = time.monotonic() - start
    assert found == [(1, 1)] and 2 < elapsed < 6, (found, elapsed)
    watcher_ops = FS.total - before - renew_ops
    # a first look at everything; then the done units at its pace, two listings per sweep (every
    # 0.5 s here) and each claim once its lease can have run out (renewed every 0.5 s: 1.5 s later).
    # Looking at every claim at every step (as it once did) is about twice this.
    budget = 4 + 2 * units + elapsed * (WATCH_OPS_PER_S + 2 / 0.5 + units / 1.5)
    assert watcher_ops <= budget, (watcher_ops, budget, elapsed)
    assert (run_dir.released / "unit-000001.a1").exists()


def test_the_watcher_gives_back_units_nobody_claimed_at_two_of_its_steps_even_with_a_long_lease(planned):
    """A dead or slow owner's unclaimed units go to idle workers within seconds, not a lease later."""
    from shardinfer.ledger.scheduler import IdleWait

    run_dir, plan = planned
    for unit in plan.units[2:]:
        _commit(run_dir, unit)
    watcher = Ledger(run_dir, worker="watcher", lease_timeout_s=300)
    assert watcher.watch()
    start = time.monotonic()
    free = IdleWait(watcher, len(plan.units), 100, 300)._watch(lambda: time.monotonic() > start + 20)
    assert sorted(free) == [(0, 0), (1, 0)] and time.monotonic() - start < 5
    assert sorted(watcher.released_units()) == [(0, 0), (1, 0)]


def test_the_watcher_takes_units_a_launcher_gave_back_with_their_next_attempt(planned):
    from shardinfer.ledger.scheduler import IdleWait

    run_dir, plan = planned
    _all_done_but_unit_0_held_by_a_dead_worker(run_dir, plan, lease_timeout_s=300)
    watcher = Ledger(run_dir, worker="watcher", lease_timeout_s=300)
    assert watcher.watch()
    assert watcher.expire_claims_of("dead") == [0]  # the local launcher saw it die
    start = time.monotonic()
    given_back = IdleWait(watcher, len(plan.units), 2, 300)._watch(lambda: time.monotonic() > start + 10)
    assert given_back == [(0, 1)] and time.monotonic() - start < 3
    assert watcher.claim_released(0, 1) and watcher.attempts[0] == 2


@pytest.mark.parametrize("damage", [b"", b"{}", b"{\"unit\": 1, \"rows\"", b"[1, 2]", b"{\"unit\": 99, \"rows\": 3}"])
def test_a_damaged_done_record_is_set_aside_and_its_unit_redone(planned, damage, caplog):
    from shardinfer.ledger.runstate import begin_launch
    from shardinfer.telemetry.status import run_status

    run_dir, plan = planned
    for unit in plan.units:
        _commit(run_dir, unit)
    run_dir.done_record(1).write_bytes(damage)
    assert run_dir.done_record(1).exists() and 1 not in set(Ledger(run_dir).done_units(repair=False))
    assert run_status(run_dir).done == len(plan.units) - 1  # status looks, changes nothing
    assert run_dir.done_record(1).read_bytes() == damage
    with pytest.raises(RunError, match=r"1 of \d+ units are not done \(units 1\)"):
        reduce_run(run_dir)
    kept = list(run_dir.done_record(1).parent.glob("unit-000001.json.damaged-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == damage
    assert "done record" in caplog.text and "is damaged" in caplog.text and "unit 1 will be redone" in caplog.text
    begin_launch(run_dir, plan, config_from_dict(json.loads(run_dir.run_json.read_text())["config"]))
    assert Ledger(run_dir).claim(plan.units[1].unit, take_over=False)  # free to claim again
