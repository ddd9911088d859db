"""Pushing workers' metrics to real MLflow (a local file store) and Weights & Biases (offline mode)."""

import json
import struct

import pytest

from conftest import demo_docs, run_cli, write_config, write_jsonl

pytestmark = pytest.mark.engine


def test_workers_report_to_mlflow_and_wandb(tmp_path, tiny_model, engine_env, monkeypatch):
    corpus = write_jsonl(tmp_path / "d.jsonl", [{"text": d["text"][:400]} for d in demo_docs(6)])
    config = write_config(tmp_path / "tracked.yaml", corpus=corpus, model_dir=tiny_model, run_dir=tmp_path / "run",
                          model={"engine": "hf"}, sampling={"max_tokens": 4},
                          run={"directory": str(tmp_path / "run"), "workers": 1, "unit_tokens": 300,
                               "report_to": ["mlflow", "wandb"]})
    env = {**engine_env, "MLFLOW_TRACKING_URI": f"file://{tmp_path / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": "true",
           "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    proc = run_cli(["run", str(config)], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())

    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("tracked")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "rank-0" and run.data.params["engine"] == "hf"
    rows = client.get_metric_history(run.info.run_id, "rows")
    assert len(rows) >= 2 and rows[-1].value == report["rows"]["in"] == 6  # pushed as it went, then the total
    assert client.get_metric_history(run.info.run_id, "output_tokens")[-1].value == report["tokens"]["output"]

    [offline] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    history = _wandb_history(offline)
    assert len(history) >= 2 and history[0]["rows"] == 0
    assert history[-1]["rows"] == 6 and history[-1]["prompt_tokens"] == report["tokens"]["prompt"]


def _wandb_history(path):
    """The history rows of an offline W&B run file: a record log (7-byte header, 32 KiB blocks of
    records with a 7-byte header: crc, length, kind) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, pos, records, pending = path.read_bytes(), 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(pending)
    history = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return history


def test_a_tracker_that_is_not_installed_is_a_pre_flight_failure(tiny_model, monkeypatch):
    import importlib.util

    from shardinfer.config import config_from_dict
    from shardinfer.planning.preflight import preflight

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = config_from_dict({"input": {"path": "x"}, "model": {"path": str(tiny_model)}, "run": {"report_to": ["wandb"]}})
    [check] = [c for c in preflight(cfg) if c.name == "run.report_to"]
    assert check.status == "fail" and "pip install 'shardinfer[monitor]'" in check.message
