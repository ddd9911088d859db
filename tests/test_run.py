"""End to end: the real CLI, real worker processes, real vLLM and transformers on the tiny model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import demo_docs, read_results, run_cli, write_config, write_jsonl, write_parquet

pytestmark = pytest.mark.engine


def bad_input_corpus(path: Path) -> tuple[Path, list[str], dict[str, str]]:
    """A JSONL corpus with every kind of bad row; returns the path, the ids in order, expected statuses."""
    docs = [{**d, "text": d["text"][:1200]} for d in demo_docs(24)]  # ~300 tokens: fit in 512
    lines = [
        json.dumps({"id": "good-0", "text": docs[0]["text"], "meta": 1}),
        json.dumps({"id": "empty", "text": "", "meta": 2}),
        json.dumps({"id": "null", "text": None, "meta": 3}),
        json.dumps({"id": "number", "text": 12345, "meta": 4}),
        '{"id": "latin1", "text": "caf\xe9 au lait, a drink described at length", "meta": 5}',
        json.dumps({"id": "huge", "text": docs[1]["text"] * 400, "meta": 6}),
        json.dumps({"id": "good-0", "text": "a duplicate id", "meta": 7}),
        '{"id": "broken", "text": "unterminated',
        json.dumps({"text": "no id here", "meta": 9}),
    ]
    lines += [json.dumps({"id": f"doc-{i}", "text": d["text"], "meta": d["title"]}) for i, d in enumerate(docs[2:])]
    with open(path, "wb") as fh:
        for line in lines:
            fh.write(line.encode("latin-1") if line.startswith('{"id": "latin1"') else line.encode())
            fh.write(b"\n")
    ids = ["good-0", "empty", "null", "number", "latin1", "huge", "good-0", f"{path.name}:7", f"{path.name}:8"]
    ids += [f"doc-{i}" for i in range(len(docs) - 2)]
    expected = {"empty": "failed", "null": "failed", "number": "failed", "huge": "truncated",
                f"{path.name}:7": "failed", f"{path.name}:8": "failed"}
    return path, ids, expected


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory, tiny_model, engine_env):
    tmp = tmp_path_factory.mktemp("bad")
    corpus, ids, expected = bad_input_corpus(tmp / "docs.jsonl")
    config = write_config(tmp / "bad.yaml", corpus=corpus, model_dir=tiny_model, run_dir=tmp / "run",
                          input={"path": str(corpus), "id_column": "id", "passthrough": ["meta"]},
                          run={"directory": str(tmp / "run"), "workers": 2, "unit_tokens": 1500,
                               "env": {"OMP_NUM_THREADS": "1"}, "gpu_hour_price": 3.0})
    proc = run_cli(["run", str(config)], engine_env)
    return proc, tmp / "run", ids, expected, config


def test_run_gives_one_result_row_per_input_row_in_order(bad_run):
    proc, run_dir, ids, expected, _ = bad_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_results(run_dir)
    assert [r["id"] for r in rows] == ids
    assert list(rows[0]) == ["id", "output", "status", "error", "prompt_tokens", "output_tokens",
                             "finish_reason", "meta"]
    for i, r in enumerate(rows):
        want = "failed" if i == 6 else expected.get(r["id"], "ok")
        assert r["status"] == want, (i, r)
        if r["status"] == "failed":
            assert r["error"] and r["output"] is None and r["finish_reason"] is None
        else:
            assert r["error"] is None and isinstance(r["output"], str)
            assert 0 < r["prompt_tokens"] <= 512 - 16 and 0 < r["output_tokens"] <= 16
            assert r["finish_reason"] in ("stop", "length")
    reasons = {r["id"] if i != 6 else "dup": (r["error"] or "").split(":")[0] for i, r in enumerate(rows)}
    assert reasons["empty"] == "empty_text" and reasons["null"] == "empty_text"
    assert reasons["number"] == "not_text" and reasons["dup"] == "duplicate_id"
    assert reasons["docs.jsonl:7"] == "bad_json" and reasons["docs.jsonl:8"] == "missing_id"
    assert rows[4]["status"] == "ok" and rows[4]["id"] == "latin1"  # invalid UTF-8 replaced, not dropped


def test_pass_through_column_of_mixed_types_survives(bad_run):
    _, run_dir, *_ = bad_run
    rows = read_results(run_dir)
    assert [r["meta"] for r in rows[:7]] == ["1", "2", "3", "4", "5", "6", "7"]
    assert rows[9]["meta"] == demo_docs(3)[2]["title"]


def test_report_counts_match_the_results(bad_run):
    proc, run_dir, *_ = bad_run
    rows = read_results(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    count = {s: sum(r["status"] == s for r in rows) for s in ("ok", "truncated", "failed")}
    assert report["rows"] == {"in": len(rows), **count}
    assert report["rows"]["in"] == sum(count.values())
    assert report["tokens"]["prompt"] == sum(r["prompt_tokens"] or 0 for r in rows)
    assert report["tokens"]["output"] == sum(r["output_tokens"] or 0 for r in rows)
    assert report["failed_by_reason"] == {"bad_json": 1, "duplicate_id": 1, "empty_text": 2,
                                          "missing_id": 1, "not_text": 1}
    assert len(report["workers"]) == 2 and sum(w["rows"] for w in report["workers"]) == len(rows)
    assert all(w["model_load_s"] > 0 for w in report["workers"])
    assert all(w["tokens_per_s"]["total"] > 0 for w in report["workers"] if w["rows"])
    assert report["tokens_per_s"]["total"] > 0 and report["time_s"]["generation"] > 0
    assert report["versions"]["vllm"] and report["model"]["engine"] == "vllm"
    assert "[rank 0/2 " in proc.stderr and "[rank 1/2 " in proc.stderr  # rank-prefixed log lines
    assert "shardinfer.progress: progress: " in proc.stderr  # plain progress lines off a terminal
    md = (run_dir / "report.md").read_text()
    assert "| rows in | ok | truncated | failed |" in md and "tokens/s (wall)" in md
    assert f"results: {(run_dir / 'results').absolute()}" in proc.stdout
    assert "report.md" in proc.stdout


def test_report_has_tokens_per_second_over_time_phases_cost_and_a_plot(bad_run):
    _, run_dir, *_ = bad_run
    report = json.loads((run_dir / "report.json").read_text())
    line = report["timeline"]
    bin_s = line["bin_s"]
    assert len(line["t"]) == len(line["input_tokens_per_s"]) == len(line["output_tokens_per_s"]) > 0
    assert round(sum(line["input_tokens_per_s"]) * bin_s) == report["tokens"]["prompt"]
    assert round(sum(line["output_tokens_per_s"]) * bin_s) == report["tokens"]["output"]
    phases = report["phases_s"]
    assert phases["startup_s"] >= min(w["model_load_s"] for w in report["workers"])
    assert phases["steady_s"] > 0 and phases["tail_s"] >= 0 and phases["steady_tokens_per_s"] > 0
    assert phases["startup_s"] + phases["steady_s"] + phases["tail_s"] <= report["time_s"]["wall"] + 0.5
    cost = report["cost"]
    hours = sum(w["wall_s"] for w in report["workers"]) / 3600  # CPU: one device per worker
    assert cost["device"] == "CPU worker" and cost["device_hours"] == pytest.approx(hours, rel=1e-3)
    assert cost["per_million_output_tokens"] == pytest.approx(3.0 * hours / report["tokens"]["output"] * 1e6, rel=1e-3)
    png = run_dir / report["plot"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    md = (run_dir / "report.md").read_text()
    assert "Phases: start-up" in md and "per million output tokens" in md and "](throughput.png)" in md


def test_rerun_of_a_finished_run_redoes_nothing(bad_run, engine_env):
    _, run_dir, _, _, config = bad_run
    before = sorted(p.name for p in (run_dir / "metrics").iterdir())
    proc = run_cli(["run", str(config)], engine_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (run_dir / "metrics").iterdir()) == before


def test_status_of_a_finished_run_as_json_and_watched(bad_run, engine_env):
    _, run_dir, ids, _, _ = bad_run
    status = json.loads(run_cli(["status", str(run_dir), "--json"], engine_env).stdout)
    assert status["finished"] and status["done"] == status["units"] and status["counts"]["rows"] == len(ids)
    assert [w["state"] for w in status["workers"]] == ["finished", "finished"] and not status["stalled"]
    watched = run_cli(["status", str(run_dir), "--watch", "0.1"], engine_env, timeout=60)
    assert watched.returncode == 0 and "finished: results and report written" in watched.stdout
    report = json.loads((run_dir / "report.json").read_text())
    assert {w["device"] for w in report["workers"]} == {"cpu"} and all("slow" in w for w in report["workers"])
    assert len(report["timeline"]["per_worker"]) == 2
    prom = (run_dir / "prometheus" / "run.prom").read_text()
    assert f'shardinfer_units{{run="bad",state="done"}} {status["units"]}' in prom


def test_rerun_with_another_config_is_refused(bad_run, engine_env):
    _, run_dir, _, _, config = bad_run
    proc = run_cli(["run", str(config), "sampling.max_tokens=8"], engine_env)
    assert proc.returncode == 2
    assert "holds a run of a different config (sampling.max_tokens changed)" in proc.stderr
    assert "Set run.directory to a new directory" in proc.stderr


def test_plan_shows_units_histogram_and_limits_without_a_model_load(bad_run, engine_env, tmp_path):
    _, _, _, _, config = bad_run
    proc = run_cli(["plan", str(config), f"run.directory={tmp_path / 'never'}"], engine_env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "# resolved config" in out and "max_model_len: 512" in out
    assert "units:" in out and "unit      0: rows 0-" in out
    assert "estimated prompt tokens per row:" in out
    assert "rows over the limit (estimated): 1" in out and "huge" in out
    assert "duplicate ids (later rows fail): 1" in out
    assert not (tmp_path / "never").exists()
    assert "vllm" not in proc.stderr.lower()  # no engine was started


def test_a_setting_the_engine_refuses_exits_2_and_the_fixed_config_replans_the_run(tmp_path, tiny_model, engine_env):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": d["text"][:500]} for d in demo_docs(4)])
    bad = write_config(tmp_path / "bad.yaml", corpus=corpus, model_dir=tiny_model, run_dir=tmp_path / "run",
                       model={"engine_args": {"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20,
                                              "kv_cache_dtype": "no-such-dtype"}},
                       run={"directory": str(tmp_path / "run"), "workers": 2, "env": {"OMP_NUM_THREADS": "1"}})
    proc = run_cli(["run", str(bad)], engine_env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "the 2 workers died on a config error" in proc.stderr and "kv_cache_dtype" in proc.stderr
    assert "Nothing was committed: fix the config and run again" in proc.stderr
    assert "Run the same command again" not in proc.stderr and "the others finished" not in proc.stderr
    good = write_config(tmp_path / "good.yaml", corpus=corpus, model_dir=tiny_model, run_dir=tmp_path / "run")
    proc = run_cli(["run", str(good)], engine_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no unit was committed: planning it anew" in proc.stderr
    assert len(read_results(tmp_path / "run")) == 4


def test_missing_text_column_fails_before_any_work(tmp_path, tiny_model, engine_env):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"body": "x"}])
    config = write_config(tmp_path / "c.yaml", corpus=corpus, model_dir=tiny_model, run_dir=tmp_path / "run")
    proc = run_cli(["run", str(config)], engine_env)
    assert proc.returncode == 2
    assert "input.text_column: column 'text' is not in" in proc.stderr and "Columns found: body" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_vllm_and_hf_give_the_same_greedy_tokens_in_float32(tmp_path, tiny_model, engine_env):
    docs = demo_docs(10, offset=30)
    corpus = write_parquet(tmp_path / "docs.parquet", [{"text": d["text"][:1000], "title": d["title"]} for d in docs])
    outputs = {}
    for engine in ("vllm", "hf"):
        config = write_config(tmp_path / f"{engine}.yaml", corpus=corpus, model_dir=tiny_model,
                              run_dir=tmp_path / engine, model={"engine": engine},
                              sampling={"max_tokens": 24, "ignore_eos": True},
                              prompt={"user": "About {title}: {text}"})
        proc = run_cli(["run", str(config)], engine_env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[engine] = read_results(tmp_path / engine)
    assert len(outputs["vllm"]) == len(outputs["hf"]) == 10
    for v, h in zip(outputs["vllm"], outputs["hf"]):
        assert v["status"] == h["status"] == "ok"
        assert v["output_tokens"] == h["output_tokens"] == 24
        assert v["prompt_tokens"] == h["prompt_tokens"]
        assert v["output"] == h["output"] and len(v["output"]) > 0
    assert len({r["output"] for r in outputs["vllm"]}) > 1  # not one constant answer


def test_hf_engine_on_csv_with_too_long_rows_failing(tmp_path, tiny_model, engine_env):
    docs = demo_docs(6)
    corpus = tmp_path / "docs.csv"
    with open(corpus, "w", newline="") as fh:
        import csv
        writer = csv.writer(fh)
        writer.writerow(["text", "n"])
        writer.writerows([[d["text"][:300], i] for i, d in enumerate(docs)] + [[docs[0]["text"] * 20, 99]])
    config = write_config(tmp_path / "c.yaml", corpus=corpus, model_dir=tiny_model, run_dir=tmp_path / "run",
                          model={"engine": "hf"}, prompt={"too_long": "fail"}, input={"path": str(corpus),
                                                                                     "passthrough": ["n"]})
    proc = run_cli(["run", str(config)], engine_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_results(tmp_path / "run")
    assert [r["id"] for r in rows] == [f"docs.csv:{i}" for i in range(7)]
    assert [r["status"] for r in rows] == ["ok"] * 6 + ["failed"]
    assert rows[6]["error"].startswith("too_long: prompt has") and rows[6]["n"] == "99"
    assert json.loads((tmp_path / "run" / "report.json").read_text())["versions"]["transformers"]


@pytest.fixture(scope="module")
def long_job(tmp_path_factory, tiny_model, engine_env):
    """A job long enough to interrupt, and its outputs from an uninterrupted run."""
    tmp = tmp_path_factory.mktemp("long")
    docs = demo_docs(240)
    corpus = write_jsonl(tmp / "docs.jsonl", [{"text": d["text"], "id": d["id"]} for d in docs])

    def config(name, **run):
        return write_config(tmp / f"{name}.yaml", corpus=corpus, model_dir=tiny_model, run_dir=tmp / name,
                            input={"path": str(corpus), "id_column": "id"},
                            sampling={"max_tokens": 96, "ignore_eos": True},
                            run={"directory": str(tmp / name), "workers": 2, "unit_tokens": 6000,
                                 "lease_timeout_s": 3, "env": {"OMP_NUM_THREADS": "1"}, **run})

    proc = run_cli(["run", str(config("clean", workers=1))], engine_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return config, tmp, [(r["id"], r["output"], r["status"]) for r in read_results(tmp / "clean")], docs


def _start(config, env):
    return subprocess.Popen([sys.executable, "-m", "shardinfer.cli", "run", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _triples(run_dir):
    return [(r["id"], r["output"], r["status"]) for r in read_results(run_dir)]


def test_kill_9_of_the_whole_run_then_resume_finishes_identically(long_job, engine_env):
    config, tmp, clean, _ = long_job
    run_dir = tmp / "crashed"
    launcher = _start(config("crashed", metrics_interval_s=0.5), engine_env)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((run_dir / "done").rglob("unit-*.json"))) < 2:
        time.sleep(0.05)
    _the_run_is_seen_live(run_dir)
    os.killpg(launcher.pid, signal.SIGKILL)  # launcher and workers, mid-unit
    launcher.communicate(timeout=60)
    assert not (run_dir / "results").exists()
    for record in (run_dir / "done").rglob("unit-*.json"):  # every committed unit has its complete part
        part = run_dir / "parts" / record.parent.name / f"{record.stem}.parquet"
        assert pq.read_table(part).num_rows == json.loads(record.read_text())["rows"]
    assert len(list((run_dir / "done").rglob("unit-*.json"))) < len(json.loads((run_dir / "plan.json").read_text())["units"])
    proc = run_cli(["resume", str(run_dir)], engine_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _triples(run_dir) == clean


def _the_run_is_seen_live(run_dir):
    """While the run runs: Prometheus files that count what the ledger holds (rewritten every
    0.5 s here), and the status `status --json` prints, taken in-process so the run is still
    running when the test kills it."""
    from shardinfer.ledger.rundir import RunDir
    from shardinfer.telemetry.status import run_status

    deadline, rows = time.time() + 30, 0.0
    while time.time() < deadline and not rows:
        time.sleep(0.2)
        prom = {p.name: p.read_text() for p in (run_dir / "prometheus").glob("*.prom")}
        rows = sum(float(line.rsplit(" ", 1)[1]) for text in prom.values() for line in text.splitlines()
                   if line.startswith("shardinfer_rows_total{"))
    assert {"worker-00000.prom", "worker-00001.prom"} <= set(prom)
    assert rows > 0
    finished = [line for text in prom.values() for line in text.splitlines()
                if line.startswith("shardinfer_worker_finished{")]
    assert len(finished) == 2 and any(line.endswith(" 0") for line in finished)  # one still works
    status = run_status(RunDir(run_dir)).to_json()
    assert status["done"] >= 2 and not status["finished"]
    assert {w["rank"] for w in status["workers"]} == {0, 1}
    # a worker with nothing left to claim may have finished already; none is stalled
    assert {w["state"] for w in status["workers"]} <= {"working", "loading", "finished"} and not status["stalled"]
    assert all(w["last_seen_s"] < 30 for w in status["workers"])


def test_resume_redoes_a_corrupt_part_and_refuses_a_changed_input(long_job, engine_env):
    config, tmp, clean, docs = long_job
    run_dir = tmp / "clean"
    part = run_dir / "parts" / "0000" / "unit-000002.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    proc = run_cli(["resume", str(run_dir)], engine_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "units [2] had a missing or corrupt part" in proc.stderr
    assert _triples(run_dir) == clean
    corpus = tmp / "docs.jsonl"
    os.utime(corpus, (time.time(), time.time() + 5))
    proc = run_cli(["resume", str(run_dir)], engine_env)
    assert proc.returncode == 2
    assert "was started with another model, engine, prompt, sampling or input" in proc.stderr
    assert "input.0.mtime" in proc.stderr and "run.directory=NEW_DIR" in proc.stderr


def test_retry_failed_reruns_only_failed_rows(tmp_path, tiny_model, engine_env):
    docs = demo_docs(12)
    records = [{"text": d["text"][:800]} for d in docs] + [{"text": docs[0]["text"] * 30}, {"text": ""}]
    corpus = write_jsonl(tmp_path / "d.jsonl", records)
    config = write_config(tmp_path / "c.yaml", corpus=corpus, model_dir=tiny_model, run_dir=tmp_path / "run",
                          prompt={"too_long": "fail"}, run={"directory": str(tmp_path / "run"), "unit_tokens": 1500,
                                                            "env": {"OMP_NUM_THREADS": "1"}})
    assert run_cli(["run", str(config)], engine_env).returncode == 0
    before = read_results(tmp_path / "run")
    done_before = {p.name: json.loads(p.read_text()) for p in (tmp_path / "run" / "done").rglob("unit-*.json")}
    proc = run_cli(["resume", str(tmp_path / "run"), "--retry-failed"], engine_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = read_results(tmp_path / "run")
    assert [(r["id"], r["status"], r["output"]) for r in after] == [(r["id"], r["status"], r["output"]) for r in before]
    assert [r["status"] for r in after[-2:]] == ["failed", "failed"]
    done_after = {p.name: json.loads(p.read_text()) for p in (tmp_path / "run" / "done").rglob("unit-*.json")}
    redone = {name for name in done_after if done_after[name]["launch"] != done_before[name]["launch"]}
    assert redone and all(done_before[n]["failed"] > 0 for n in redone)  # only units holding failed rows
    assert all(done_before[n]["failed"] == 0 for n in set(done_after) - redone)
    assert not list((tmp_path / "run" / "parts").rglob("*.retry-source.parquet"))


def test_empty_corpus_gives_an_empty_result_set(tmp_path, tiny_model, engine_env):
    corpus = write_jsonl(tmp_path / "empty.jsonl", [])
    config = write_config(tmp_path / "c.yaml", corpus=corpus, model_dir=tiny_model, run_dir=tmp_path / "run",
                          input={"path": str(corpus), "passthrough": ["lang"]})
    proc = run_cli(["run", str(config)], engine_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = pq.read_table(tmp_path / "run" / "results")
    assert table.num_rows == 0
    assert table.column_names == ["id", "output", "status", "error", "prompt_tokens", "output_tokens",
                                  "finish_reason", "lang"]
    assert json.loads((tmp_path / "run" / "report.json").read_text())["rows"]["in"] == 0


def test_template_columns_include_the_id_and_tolerate_missing_values(tmp_path, tiny_model, engine_env):
    corpus = write_jsonl(tmp_path / "d.jsonl", [{"key": "a", "title": "First", "body": "one two three"},
                                                {"key": "b", "body": "four five six"}])
    config = write_config(tmp_path / "c.yaml", corpus=corpus, model_dir=tiny_model, run_dir=tmp_path / "run",
                          model={"engine": "hf"}, prompt={"mode": "raw", "user": "[{key}] {title}: {text}"},
                          input={"path": str(corpus), "text_column": "body", "id_column": "key",
                                 "passthrough": ["title"]})
    proc = run_cli(["run", str(config)], engine_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_results(tmp_path / "run")
    assert [(r["id"], r["status"], r["title"]) for r in rows] == [("a", "ok", "First"), ("b", "ok", None)]
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert rows[0]["prompt_tokens"] == len(tok("[a] First: one two three")["input_ids"])
    assert rows[1]["prompt_tokens"] == len(tok("[b] : four five six")["input_ids"])
