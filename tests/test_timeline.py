"""Throughput over time: bins, merging across workers, phases."""

from hypothesis import given, settings
from hypothesis import strategies as st

from shardinfer.telemetry.timeline import Timeline, merge, phases, rates


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 5000), st.integers(0, 10**6), st.integers(0, 10**4)), max_size=300))
def test_bins_keep_every_token_and_stay_bounded(events):
    timeline = Timeline(start=100.0, max_bins=64)
    for t, p, o in events:
        timeline.add(100.0 + t, p, o)
    assert sum(timeline.prompt) == sum(p for _, p, _ in events)
    assert sum(timeline.output) == sum(o for _, _, o in events)
    assert len(timeline.prompt) <= 64
    for t, _, _ in events:  # each event sits in the bin that covers its time
        assert int(t / timeline.bin_s) < len(timeline.prompt)


def test_merge_puts_workers_on_one_clock():
    a, b = Timeline(start=10.0, bin_s=1.0), Timeline(start=12.0, bin_s=2.0)
    a.add(10.5, 100, 10)
    b.add(12.5, 40, 4)  # bin [12, 14): lands at 13.0, i.e. 3 s after the earliest start
    merged = merge([a.to_json(), b.to_json()])
    assert merged.start == 10.0 and merged.bin_s == 2.0
    assert merged.prompt == [100, 40] and merged.output == [10, 4]
    assert rates(merged) == [(1.0, 50.0, 5.0), (3.0, 20.0, 2.0)]


def test_phases_find_start_up_steady_state_and_tail():
    timeline = Timeline(start=0.0, bin_s=1.0)
    for second in range(20, 80):  # 60 s at 1,000 tokens/s
        timeline.add(second + 0.5, 900, 100)
    for second in range(80, 100):  # then 20 s at 100 tokens/s
        timeline.add(second + 0.5, 90, 10)
    p = phases(timeline, first_request_at=20.0, end=100.0)
    assert p["startup_s"] == 20.0
    assert 18.0 <= p["tail_s"] <= 22.0 and abs(p["steady_s"] + p["tail_s"] - 80.0) < 1e-6
    assert 900 <= p["steady_tokens_per_s"] <= 1000


def test_phases_of_a_run_without_a_slow_end_have_no_tail():
    timeline = Timeline(start=0.0, bin_s=1.0)
    for second in range(5, 30):
        timeline.add(second + 0.5, 1000, 0)
    p = phases(timeline, first_request_at=5.0, end=30.0)
    assert p["tail_s"] == 0.0 and p["steady_s"] == 25.0 and p["steady_tokens_per_s"] == 1000.0
