"""``task: embed | classify | score | reward``: configs, pre-flight refusals, pair prompts, and whole
runs on the tiny pooling models compared with vLLM called directly and with transformers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from conftest import demo_docs, read_results, run_cli, write_config, write_jsonl
from shardinfer.config import config_from_dict
from shardinfer.errors import ConfigError

QUERY = "how do I read a file"


def _rows() -> list[dict[str, Any]]:
    """Documents with a pair column, and rows that must fail alone: empty text, a missing pair (a
    pair of the wrong type is a unit test: in JSONL a column of mixed types is read as JSON text)."""
    rows: list[dict[str, Any]] = [{"id": d["id"], "text": d["text"][:600], "pair": d["title"]}
                                  for d in demo_docs(36)]
    rows[5]["text"] = ""
    rows[9]["pair"] = None
    rows[20]["text"] = rows[20]["text"] * 20  # over the context: truncated (for score: a query that alone is)
    rows[22]["pair"] = rows[22]["text"] * 20  # a document over the context: cut
    return rows


def _config(tmp: Path, name: str, model_dir: Path, task: str, corpus: Path, **sections: Any) -> Path:
    inputs = {"path": str(corpus), "id_column": "id", **sections.pop("input", {})}
    return write_config(tmp / f"{name}.yaml", corpus=corpus, model_dir=model_dir, run_dir=tmp / name,
                        input=inputs, prompt={"too_long": "truncate", "system": None}, task=task, **sections)


TASKS = {  # run -> (model kind, extra config sections); embed-causal: the causal LM converted to embed
    "embed": ("embed", {}),
    "embed-causal": ("causal", {}),
    "classify": ("classifier", {}),
    "score": ("cross-encoder", {"input": {"pair_column": "pair"}}),
    "reward": ("reward", {"input": {"pair_column": "pair"}}),
}

DIRECT = """
import json, sys
from vllm import LLM, PoolingParams
from vllm.inputs import TokensPrompt
from transformers import AutoTokenizer
jobs = json.load(open(sys.argv[1]))
out = {}
for task, job in jobs.items():
    convert = {"convert": "embed"} if task == "embed-causal" else {}
    llm = LLM(model=job["model"], runner="pooling", dtype="float32", max_model_len=512, enforce_eager=True,
              kv_cache_memory_bytes=64 << 20, seed=0, **convert)
    if task.startswith("embed"):
        out[task] = [o.outputs.embedding for o in llm.embed(job["texts"], use_tqdm=False)]
    elif task == "classify":
        out[task] = [o.outputs.probs for o in llm.classify(job["texts"], use_tqdm=False)]
    elif task == "score":
        out[task] = [llm.score(q, d, use_tqdm=False)[0].outputs.score for q, d in zip(job["texts"], job["pairs"])]
    else:
        tok = AutoTokenizer.from_pretrained(job["model"])
        ids = [tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                       tokenize=True, return_dict=True)["input_ids"]
               for p, r in zip(job["texts"], job["pairs"])]
        outs = llm.classify([TokensPrompt(prompt_token_ids=i) for i in ids], use_tqdm=False,
                            pooling_params=PoolingParams(use_activation=False))
        out[task] = [o.outputs.probs[0] for o in outs]
    del llm
