"""What `plan`, `run` and `submit` catch before any GPU is touched, and what they say: model, tokenizer,
engine arguments, context length, unreadable files, overrides; the estimate; the live view's parts."""

import json
import os
import re
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import demo_docs, run_cli, write_config, write_jsonl
from shardinfer.config import config_from_dict
from shardinfer.errors import ConfigError
from shardinfer.ledger.rundir import RunDir
from shardinfer.planning.preflight import preflight, require
from shardinfer.reduce.report import _flag_slow
from shardinfer.telemetry.live import recent_rate, worker_live, write_worker_prom
from shardinfer.telemetry.metrics import WorkerMetrics

ENV_KEYS = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _config(tiny_model, **model):
    return config_from_dict({"input": {"path": "x.jsonl"}, "model": {"path": str(tiny_model), **model},
                             "run": {"env": ENV_KEYS}})


def _checks(cfg):
    return {c.name: c for c in preflight(cfg)}


def test_a_good_config_passes_every_check(tiny_model):
    checks = _checks(_config(tiny_model, max_model_len=512, engine_args={"enforce_eager": True}))
    assert {c.status for c in checks.values()} == {"ok"}, checks
    assert "known to vllm" in checks["model.engine_args"].message


@pytest.mark.parametrize("model,name,says", [
    ({"engine_args": {"tensor_paralel_size": 2}}, "model.engine_args", "tensor_paralel_size (did you mean tensor_parallel_size"),
    # the earlier name of engine_args: its arguments are checked the same way
    ({"vllm_args": {"tensor_paralel_size": 2}}, "model.engine_args", "tensor_paralel_size (did you mean tensor_parallel_size"),
    ({"max_model_len": 100000}, "model.max_model_len", "above the model's context length 8192"),
    ({"path": "/nowhere/model"}, "model.path", "not a model directory"),
    ({"path": "org/no-such-model-here"}, "model.path", "not in the Hugging Face cache, and the hub is off"),
])
def test_what_would_fail_on_the_gpu_node_fails_here(tiny_model, model, name, says):
    checks = _checks(_config(tiny_model, **model))
    assert checks[name].status == "fail" and says in checks[name].message
    with pytest.raises(ConfigError, match="pre-flight checks failed"):
        require(list(checks.values()))


def test_a_model_without_weights_or_tokenizer_fails(tiny_model, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((tiny_model / "config.json").read_text())
    checks = _checks(_config(tiny_model, path=str(bare)))
    assert checks["model.path"].status == "fail" and "no weight files" in checks["model.path"].message
    assert checks["model.tokenizer"].status == "fail"


def test_plan_and_run_refuse_a_bad_engine_argument_at_once(tmp_path, tiny_model, engine_env):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "hello"}])
    config = write_config(tmp_path / "c.yaml", corpus=corpus, model_dir=tiny_model, run_dir=tmp_path / "run",
                          model={"engine_args": {"enforce_eager": True, "tensor_paralel_size": 1}})
    for command in ("plan", "run"):
        started = time.time()
        proc = run_cli([command, str(config)], engine_env)
        assert proc.returncode == 2, proc.stderr
        assert "[fail] model.engine_args" in proc.stdout + proc.stderr or "model.engine_args" in proc.stderr
        assert "tensor_parallel_size" in proc.stdout + proc.stderr
        assert time.time() - started < 30  # no engine was loaded
    assert not (tmp_path / "run").exists()


