"""MPI launch mode with real mpirun (Open MPI) and mpi4py on the tiny model."""

import json
import subprocess
import sys

import pytest

from conftest import openai_batch_config, openai_output, read_results, run_cli

pytestmark = pytest.mark.engine


@pytest.fixture
def mpi_job(small_job, tmp_path):
    """The shared small job, its outputs from a run on one worker, and this test's own directory."""
    config, local = small_job
    return config, tmp_path, local


def _outputs(run_dir):
    return [(r["id"], r["status"], r["output"]) for r in read_results(run_dir)]


def _assert_mpirun_run(run_dir, stdout, local, ranks):
    """Every row once with the one-worker outputs, each rank reported, rank 0's reduce published."""
    assert f"results: {run_dir.resolve() / 'results'}" in stdout
    assert _outputs(run_dir) == local
    report = json.loads((run_dir / "report.json").read_text())
    assert sorted(w["rank"] for w in report["workers"]) == list(range(ranks))
    metrics = [json.loads(p.read_text()) for p in (run_dir / "metrics").glob("*.json")]
    assert {m["launcher"] for m in metrics} == {"mpirun"} and {m["world"] for m in metrics} >= {ranks}
    assert {r["launcher"] for r in json.loads((run_dir / "jobs.json").read_text())} == {"mpirun"}


def test_mpirun_ranks_share_the_ledger_and_rank_0_reduces(mpi_job, engine_env):
    config, tmp, local = mpi_job  # 3 ranks here; 2 in the failing-rank test below
    run_dir = tmp / "ranks-3"
    proc = run_cli(["run", str(config), "--launcher", "mpirun", "run.workers=3", f"run.directory={run_dir}"],
                   engine_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_mpirun_run(run_dir, proc.stdout, local, 3)
    assert {json.loads(p.read_text())["world"] for p in (run_dir / "metrics").glob("*.json")} == {3}
    assert len(json.loads((run_dir / "jobs.json").read_text())) == 1


def test_a_failing_rank_aborts_all_ranks_and_resume_finishes(mpi_job, engine_env):
    config, tmp, local = mpi_job
    run_dir = tmp / "failing"
    # rank 1 is asked to use a second GPU that is not there: it fails at start-up, rank 0 is working
    cmd = ["mpirun", "-n", "2", "--oversubscribe", "--allow-run-as-root", sys.executable, "-m",
           "shardinfer.launch.mpi", str(config), f"run.directory={run_dir}", "--gpus-per-replica", "1"]
    proc = subprocess.run(cmd, env={**engine_env, "CUDA_VISIBLE_DEVICES": "0"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "rank 1 failed; aborting all 2 ranks" in out and "allocation mismatch" in out
    assert not (run_dir / "results").exists()
    assert json.loads((run_dir / "jobs.json").read_text())[0]["launcher"] == "mpirun"  # ranks started by hand
    # the name of earlier versions still works
    proc = run_cli(["run", str(config), "--launcher", "mpi", "run.workers=2", f"run.directory={run_dir}"],
                   engine_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launcher name 'mpi' is deprecated: use 'mpirun'" in proc.stderr
    _assert_mpirun_run(run_dir, proc.stdout, local, 2)


def test_an_openai_batch_file_gives_the_same_output_file_under_mpi(tmp_path, tiny_model, engine_env,
                                                                   openai_batch_local):
    mpi = openai_batch_config(tmp_path, tiny_model, "mpi")
    proc = run_cli(["run", str(mpi), "--launcher", "mpirun", "run.workers=2"], engine_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = openai_batch_local  # the same file run here on one worker
    assert len(expected) == 12 and [o["error"]["code"] for o in expected if o["error"]] == ["invalid_url", "model_not_found"]
    assert openai_output(tmp_path / "mpi") == expected
