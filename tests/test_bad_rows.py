"""Corpora of bad rows through real worker processes (the echo plugin engine, no real engine): every
row comes back once with its reason, units of bad rows only are committed at once, and a worker
never holds more units than its engine works on."""

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import CPU_ENV, read_results, run_cli, write_config

PLUGINS = Path(__file__).parent / "plugins"

pytestmark = pytest.mark.processes


@pytest.fixture
def plugin_env():
    return {**os.environ, **CPU_ENV, "PYTHONPATH": os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")]),
            "SHARDINFER_PLUGINS": "toy_plugin"}


def _config(tmp_path: Path, tiny_model: Path, corpus: Path, name: str, **sections):
    run = {"directory": str(tmp_path / name), "workers": 1, "env": CPU_ENV, **sections.pop("run", {})}
    return write_config(tmp_path / f"{name}.yaml", corpus=corpus, model_dir=tiny_model, run_dir=tmp_path / name,
                        model={"engine": "echo"}, sampling={"max_tokens": 4}, run=run, **sections)


def _done_records(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "done").rglob("unit-*.json"))]


def _worker_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "metrics").glob("launch-*-worker-*.json"))]


def test_rows_that_all_fail_before_the_engine_are_committed_unit_by_unit(tmp_path, tiny_model, plugin_env):
    long_text = "word " * 1500  # far over max_model_len 512: fails before the engine with too_long=fail
    corpus = tmp_path / "long.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{i} {long_text}"}) + "\n" for i in range(240)))
    config = _config(tmp_path, tiny_model, corpus, "long", prompt={"too_long": "fail"},
                     run={"workers": 2, "max_unit_rows": 4})
    proc = run_cli(["run", str(config)], plugin_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_results(tmp_path / "long")
    assert len(rows) == 240 and {r["status"] for r in rows} == {"failed"}
    assert all(r["error"].startswith("too_long:") for r in rows)
    records = _done_records(tmp_path / "long")
    assert len(records) == 60
    assert len({r["worker"] for r in records}) == 2  # both workers committed units
    for m in _worker_metrics(tmp_path / "long"):
        assert m["units_held_max"] == 1  # nothing reaches the engine: one unit at a time
        mine = sorted(r["committed_at"] for r in records if r["worker"].endswith(f"rank{m['rank']}"))
        loaded = m["started_at"] + m["model_load_s"]
        assert mine[0] - loaded < 5.0  # the first commit follows the model load at once


def test_units_of_only_bad_rows_come_back_with_their_reasons(tmp_path, tiny_model, plugin_env):
    corpus = tmp_path / "blank.jsonl"
    corpus.write_bytes(b"\n".join([b'{"text": 5}', b'{"text": ["a"]}', b'not json', b'{"text": ""}',
                                   b'{"text": null}', b'{"text": "fine text"}']) + b"\n")
    config = _config(tmp_path, tiny_model, corpus, "bad", run={"max_unit_rows": 1})
    proc = run_cli(["run", str(config)], plugin_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_results(tmp_path / "bad")
    assert [r["status"] for r in rows] == ["failed"] * 5 + ["ok"]
    assert [r["error"].split(":")[0] for r in rows[:5]] == ["not_text", "not_text", "bad_json", "empty_text",
                                                             "empty_text"]


@pytest.mark.parametrize("column", [pa.array([1, 2, 3], pa.int64()), pa.array([None, None, None], pa.string())])
def test_a_parquet_file_without_usable_text_still_finishes(tmp_path, tiny_model, plugin_env, column):
    corpus = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"text": column}), corpus)
    config = _config(tmp_path, tiny_model, corpus, "typed")
    proc = run_cli(["run", str(config)], plugin_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["status"] for r in read_results(tmp_path / "typed")] == ["failed"] * 3


def test_run_files_are_never_group_or_world_writable_under_umask_000(tmp_path, tiny_model, plugin_env):
    import stat
    import subprocess
    import sys

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(6)))
    config = _config(tmp_path, tiny_model, corpus, "modes", run={"max_unit_rows": 2})
    proc = subprocess.run([sys.executable, "-m", "shardinfer.cli", "run", str(config)], env=plugin_env,
                          capture_output=True, text=True, preexec_fn=lambda: os.umask(0))
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths = [p for p in (tmp_path / "modes").rglob("*") if not p.is_symlink()]
    assert any(p.name == "run.json" for p in paths) and any(p.suffix == ".parquet" for p in paths)
    wide = [str(p) for p in paths if p.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)]
    assert not wide