json.dump(out, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def pooling_runs(tmp_path_factory, pooling_models, tiny_model, engine_env):
    """Each task run through ``shardinfer run`` (vLLM) on the same rows, and the same
    rows' values from vLLM called directly."""
    tmp = tmp_path_factory.mktemp("pooling")
    corpus = write_jsonl(tmp / "rows.jsonl", _rows())
    models = {**pooling_models, "causal": tiny_model}
    configs = {task: _config(tmp, task, models[kind], task.removesuffix("-causal"), corpus,
                             run={"max_unit_rows": 8, "env": engine_env_cpu()}, **sections)
               for task, (kind, sections) in TASKS.items()}
    with ThreadPoolExecutor(3) as pool:  # the runs wait on their workers' start-up: three at a time
        procs = dict(zip(configs, pool.map(lambda c: run_cli(["run", str(c)], engine_env), configs.values())))
    results, jobs = {}, {}
    by_id = {row["id"]: row for row in _rows()}
    for task, (kind, _) in TASKS.items():
        assert procs[task].returncode == 0, procs[task].stderr[-3000:]
        results[task] = read_results(tmp / task)
        ok = [r for r in results[task] if r["status"] == "ok"]
        jobs[task] = {"model": str(models[kind]), "ids": [r["id"] for r in ok],
                      "texts": [by_id[r["id"]]["text"] for r in ok], "pairs": [by_id[r["id"]]["pair"] for r in ok]}
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, "-c", DIRECT, str(tmp / "jobs.json"), str(tmp / "direct.json")],
                          env=engine_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, results, jobs, json.loads((tmp / "direct.json").read_text())


def engine_env_cpu() -> dict[str, str]:
    from conftest import CPU_ENV

    return dict(CPU_ENV)


