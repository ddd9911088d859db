"""Claims, atomic commits and the reducer's checks, on a real run directory (no engine needed)."""

import json
import multiprocessing as mp
import time

import pyarrow.parquet as pq
import pytest

from shardinfer.config import config_from_dict
from shardinfer.engines import Completion
from shardinfer.engines.retry import generate_isolating, generate_with_retries
from shardinfer.errors import RunError
from shardinfer.ledger import Heartbeat, Ledger
from shardinfer.prompts import Prompt
from shardinfer.reduce import reduce_run
from shardinfer.results import result_table
from shardinfer.rundir import RunDir
from shardinfer.runstate import prepare_run
from shardinfer.unit_reader import UnitRows


def _claim_all(run_dir: str, units: int, queue) -> None:
    ledger = Ledger(RunDir(run_dir))
    queue.put([u for u in range(units) if ledger.claim(u)])


def test_racing_processes_never_claim_a_unit_twice(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.make()
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


@pytest.fixture
def planned(tmp_path):
    with open(tmp_path / "c.jsonl", "w") as fh:
        for i in range(40):
            fh.write(json.dumps({"text": f"document {i} " * (5 + i % 7), "id": f"d{i}"}) + "\n")
    cfg = config_from_dict({"input": {"path": str(tmp_path / "c.jsonl"), "id_column": "id"},
                            "model": {"path": str(tmp_path / "m"), "max_model_len": 256},
                            "sampling": {"max_tokens": 8}, "run": {"directory": str(tmp_path / "run"),
                                                                    "unit_tokens": 200}})
    run_dir, plan = prepare_run(cfg, 2)
    return run_dir, plan


def _commit(run_dir, unit, rows=None):
    """Commit a unit with made-up completions (the reducer is what is under test)."""
    n = rows if rows is not None else unit.rows
    ur = UnitRows(rows=list(range(unit.first_row, unit.first_row + n)), ids=[f"d{i}" for i in range(n)],
                  columns=[{} for _ in range(n)])
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


def test_reduce_refuses_missing_units_and_ignores_uncommitted_parts(planned):
    run_dir, plan = planned
    for unit in plan.units[1:]:
        _commit(run_dir, unit)
    # a crash mid-write leaves only a temporary file; a crash before the done record leaves a part
    (run_dir.parts / ".unit-000000.parquet.tmp-123").write_bytes(b"PAR1 half")
    with pytest.raises(RunError, match=r"1 of \d+ units are not done \(units 0\)"):
        reduce_run(run_dir)
    assert not run_dir.results.exists()
    released = Ledger(run_dir).release_unfinished_claims()
    assert released == [] and not list(run_dir.parts.glob(".unit-*"))


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
    ur = UnitRows(rows=list(range(unit.first_row, unit.first_row + unit.rows)), ids=["x"] * unit.rows,
                  columns=[{} for _ in range(unit.rows)])
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
