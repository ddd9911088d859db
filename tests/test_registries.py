"""Engines and launchers as registered peers: what they declare, how they are chosen, and a plugin
engine and launcher added without touching shardinfer (real worker processes, no real engine)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import shardinfer
from conftest import CPU_ENV, demo_docs, read_results, run_cli, write_config, write_jsonl
from shardinfer.config import ModelConfig, config_from_dict
from shardinfer.engines.registry import create_engine, engines, get_engine
from shardinfer.errors import ConfigError, RunError
from shardinfer.launch.base import LaunchRecord
from shardinfer.launch.registry import get_launcher, launcher_choices, launcher_of, launcher_type
from shardinfer.launch.start import last_launcher, launch, record_launch
from shardinfer.ledger.rundir import RunDir
from shardinfer.planning.validate import checked_from_dict
from shardinfer.telemetry.metrics import WorkerMetrics

PLUGINS = Path(__file__).parent / "plugins"


def test_engines_declare_extra_arguments_gpus_and_capabilities():
    known = engines()
    assert list(known)[:2] == ["vllm", "hf"]
    vllm, hf = known["vllm"], known["hf"]
    assert (vllm.extra, vllm.takes_args, vllm.modules) == ("vllm", True, ("vllm",))
    assert (hf.extra, hf.takes_args, hf.modules) == ("hf", True, ("torch", "transformers"))
    model = ModelConfig(path="m", engine_args={"tensor_parallel_size": 2, "pipeline_parallel_size": 2})
    assert vllm.replica_gpus(model, 8) == 4 and hf.replica_gpus(model, 8) == 8  # hf spreads over the node
    assert vllm.capabilities.continuous and not hf.capabilities.continuous
    assert vllm.args(model) == hf.args(model) == {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}
    assert vllm.bench.baseline == "vllm" and hf.bench.baseline == "hf-static"
    with pytest.raises(ConfigError, match="'tgi' is not a registered engine. Valid choices: vllm, hf"):
        get_engine("tgi")


def test_run_and_submit_choose_among_their_own_launchers(caplog):
    assert launcher_choices(on_cluster=False) == ["local", "mpirun"]
    assert launcher_choices(on_cluster=True) == ["sbatch", "slurm-mpi", "submitit"]
    assert launcher_choices() == ["local", "mpirun", "sbatch", "slurm-mpi", "submitit"]
    for name in launcher_choices():
        assert get_launcher(name).name == name
    assert not caplog.records
    with pytest.raises(ConfigError, match="'slurm' is not one of the launchers that run here: local, mpirun$"):
        get_launcher("slurm", on_cluster=False)


def test_the_old_launcher_names_still_work_with_a_deprecation_line(caplog):
    assert get_launcher("mpi", on_cluster=False).name == "mpirun"  # `run --launcher mpi`: mpirun here
    assert get_launcher("mpi", on_cluster=True).name == "slurm-mpi"  # `submit --launcher mpi`: one SLURM job
    assert get_launcher("mpi").name == "slurm-mpi"  # earlier versions recorded only the SLURM job as mpi
    assert [r.getMessage() for r in caplog.records] == [
        "launcher name 'mpi' is deprecated: use 'mpirun'",
        "launcher name 'mpi' is deprecated: use 'slurm-mpi'",
        "launcher name 'mpi' is deprecated: use 'slurm-mpi' (shardinfer submit) or 'mpirun' (shardinfer run); "
        "taking 'slurm-mpi'"]
    assert all(r.levelname == "WARNING" for r in caplog.records)
    assert launcher_type(on_cluster=False)("mpi") == "mpirun" and launcher_type(on_cluster=True)("mpi") == "slurm-mpi"
    assert launcher_type()("nope") == "nope"  # for argparse to refuse among the choices


def test_run_and_submit_help_offer_the_new_names_and_accept_the_old(capsys):
    from shardinfer.cli import build_parser

    parser = build_parser()
    for command, shown in (("run", "{local,mpirun}"), ("submit", "{sbatch,slurm-mpi,submitit}")):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        assert f"--launcher {shown}" in capsys.readouterr().out
    assert parser.parse_args(["run", "c.yaml", "--launcher", "mpi"]).launcher == "mpirun"
    assert parser.parse_args(["submit", "c.yaml", "--launcher", "mpi"]).launcher == "slurm-mpi"
    assert parser.parse_args(["resume", "r", "--launcher", "mpirun"]).launcher == "mpirun"
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "c.yaml", "--launcher", "sbatch"])
    assert "invalid choice: 'sbatch' (choose from 'local', 'mpirun')" in capsys.readouterr().err


@pytest.fixture
def plugin_env():
    return {**os.environ, **CPU_ENV, "PYTHONPATH": os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")]),
            "SHARDINFER_PLUGINS": "toy_plugin"}


def _echo_config(tmp_path, tiny_model, name="run", **run):
    docs = demo_docs(7)
    corpus = write_jsonl(tmp_path / "docs.jsonl", [{"id": d["id"], "text": d["text"][:600]} for d in docs])
    return write_config(tmp_path / f"{name}.yaml", corpus=corpus, model_dir=tiny_model, run_dir=tmp_path / name,
                        input={"path": str(corpus), "id_column": "id"}, model={"engine": "echo"},
                        sampling={"max_tokens": 5}, run={"directory": str(tmp_path / name), "unit_tokens": 400, **run})


@pytest.mark.processes
def test_a_plugin_adds_an_engine_and_a_launcher_without_touching_shardinfer(tmp_path, tiny_model, tokenizer,
                                                                            plugin_env):
    config = _echo_config(tmp_path, tiny_model)
    proc = run_cli(["run", str(config), "--launcher", "serial"], plugin_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_results(tmp_path / "run")
    assert [r["status"] for r in rows] == ["ok"] * 7
    for row in rows:  # the echo engine's answer, built from the prompt shardinfer rendered
        assert row["output_tokens"] == 5 and row["output"]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["model"]["engine"] == "echo" and report["versions"]["echo"] == "1.0"
    assert json.loads((tmp_path / "run" / "jobs.json").read_text())[0]["launcher"] == "serial"
    plan = run_cli(["plan", str(config), "--launcher", "serial"], plugin_env)
    assert plan.returncode == 0 and "(serial launcher)" in plan.stdout
    plan = run_cli(["plan", str(config), "model.engine_args.reverse=false"], plugin_env)  # the plugin's own
    assert plan.returncode == 0 and "[ok  ] model.engine_args: 1 argument(s) known to" in plan.stdout
    typo = run_cli(["plan", str(config), "model.engine_args.revers=false"], plugin_env)
    assert typo.returncode == 2 and "revers (did you mean reverse)" in typo.stdout + typo.stderr
    reference = run_cli(["config-reference"], plugin_env).stdout
    assert "(registered: vllm, hf, echo)" in reference
    without = run_cli(["run", str(config)], {k: v for k, v in plugin_env.items() if k != "SHARDINFER_PLUGINS"})
    assert without.returncode == 2
    assert "model.engine: 'echo' is not a valid choice. Valid choices: vllm, hf" in without.stderr


@pytest.mark.processes
def test_python_api_runs_in_process_and_every_handle_has_the_same_methods(tmp_path, tiny_model, plugin_env,
                                                                        monkeypatch):
    for key in ("PYTHONPATH", "SHARDINFER_PLUGINS", *CPU_ENV):
        monkeypatch.setenv(key, plugin_env[key])
    monkeypatch.syspath_prepend(str(PLUGINS))
    __import__("toy_plugin")
    echo = checked_from_dict({"input": {"path": "x"}, "model": {"path": str(tiny_model), "engine": "echo",
                                                               "engine_args": {"reverse": False}}})
    assert create_engine(echo, 512).reverse is False  # a plugin engine gets model.engine_args
    report = shardinfer.run(_echo_config(tmp_path, tiny_model, "api"), overrides=["run.workers=2"])
    assert report["rows"] == {"in": 7, "ok": 7, "truncated": 0, "failed": 0}
    assert sorted(w["rank"] for w in report["workers"]) == [0, 1]
    assert json.loads(json.dumps(report)) == json.loads((tmp_path / "api" / "report.json").read_text())
    handle = shardinfer.submit(_echo_config(tmp_path, tiny_model, "handle"), launcher="local")
    assert handle.launcher == "local" and handle.launch == 0 and handle.job_ids == []
    assert set(handle.states()) == {"worker 0"}
    assert handle.result()["rows"]["ok"] == 7
    assert handle.done() and handle.wait() == {"worker 0": "COMPLETED"}
    again = shardinfer.resume(tmp_path / "handle")  # nothing left: a launch with no worker, same report
    assert again.launch == 1 and again.result()["rows"]["ok"] == 7


@pytest.mark.processes
def test_a_second_launch_while_the_first_runs_is_refused(tmp_path, tiny_model, plugin_env, monkeypatch):
    for key in ("PYTHONPATH", "SHARDINFER_PLUGINS"):
        monkeypatch.setenv(key, plugin_env[key])
    monkeypatch.syspath_prepend(str(PLUGINS))
    __import__("toy_plugin")
    config = _echo_config(tmp_path, tiny_model, "busy")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        launch(config, launcher="serial").result()
        record_launch(RunDir(tmp_path / "busy"), LaunchRecord(launch=1, launcher="local", pid=sleeper.pid))
        with pytest.raises(RunError, match=rf"still being run by launch 1 \(local, process {sleeper.pid} on "):
            launch(config, launcher="serial")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert launch(config, launcher="serial").launch == 1  # the earlier launch's process is gone


def test_metrics_written_by_older_versions_still_load():
    old = {"rank": 1, "world": 2, "launch": 0, "host": "n1", "pid": 7, "started_at": 10.0, "finished_at": 25.0,
           "rows": 3, "prompt_tokens": 30, "output_tokens": 12, "gpus": "2,3", "retired_field": True}
    m = WorkerMetrics.from_json(old)
    assert (m.busy_s, m.gpu_count, m.total_tokens, m.drained_by, m.key) == (15.0, 2, 42, None, (0, 0))
    assert WorkerMetrics.from_json(m.to_json()) == m


def test_the_worker_job_count_is_the_launchers():
    cfg = config_from_dict({"input": {"path": "x"}, "model": {"path": "m", "engine_args": {"tensor_parallel_size": 2}},
                            "run": {"workers": 3}, "slurm": {"nodes": 2, "gpus_per_node": 8}})
    assert get_launcher("local").workers(cfg) == 3
    assert get_launcher("sbatch").workers(cfg) == get_launcher("submitit").workers(cfg) == 8


def test_launch_records_of_older_runs_load(tmp_path, caplog):
    old = {"launch": 2, "launcher": "mpi", "worker_job": "41", "reduce_job": "41", "submitted_at": 5.0}
    record = LaunchRecord.from_json(old)
    assert (record.job_ids, record.worker_job, record.reduce_job, record.pid) == (["41"], "41", "41", 0)
    assert not get_launcher("local").active(record) and time.time() > record.submitted_at
    # `resume` finds the launcher that made a launch recorded as "mpi": the SLURM MPI job (job ids),
    # or mpirun on the launching machine (none)
    assert launcher_of(record).name == "slurm-mpi"
    assert launcher_of(LaunchRecord(launch=0, launcher="mpi", pid=7)).name == "mpirun"
    assert launcher_of(LaunchRecord(launch=0, launcher="sbatch", job_ids=["3", "4"])).name == "sbatch"
    run_dir = RunDir(tmp_path)
    record_launch(run_dir, LaunchRecord(launch=0, launcher="local"))
    assert last_launcher(run_dir) == "local"
    jobs = json.loads(run_dir.jobs_json.read_text())
    run_dir.jobs_json.write_text(json.dumps([*jobs, old]))
    assert last_launcher(run_dir) == "slurm-mpi"
    run_dir.jobs_json.write_text(json.dumps([*jobs, {**old, "worker_job": None, "reduce_job": None, "pid": 9}]))
    assert last_launcher(run_dir) == "mpirun"
    assert not caplog.records  # nothing for the user to change in a run's records


@pytest.mark.processes
def test_every_worker_starts_alike_and_exits_with_the_code_of_its_error(tmp_path):
    """`python -m shardinfer.worker` (local and sbatch workers; submitit and MPI ranks call the same
    start_worker): rank from the named launcher, log in the run's worker log, exit code without a traceback."""
    run_dir = tmp_path / "run"
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "run.json").write_text("{}")  # enough to get as far as the allocation check
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SHARDINFER_", "OMPI_", "PMI"))}
    slurm = {**clean, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_NODEID": "0",
             "SLURM_JOB_ID": "77"}

    def worker(*args, env=clean):
        proc = subprocess.run([sys.executable, "-m", "shardinfer.worker", *map(str, args)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc.returncode, proc.stderr

    code, err = worker(run_dir, "--launcher", "nope")
    assert code == 2 and "config error: launcher 'nope' is not one of the launchers: local, mpirun" in err
    code, err = worker(run_dir, "--launcher", "sbatch")
    assert code == 1 and "SLURM_PROCID is not set: the sbatch launcher's workers are SLURM tasks" in err
    code, err = worker(tmp_path / "nothing", "--launcher", "local", "--rank", "0", "--world", "1")
    assert code == 1 and "is not a run directory (no run.json)" in err
    code, err = worker(run_dir, "--launcher", "sbatch", "--expect-world", "4", env=slurm)
    assert code == 1 and "[rank 1/2 " in err and "allocation mismatch: the config asks for 4 workers, the job has 2" in err
    assert "allocation mismatch" in (run_dir / "logs" / "worker-00001.log").read_text()
    code, err = worker(run_dir, "--expect-world", "4", env={**slurm, "SHARDINFER_LAUNCHER": "submitit"})
    assert code == 1 and "(submitit)" in err
