"""The scale simulation on a small scale: forked workers, real ledger, parts and reduce, killed workers."""

import pytest

from shardinfer.bench.simulate import SimOptions, run_simulation


@pytest.mark.processes
def test_simulated_workers_finish_every_row_once_despite_kills(tmp_path):
    result = run_simulation(SimOptions(out=tmp_path, workers=12, units=120, rows=3000, words=20,
                                       tokens_per_s=20000, lease_timeout_s=2, kill=2))
    once = result["exactly_once"]
    assert once["result_rows"] == once["distinct_ids"] == once["rows_in"] == 3000 == once["ok"]
    assert len(result["killed"]) == 2
    assert 6 <= result["ops_per_unit"] < 12 and result["fsyncs_per_unit"] == pytest.approx(2, abs=0.2)
    assert result["idle_ops_per_worker_s"] is not None and result["watcher_ops_per_s"] is not None
    assert (tmp_path / "sim.md").read_text().count("|") > 20
