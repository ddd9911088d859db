import json

import pytest

from shardinfer.config import config_from_dict
from shardinfer.errors import RunError
from shardinfer.runstate import prepare_run, run_dir_for


def _cfg(tmp_path, **sampling):
    return config_from_dict({"name": "job", "input": {"path": str(tmp_path / "c.jsonl")},
                             "model": {"path": str(tmp_path / "m"), "max_model_len": 256},
                             "sampling": {"max_tokens": 8, **sampling}})


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_default_run_directory_never_mixes_configs(in_tmp):
    first, _ = prepare_run(_cfg(in_tmp), 1)
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
    prepare_run(config_from_dict({**_raw(in_tmp), "run": {"directory": "out"}}), 1)
    changed = {**_raw(in_tmp), "run": {"directory": "out"}, "prompt": {"system": "new"}}
    with pytest.raises(RunError, match=r"out holds a run of a different config \(prompt.system changed\)"):
        prepare_run(config_from_dict(changed), 1)