@pytest.mark.engine
@pytest.mark.parametrize("task", list(TASKS))
def test_pipeline_values_equal_vllm_called_directly(pooling_runs, task):
    _, results, jobs, direct = pooling_runs
    rows = {r["id"]: r for r in results[task]}
    assert len(results[task]) == len(_rows()) and len(rows) == len(_rows())  # every row once
    assert len(jobs[task]["ids"]) >= 30
    for row_id, expected in zip(jobs[task]["ids"], direct[task]):
        row = rows[row_id]
        if task.startswith("embed"):
            assert len(row["embedding"]) == 128
            assert max(abs(a - b) for a, b in zip(row["embedding"], expected)) < 1e-4
        elif task == "classify":
            assert list(row["probs"]) == ["negative", "neutral", "positive"]
            assert max(abs(a - b) for a, b in zip(row["probs"].values(), expected)) < 1e-4
            assert row["label"] == max(row["probs"], key=row["probs"].get)
        else:
            assert row["score"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.engine
def test_bad_rows_fail_alone_and_long_rows_are_truncated(pooling_runs):
    _, results, _, _ = pooling_runs
    for task, rows in results.items():
        by_id = {r["id"]: r for r in rows}
        ids = [r["id"] for r in _rows()]
        assert by_id[ids[5]]["status"] == "failed" and by_id[ids[5]]["error"].startswith("empty_text")
        assert by_id[ids[20]]["status"] == "truncated" and by_id[ids[20]]["prompt_tokens"] <= 512
        if task == "score":
            assert by_id[ids[22]]["status"] == "truncated" and by_id[ids[22]]["prompt_tokens"] == 512
        if task in ("score", "reward"):
            assert by_id[ids[9]]["error"].startswith("missing_pair") and "'pair'" in by_id[ids[9]]["error"]
        if task == "reward":  # a response that alone is over the context cannot be cut
            assert by_id[ids[22]]["error"].startswith("too_long")
        failed = sum(r["status"] == "failed" for r in rows)
        assert failed == {"score": 2, "reward": 3}.get(task, 1)


@pytest.mark.engine
def test_results_have_the_task_columns_and_the_report_counts_them(pooling_runs):
    tmp, _, _, _ = pooling_runs
    columns = {task: pq.read_schema(tmp / task / "results" / "part-00000.parquet") for task in TASKS}
    assert str(columns["embed"].field("embedding").type) == "fixed_size_list<element: float>[128]"
    assert str(columns["classify"].field("probs").type) == "struct<negative: float, neutral: float, positive: float>"
    assert str(columns["score"].field("score").type) == "double"
    for schema in columns.values():
        assert "output" not in schema.names and {"id", "status", "error", "prompt_tokens"} <= set(schema.names)
    import datasets
    import polars

    frame = polars.read_parquet(tmp / "embed" / "results" / "*.parquet")
    assert frame.height == len(_rows()) and frame.schema["embedding"] == polars.Array(polars.Float32, 128)
    loaded = datasets.load_dataset("parquet", data_files=str(tmp / "embed" / "results" / "*.parquet"), split="train",
                                   cache_dir=str(tmp / "hf-cache"))
    assert loaded.num_rows == len(_rows()) and len(loaded[0]["embedding"]) == 128
    report = json.loads((tmp / "embed" / "report.json").read_text())
    assert report["task"] == "embed" and report["rows"]["in"] == len(_rows())
    assert report["embeddings"]["dimensions"] == 128
    assert report["embeddings"]["bytes"] == 4 * 128 * (report["rows"]["ok"] + report["rows"]["truncated"])
    assert report["throughput"]["rows_per_s"] > 0


@pytest.mark.engine
def test_hf_engine_gives_vllm_values(pooling_runs, pooling_models, engine_env):
    tmp, results, _, _ = pooling_runs
    for task in ("classify", "score"):  # embed: the kill -9 test compares the hf engine's with vLLM's
        kind, sections = TASKS[task]
        config = _config(tmp, f"hf-{task}", pooling_models[kind], task, tmp / "rows.jsonl",
                         model={"engine": "hf"}, **sections)
        proc = run_cli(["run", str(config)], engine_env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        hf = {r["id"]: r for r in read_results(tmp / f"hf-{task}")}
        column = {"embed": "embedding", "classify": "probs", "score": "score"}[task]
        for row in results[task]:
            assert hf[row["id"]]["status"] == row["status"]
            if row["status"] == "failed":
                continue
            a, b = row[column], hf[row["id"]][column]
            values = zip(a.values(), b.values()) if task == "classify" else zip(a, b) if task == "embed" else [(a, b)]
            assert max(abs(x - y) for x, y in values) < 1e-4


@pytest.mark.engine
def test_kill_9_mid_run_then_resume_embeds_every_row_once(tmp_path, pooling_models, engine_env, pooling_runs):
    _, results, _, _ = pooling_runs
    rows = [dict(row, id=f"{row['id']}-{i}") for i, row in enumerate(_rows() * 4)]
    corpus = write_jsonl(tmp_path / "many.jsonl", rows)
    config = _config(tmp_path, "killed", pooling_models["embed"], "embed", corpus, model={"engine": "hf"},
                     run={"workers": 2, "max_unit_rows": 4, "env": engine_env_cpu()})
    run_dir = tmp_path / "killed"
    launcher = subprocess.Popen([sys.executable, "-m", "shardinfer.cli", "run", str(config)], env=engine_env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((run_dir / "done").rglob("unit-*.json"))) < 3:
        time.sleep(0.05)
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.communicate(timeout=60)
    assert not (run_dir / "results").exists()
    proc = run_cli(["resume", str(run_dir)], engine_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = read_results(run_dir)
    assert [r["id"] for r in out] == [r["id"] for r in rows]  # every row once, in input order
    reference = {r["id"]: r["embedding"] for r in results["embed"]}
    for row in out:
        expected = reference[row["id"].rsplit("-", 1)[0]]
        assert (row["embedding"] is None) == (expected is None)
        if expected is not None:
            assert max(abs(a - b) for a, b in zip(row["embedding"], expected)) < 1e-4


@pytest.mark.processes
def test_a_model_that_cannot_do_the_task_is_refused_before_any_work(tmp_path, pooling_models, tiny_model,
                                                                     engine_env):
    corpus = write_jsonl(tmp_path / "rows.jsonl", _rows()[:4])
    cases = [("classify", tiny_model, "has no classification head"),
             ("generate", pooling_models["classifier"], "cannot generate text"),
             ("score", pooling_models["classifier"], "is not a cross-encoder"),
             ("embed", pooling_models["reward"], "classification head")]
    for task, model, expected in cases:
        config = _config(tmp_path, f"refused-{task}", model, task, corpus, input={"pair_column": "pair"}
                         if task == "score" else {})
        proc = run_cli(["run", str(config)], engine_env)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert expected in proc.stderr and "pre-flight" in proc.stderr
        assert not (tmp_path / f"refused-{task}" / "plan.json").exists()


@pytest.mark.parametrize("raw, message", [
    ({"task": "score"}, "give the pairs one way"),
    ({"task": "classify", "pooling": {"dimensions": 8}}, "pooling.dimensions: is a setting of task embed"),
    ({"task": "generate", "pooling": {"query": "q"}}, "pooling.query: is a setting of task score"),
    ({"task": "reward"}, "say what is scored"),
    ({"task": "embed", "sampling": {"n": 2}}, None),
])
def test_task_settings_are_checked(raw, message):
    base = {"input": {"path": "x.jsonl"}, "model": {"path": "m"}}
    if message is None:
        from shardinfer.planning.validate import checked_from_dict

        with pytest.raises(ConfigError, match="sampling.n: a generation setting"):
            checked_from_dict({**base, **raw})
        return
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**base, **raw})


def test_pooling_tasks_read_text_raw_unless_asked():
    base = {"input": {"path": "x.jsonl"}, "model": {"path": "m"}}
    assert config_from_dict({**base, "task": "embed"}).prompt.mode == "raw"
    assert config_from_dict({**base, "task": "embed", "prompt": {"mode": "chat"}}).prompt.mode == "chat"
    assert config_from_dict(base).prompt.mode == "chat"


def test_a_config_without_a_task_keeps_its_fingerprint():
    """Settings added for pooling tasks are left out of a generate config's results settings, so
    runs begun before them still continue."""
    from shardinfer.config import results_settings

    settings = results_settings(config_from_dict({"input": {"path": "x.jsonl"}, "model": {"path": "m"}}))
    assert "task" not in settings and "pooling" not in settings and "pair_column" not in settings["input"]


def test_pairs_are_tokenized_as_the_tokenizer_pairs_them(tokenizer):
    from shardinfer.planning.validate import checked_from_dict
    from shardinfer.requests.builder import RequestBuilder

    cfg = checked_from_dict({"task": "score", "input": {"path": "x.jsonl", "pair_column": "doc"},
                             "model": {"path": "cross-encoder"}})
    builder = RequestBuilder(cfg, tokenizer, max_model_len=40)
    prompts = builder.build(["import o", "q", "q", "short query", "q"],
                            [{"doc": "s"}, {"doc": None}, {"doc": ""}, {"doc": "word " * 100}, {"doc": 7}])
    assert prompts[0].token_ids == tokenizer(text="import o", text_pair="s")["input_ids"]
    assert prompts[1].problem.startswith("missing_pair") and prompts[2].problem.startswith("empty_text")
    assert prompts[4].problem.startswith("not_text: column 'doc' (input.pair_column) holds int")
    assert prompts[3].truncated and len(prompts[3].token_ids) == 40
    query = tokenizer("short query", add_special_tokens=False)["input_ids"]
    assert prompts[3].token_ids[:len(query)] == query  # the query is kept whole, the document cut
    [long_query] = builder.build(["query " * 100], [{"doc": "d"}])  # a query that alone fills the context
    assert long_query.truncated and len(long_query.token_ids) == 40


def test_reward_conversations_keep_the_response_when_cut(tokenizer):
    from shardinfer.planning.validate import checked_from_dict
    from shardinfer.requests.builder import RequestBuilder

    cfg = checked_from_dict({"task": "reward", "input": {"path": "x.jsonl", "pair_column": "answer"},
                             "model": {"path": "reward-model"}})
    builder = RequestBuilder(cfg, tokenizer, max_model_len=64)
    short, long = builder.build(["hi", "tell me " * 200], [{"answer": "hello"}, {"answer": "the final answer"}])
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert short.token_ids == tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    assert long.truncated and len(long.token_ids) <= 64
    assert "the final answer" in tokenizer.decode(long.token_ids)


def test_a_pooling_config_without_its_model_directory_still_loads(tmp_path):
    """A model named by hub id (no local config.json) is not refused: what it can do is checked when it loads."""
    from shardinfer.models.tasks import pooled_shape, task_problem

    cfg = config_from_dict({"task": "classify", "input": {"path": "x.jsonl"}, "model": {"path": "org/some-model"}})
    assert task_problem(cfg) is None
    assert pooled_shape(cfg).labels == ()


def test_a_row_the_prompt_builder_chokes_on_fails_alone():
    """If building a batch raises, the rows are built one by one and only the one that raises fails."""
    from types import SimpleNamespace

    from shardinfer.requests.prompts import Prompt
    from shardinfer.worker.loop import Worker

    class Choking:
        def build(self, texts, columns):
            if "bad" in texts:
                raise ValueError("the tokenizer cannot take this")
            return [Prompt([1, 2]) for _ in texts]

    worker = SimpleNamespace(builder=Choking())
    worker._build_one = lambda text, cols: Worker._build_one(worker, text, cols)
    built = Worker._build(worker, ["good", "bad", "fine"], [{}, {}, {}])
    assert [p.token_ids for p in built] == [[1, 2], None, [1, 2]]
    assert built[1].problem == "prompt_error: ValueError: the tokenizer cannot take this"


def test_embeddings_of_float16_and_failed_rows_keep_the_column_type():
    import pyarrow as pa

    from shardinfer.engines.base import Pooled
    from shardinfer.models.tasks import PooledShape
    from shardinfer.requests.prompts import Prompt
    from shardinfer.results import ID, ROW, ResultExtras, result_table

    rows = pa.table({ROW: [0, 1, 2], ID: ["a", "b", "c"]})
    extras = ResultExtras(pooled=PooledShape("embed", dim=4, dtype="float16"))
    table = result_table(rows, [None, "empty_text: no text", None], [Prompt([1, 2]), None, Prompt([3])],
                         [Pooled([0.5, 0.25, 0.0, 1.0]), None, RuntimeError("boom")], [], extras)
    assert str(table.schema.field("embedding").type) == "fixed_size_list<item: halffloat>[4]"
    assert table.column("embedding").to_pylist() == [[0.5, 0.25, 0.0, 1.0], None, None]
    assert table.column("status").to_pylist() == ["ok", "failed", "failed"]
    assert table.column("error").to_pylist()[2] == "engine_error: RuntimeError: boom"
    assert table.column("prompt_tokens").to_pylist() == [2, None, 1]


def test_dimensions_of_a_model_that_is_not_matryoshka_are_refused(tmp_path):
    from shardinfer.models.tasks import task_problem

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3Model"], "hidden_size": 128}))
    cfg = config_from_dict({"task": "embed", "input": {"path": "x.jsonl"}, "model": {"path": str(tmp_path)},
                            "pooling": {"dimensions": 64}})
    assert "is not a Matryoshka model" in task_problem(cfg)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3Model"], "hidden_size": 128,
                                                      "matryoshka_dimensions": [32, 64, 128]}))
    assert task_problem(cfg) is None


def test_a_score_column_passes_through_a_generate_run_but_not_a_score_run():
    from shardinfer.planning.validate import checked_from_dict

    base = {"input": {"path": "x.jsonl", "passthrough": ["score"]}, "model": {"path": "m"}}
    assert checked_from_dict(base).input.passthrough == ["score"]
    with pytest.raises(ConfigError, match="'score' is a results column already"):
        checked_from_dict({**base, "task": "score", "pooling": {"query": "q"}})