def test_an_unreadable_input_file_is_named_with_the_fix(tmp_path, tiny_model, engine_env):
    good = tmp_path / "docs"
    good.mkdir()
    pq.write_table(pa.table({"text": ["a text"] * 100}), good / "a.parquet")
    data = (good / "a.parquet").read_bytes()
    (good / "b.parquet").write_bytes(data[: len(data) // 2])
    config = write_config(tmp_path / "c.yaml", corpus=good, model_dir=tiny_model, run_dir=tmp_path / "run")
    proc = run_cli(["run", str(config)], engine_env)
    assert proc.returncode == 2
    assert f"{good / 'b.parquet'} cannot be read as parquet" in proc.stderr and "Re-export the file" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_overrides_of_text_settings_are_taken_as_written(tiny_model):
    raw = {"input": {"path": "x"}, "model": {"path": str(tiny_model)}}
    cfg = config_from_dict(raw, ["prompt.user={text}", "prompt.system=Note: be brief", "input.id_column=null",
                                 "prompt.user='Title: {title}'"])
    assert cfg.prompt.user == "Title: {title}" and cfg.prompt.system == "Note: be brief"
    assert cfg.input.id_column is None
    with pytest.raises(ConfigError, match=r"\{END\} was read as a mapping: quote it"):
        config_from_dict(raw, ["sampling.stop={END}"])


def test_plan_gives_token_totals_and_an_estimate_labelled_as_one(tmp_path, tiny_model, engine_env):
    docs = demo_docs(20)
    corpus = write_jsonl(tmp_path / "d.jsonl", [{"text": d["text"][:2000]} for d in docs])
    config = write_config(tmp_path / "c.yaml", corpus=corpus, model_dir=tiny_model, run_dir=tmp_path / "run",
                          run={"expected_tokens_per_s": 1000, "gpu_hour_price": 3.6})
    proc = run_cli(["plan", str(config)], engine_env)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("estimate (not a measurement)"))
    tokens = int(line.split(": ")[1].split(" tokens")[0].replace(",", ""))
    assert tokens > 20 * 16  # prompts plus 16 output tokens per row
    assert "run.expected_tokens_per_s" in line
    assert f"{tokens / 1000 / 3600:.2f} device-hours" in line
    assert f"cost at run.gpu_hour_price: {tokens / 1000 / 3600 * 3.6:,.2f}" in proc.stdout
    totals = re.search(r"tokens \(estimated\): ([\d,]+) prompt \+ up to ([\d,]+) output", proc.stdout)
    prompt, output = (int(v.replace(",", "")) for v in totals.groups())
    assert output == 20 * 16 and prompt + output == tokens
    assert "[ok  ] model.engine_args" in proc.stdout
    assert "# example request (text)" in proc.stdout


def test_workers_are_seen_live_and_written_for_prometheus(tmp_path):
    now = time.time()
    m = WorkerMetrics(rank=3, world=4, launch=0, started_at=now - 100, first_generate_at=now - 90, units=2,
                      rows=40, prompt_tokens=9000, output_tokens=1000, device="cpu",
                      timeline={"start": now - 100, "bin_s": 1.0, "prompt": [0] * 40 + [100] * 60,
                                "output": [0] * 40 + [10] * 60})
    assert recent_rate(m.timeline, now, window_s=60) == pytest.approx(110)
    m.saved_at = now - 5
    assert worker_live(m, now, interval_s=30).state == "working"
    m.saved_at = now - 200
    assert worker_live(m, now, interval_s=30).state == "stalled"
    run_dir = RunDir(tmp_path)
    write_worker_prom(run_dir, m, "my-run", now)
    text = (tmp_path / "prometheus" / "worker-00003.prom").read_text()
    assert '# TYPE shardinfer_rows_total counter' in text
    assert 'shardinfer_rows_total{run="my-run",rank="3",launch="0"' in text and text.count("\n") == 21
    samples = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if not line.startswith("#")}
    assert samples["shardinfer_prompt_tokens_total"] == 9000 and samples["shardinfer_worker_finished"] == 0


def test_the_report_flags_a_worker_much_slower_than_the_others():
    rows = [{"launch": 0, "rank": r, "generation_s": 10.0, "generation_tokens_per_s": {"total": t}}
            for r, t in enumerate([1000.0, 1100.0, 950.0, 300.0])]
    assert [r["slow"] for r in _flag_slow(rows)] == [False, False, False, True]
    assert json.dumps(rows)


def test_a_missing_lora_directory_fails_before_any_work(tiny_model, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    check = _checks(_config(tiny_model, lora={"ad": str(tmp_path / "does-not-exist")}))["model.lora"]
    assert check.status == "fail" and "adapter 'ad'" in check.message and "is not a directory here" in check.message
    check = _checks(_config(tiny_model, lora={"ad": str(adapter)}))["model.lora"]
    assert check.status == "fail" and "has no adapter_config.json" in check.message
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    assert _checks(_config(tiny_model, lora={"ad": str(adapter)}))["model.lora"].status == "ok"


@pytest.mark.parametrize("command,override,says", [
    ("plan", "sampling.temperature=.nan", "sampling.temperature: must be a finite number, got nan"),
    ("run", "name=../../x", "name: '../../x' is not a simple name"),
    ("plan", "prompt.user={text!r}", r"placeholder {text!r} must be a plain column name"),
    ("submit", "slurm.partition=gpu\ntouch /tmp/owned", "slurm.partition: 'gpu\\ntouch /tmp/owned' holds a control "
                                                        "character"),
    ("submit", "run.env={'X;touch /tmp/owned': '1'}", "run.env: 'X;touch /tmp/owned' is not an environment variable"),
    ("plan", "model.lora={ad: /does/not/exist}", "model.lora: adapter 'ad': '/does/not/exist' is not a directory"),
    ("plan", os.fsdecode(b"prompt.system=caf\xe9"), "not UTF-8 text"),
])
def test_the_cli_refuses_bad_values_with_exit_2_before_any_work(tmp_path, tiny_model, engine_env, command, override,
                                                                says):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "hello"}])
    config = write_config(tmp_path / "c.yaml", corpus=corpus, model_dir=tiny_model, run_dir=tmp_path / "run")
    args = [command, str(config), override] + (["--dry-run"] if command == "submit" else [])
    proc = run_cli(args, engine_env, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert says in proc.stdout + proc.stderr and "Traceback" not in proc.stderr  # plan prints its checks
    assert not (tmp_path / "run").exists()
