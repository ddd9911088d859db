import json

import pytest

from shardinfer.config import config_from_dict
from shardinfer.errors import ConfigError
from shardinfer.ledger.runstate import prepare_run, run_dir_for


def _cfg(tmp_path, **sampling):
    return config_from_dict({"name": "job", "input": {"path": str(tmp_path / "c.jsonl")},
                             "model": {"path": str(tmp_path / "m"), "max_model_len": 256},
                             "sampling": {"max_tokens": 8, **sampling}})


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _mark_committed(run_dir):
    """As if a worker had committed unit 0 (what decides whether a run may be planned anew)."""
    record = run_dir.done_record(0)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"rows": 1}))


def test_default_run_directory_never_mixes_configs(in_tmp):
    first, _ = prepare_run(_cfg(in_tmp), 1)
    _mark_committed(first)
    assert str(first.path) == "runs/job"
    assert run_dir_for(_cfg(in_tmp)).path == first.path  # same config: same run, continued
    second, _ = prepare_run(_cfg(in_tmp, max_tokens=9), 1)
    assert str(second.path).startswith("runs/job-") and second.path != first.path
    assert run_dir_for(_cfg(in_tmp, max_tokens=9)).path == second.path
    # settings that do not change results (workers, env) keep the run
    assert run_dir_for(config_from_dict({**_raw(in_tmp), "run": {"workers": 3}})).path == first.path


def _raw(tmp_path):
    return {"name": "job", "input": {"path": str(tmp_path / "c.jsonl")},
            "model": {"path": str(tmp_path / "m"), "max_model_len": 256}, "sampling": {"max_tokens": 8}}


def test_an_explicit_run_directory_with_another_config_is_refused(in_tmp):
    run_dir, _ = prepare_run(config_from_dict({**_raw(in_tmp), "run": {"directory": "out"}}), 1)
    _mark_committed(run_dir)
    changed = {**_raw(in_tmp), "run": {"directory": "out"}, "prompt": {"system": "new"}}
    with pytest.raises(ConfigError, match=r"out holds a run of a different config \(prompt.system changed\)"):
        prepare_run(config_from_dict(changed), 1)


def test_a_run_that_committed_nothing_is_planned_anew_with_a_changed_config(in_tmp):
    run_dir, _ = prepare_run(config_from_dict({**_raw(in_tmp), "run": {"directory": "out"}}), 1)
    (run_dir.logs / "worker-00000.log").write_text("the first try's log")
    changed = {**_raw(in_tmp), "run": {"directory": "out"}, "prompt": {"system": "new"}}
    again, _ = prepare_run(config_from_dict(changed), 1)
    assert again.path == run_dir.path
    assert json.loads(run_dir.run_json.read_text())["config"]["prompt"]["system"] == "new"
    assert (run_dir.logs / "worker-00000.log").read_text() == "the first try's log"  # logs are kept


def test_launch_settings_may_change_between_launches_of_one_run(in_tmp):
    """run.* and slurm.* do not change results: a resubmission with more nodes continues the run."""
    from shardinfer.config import results_settings
    from shardinfer.ledger.runstate import begin_launch, load_run

    explicit = {**_raw(in_tmp), "run": {"directory": "out"}}
    run_dir, plan = prepare_run(config_from_dict(explicit), 1)
    assert begin_launch(run_dir, plan, config_from_dict(explicit)) == 0
    wider = config_from_dict({**explicit, "run": {"directory": "out", "workers": 4, "env": {"X": "1"}},
                              "slurm": {"nodes": 8, "gpus_per_node": 4}, "name": "renamed"})
    assert results_settings(wider) == results_settings(config_from_dict(explicit))
    again, _ = prepare_run(wider, 32)  # same run, not refused
    assert again.path == run_dir.path
    assert begin_launch(again, plan, wider) == 1
    saved, _ = load_run(run_dir)  # the workers of launch 1 read its settings
    assert (saved.slurm.nodes, saved.run.workers, saved.run.env) == (8, 4, {"X": "1"})
    # without run.directory, the default directory is kept too
    first, _ = prepare_run(_cfg(in_tmp), 1)
    more_nodes = config_from_dict({**_raw(in_tmp), "slurm": {"nodes": 8}})
    assert run_dir_for(more_nodes).path == first.path


def test_a_run_begun_before_a_setting_existed_continues(in_tmp):
    """A run.json without a results setting added since (older version) reads it at its default."""
    explicit = {**_raw(in_tmp), "run": {"directory": "old"}}
    run_dir, _ = prepare_run(config_from_dict(explicit), 1)
    _mark_committed(run_dir)
    state = json.loads(run_dir.run_json.read_text())
    del state["config"]["model"]["hf_batch_tokens"], state["config"]["sampling"]["ignore_eos"]
    run_dir.run_json.write_text(json.dumps(state))
    assert prepare_run(config_from_dict(explicit), 1)[0].path == run_dir.path
    with pytest.raises(ConfigError, match=r"sampling.ignore_eos changed"):
        prepare_run(config_from_dict({**explicit, "sampling": {"max_tokens": 8, "ignore_eos": True}}), 1)
