"""OpenAI batch lines of the pooling endpoints (``/v1/embeddings``, ``/score``, ``/rerank``): parsing,
the engine requests of a line of several inputs, the output lines' shapes, and whole runs on the tiny
embedding model and cross-encoder compared field for field with vLLM's own ``run_batch``."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pytest

from conftest import REPO, read_results, run_cli, write_config
from shardinfer.config import config_from_dict
from shardinfer.engines.base import Pooled
from shardinfer.models.tasks import PooledShape
from shardinfer.requests.builder import RequestBuilder
from shardinfer.requests.openai_batch import output_line
from shardinfer.requests.prompts import Prompt
from shardinfer.results import ID, ROW, ResultExtras, result_table
from shardinfer.worker.loop import InFlight

EXAMPLE = REPO / "jobs" / "data" / "openai-batch-embeddings.jsonl"
MODEL = "/models/tiny"  # served as "/models/tiny" and "tiny"
USAGE_KEYS = ["prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details"]


def _line(url: str, **body: Any) -> str:
    return json.dumps({"custom_id": "x", "method": "POST", "url": url, "body": body})


def _builder(tokenizer: Any, task: str, **pooling: Any) -> RequestBuilder:
    cfg = config_from_dict({"task": task, "input": {"path": "requests.jsonl", "format": "openai-batch"},
                            "model": {"path": MODEL, "max_model_len": 64}, "sampling": {"max_tokens": 8},
                            "pooling": pooling})
    return RequestBuilder(cfg, tokenizer, max_model_len=64)


def _build(builder: RequestBuilder, *lines: str) -> list[Prompt]:
    return builder.build(list(lines), [{} for _ in lines])


# ---- requests ---------------------------------------------------------------------------------


def test_an_embeddings_line_is_one_engine_request_per_input(tokenizer):
    one, texts, ids, id_lists = _build(
        _builder(tokenizer, "embed"),
        _line("/v1/embeddings", model="tiny", input="a short text"),
        _line("/v1/embeddings", input=["one", "two words"], encoding_format="base64"),
        _line("/v1/embeddings", model=MODEL, input=[5, 6, 7]),
        _line("/v1/embeddings", model=MODEL, input=[[1, 2], [3]]))
    assert [len(p.parts or ()) for p in (one, texts, ids, id_lists)] == [1, 2, 1, 2]
    assert one.parts[0].token_ids == tokenizer("a short text")["input_ids"]
    assert [p.token_ids for p in texts.parts] == tokenizer(["one", "two words"])["input_ids"]
    assert ids.parts[0].token_ids == [5, 6, 7] and [p.token_ids for p in id_lists.parts] == [[1, 2], [3]]
    assert one.model == "tiny" and texts.model == MODEL  # a line without a model is the run's
    assert one.endpoint == "/v1/embeddings" and one.token_ids is None and one.runnable
    assert texts.prompt_tokens == sum(len(p.token_ids) for p in texts.parts)
    assert texts.line_options == {"encoding_format": "base64", "top_n": None, "documents": None}


def test_score_and_rerank_lines_pair_their_texts_as_vllm_does(tokenizer):
    builder = _builder(tokenizer, "score")
    docs = ["open() returns a file", "lists are mutable", "the os module"]
    one_to_n, n_to_n, rerank = _build(
        builder,
        _line("/v1/score", queries="read a file", documents=docs),
        _line("/score", data_1=["q one", "q two"], data_2=["d one", "d two"]),
        _line("/rerank", query="read a file", documents=docs, top_n=2))
    assert [p.token_ids for p in one_to_n.parts] == [tokenizer(text="read a file", text_pair=d)["input_ids"]
                                                     for d in docs]
    assert [p.token_ids for p in n_to_n.parts] == [tokenizer(text=q, text_pair=d)["input_ids"]
                                                   for q, d in [("q one", "d one"), ("q two", "d two")]]
    assert one_to_n.cosine_queries is None and len(rerank.parts) == 3
    assert rerank.line_options == {"encoding_format": None, "top_n": 2, "documents": docs}
    # an embedding model scores by cosine: each text is embedded once, the query first
    bi = _build(_builder(tokenizer, "embed"), _line("/v1/score", queries="read a file", documents=docs))[0]
    assert [p.token_ids for p in bi.parts] == tokenizer(["read a file", *docs])["input_ids"]
    assert bi.cosine_queries == 1


BAD_LINES = [  # (task, url, body, error code, part of the message)
    ("generate", "/v1/embeddings", {"input": "x"}, "invalid_url",
     "Model does not support endpoint: /v1/embeddings; this run has task generate: run the /v1/embeddings "
     "lines with task: embed"),
    ("score", "/v1/embeddings", {"input": "x"}, "invalid_url", "Model does not support endpoint: /v1/embeddings"),
    ("embed", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "invalid_url",
     "run chat and completion lines with task: generate"),
    ("embed", "/v1/classify", {"input": "x"}, "invalid_url", "'/v1/classify' is not supported; use"),
    ("embed", "/v1/embeddings", {"model": "other", "input": "x"}, "model_not_found", "'other' is not loaded"),
    ("embed", "/v1/embeddings", {"input": "x", "dimensions": 16}, "unsupported_parameter",
     "run these lines with pooling.dimensions: 16"),
    ("embed", "/v1/embeddings", {"input": "x", "encoding_format": "bytes"}, "invalid_request", "float or base64"),
    ("embed", "/v1/embeddings", {"input": []}, "invalid_request", "body.input: expected a text"),
    ("embed", "/v1/embeddings", {"input": [1, "a"]}, "invalid_request", "body.input[0]: expected a text"),
    ("embed", "/v1/embeddings", {"input": ""}, "invalid_request", "body.input[0]: the prompt is empty"),
    ("embed", "/v1/embeddings", {"input": "word " * 80}, "context_length_exceeded", "max_model_len 64"),
    ("embed", "/v1/embeddings", {"input": "x", "truncate_prompt_tokens": 5}, "unsupported_parameter",
     "body.truncate_prompt_tokens"),
    ("embed", "/v1/embeddings", {"input": "x", "temperature": 1}, "unsupported_parameter", "body.temperature"),
    ("score", "/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "invalid_request", "1:1, 1:N or N:N"),
    ("score", "/score", {"text_1": "a"}, "invalid_request", "a score request gives two lists"),
    ("score", "/score", {"text_1": "a", "text_2": []}, "invalid_request", "body.text_2: at least one text"),
    ("score", "/rerank", {"query": "a", "documents": ["b"], "top_n": -1}, "invalid_request", "body.top_n"),
    ("score", "/rerank", {"query": "a", "documents": ["b"], "use_activation": False}, "unsupported_parameter",
     "pooling.activation: False"),
    ("score", "/rerank", {"query": "a", "documents": [{"content": [{"type": "text", "text": "b"}]}]},
     "unsupported_parameter", "multimodal"),
    ("score", "/v1/score", {"text_1": "word " * 40, "text_2": "word " * 40}, "context_length_exceeded", "pair 0"),
]


@pytest.mark.parametrize(("task", "url", "body", "code", "message"), BAD_LINES,
                         ids=[f"{t}{u}-{c}-{i}" for i, (t, u, _, c, _) in enumerate(BAD_LINES)])
def test_a_line_that_cannot_run_fails_alone_naming_the_field_and_the_fix(tokenizer, task, url, body, code, message):
    good = {"generate": _line("/v1/chat/completions", model="tiny", messages=[{"role": "user", "content": "hi"}]),
            "embed": _line("/v1/embeddings", input="a"), "score": _line("/score", text_1="a", text_2="b")}[task]
    bad, ok = _build(_builder(tokenizer, task), _line(url, **body), good)
    assert bad.problem is not None and bad.problem.startswith(f"{code}: "), bad.problem
    assert message in bad.problem and not bad.runnable
    assert ok.runnable, ok.problem


def test_dimensions_and_activation_equal_to_the_runs_are_accepted(tokenizer):
    prompt, = _build(_builder(tokenizer, "embed", dimensions=16, normalize=True),
                     _line("/v1/embeddings", input="x", dimensions=16, use_activation=True, user="u", priority=0))
    assert prompt.problem is None and prompt.runnable


# ---- rows of several inputs -------------------------------------------------------------------


def test_a_row_of_several_inputs_gets_its_values_in_input_order(tokenizer):
    builder = _builder(tokenizer, "embed")
    embed, score = _build(builder, _line("/v1/embeddings", input=["a", "b", "c"]),
                          _line("/score", queries="q", documents=["d1", "d2"]))
    flight = InFlight(unit=None, rows=None, problems=[None, None], prompts=[embed, score],
                      previous=None, sent=[0, 1], results=[None, None])
    assert [(row, part) for row, part, _ in flight.requests] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    values = {0: [1.0, 0.0], 1: [0.0, 1.0], 2: [0.6, 0.8], 3: [1.0, 0.0], 4: [1.0, 0.0], 5: [0.0, 1.0]}
    for index in (5, 2, 0, 3, 4, 1):  # the engine finishes them in any order
        flight.place(index, Pooled(values[index]))
    assert flight.waiting == 0
    rows = pa.table({ROW: [0, 1], ID: ["e", "s"]})
    table = result_table(rows, [None, None], [embed, score], flight.results, [],
                         ResultExtras(openai=True, pooled=PooledShape("embed", dim=2)))
    got = table.to_pylist()
    assert got[0]["pooled"] == [[1.0, 0.0], [0.0, 1.0], pytest.approx([0.6, 0.8])]
    assert got[1]["pooled"] == [[pytest.approx(1.0)], [pytest.approx(0.0)]]  # cosine of (q, d1), (q, d2)
    assert got[0]["embedding"] is None and got[0]["prompt_tokens"] == embed.prompt_tokens
    assert got[1]["openai_options"] == {"encoding_format": None, "top_n": None, "documents": None}


def test_a_part_the_engine_fails_fails_its_row():
    parts = [Prompt([1]), Prompt([2])]
    prompt = Prompt(None, endpoint="/v1/embeddings", model="m", parts=parts, line_options={})
    flight = InFlight(unit=None, rows=None, problems=[None], prompts=[prompt],
                      previous=None, sent=[0], results=[None])
    flight.place(0, Pooled([1.0]))
    assert flight.waiting == 1
    flight.place(1, RuntimeError("boom"))
    row = result_table(pa.table({ROW: [0], ID: ["e"]}), [None], [prompt], flight.results, [],
                       ResultExtras(openai=True, pooled=PooledShape("embed", dim=1))).to_pylist()[0]
    assert row["status"] == "failed" and row["error"] == "engine_error: RuntimeError: boom"
    assert row["pooled"] is None and row["prompt_tokens"] == 2


# ---- output lines -----------------------------------------------------------------------------


def _row(endpoint: str, pooled: list[list[float]], tokens: int, **options: Any) -> dict[str, Any]:
    return {"id": "c1", "status": "ok", "error": None, "prompt_tokens": tokens, "endpoint": endpoint, "model": "m",
            "pooled": pooled, "openai_options": {"encoding_format": None, "top_n": None, "documents": None, **options}}


def test_embeddings_output_lines_have_vllms_fields():
    line = output_line(_row("/v1/embeddings", [[0.5, -0.25], [1.0, 0.0]], 7, encoding_format="float"), "k", 123)
    assert list(line) == ["id", "custom_id", "response", "error"] and line["error"] is None
    assert line["response"]["status_code"] == 200
    body = line["response"]["body"]
    assert body == {"id": "embd-k", "object": "list", "created": 123, "model": "m",
                    "data": [{"index": 0, "object": "embedding", "embedding": [0.5, -0.25]},
                             {"index": 1, "object": "embedding", "embedding": [1.0, 0.0]}],
                    "usage": {"prompt_tokens": 7, "total_tokens": 7, "completion_tokens": 0,
                              "prompt_tokens_details": None, "completion_tokens_details": None}}
    assert list(body) == ["id", "object", "created", "model", "data", "usage"] and list(body["usage"]) == USAGE_KEYS
    encoded = output_line(_row("/v1/embeddings", [[0.5, -0.25]], 3, encoding_format="base64"), "k", 1)
    text = encoded["response"]["body"]["data"][0]["embedding"]
    assert struct.unpack("<2f", base64.b64decode(text)) == (0.5, -0.25)


def test_score_and_rerank_output_lines_have_vllms_fields():
    body = output_line(_row("/v1/score", [[0.25], [0.75]], 9), "k", 5)["response"]["body"]
    assert body == {"id": "score-k", "object": "list", "created": 5, "model": "m",
                    "data": [{"index": 0, "object": "score", "score": 0.25},
                             {"index": 1, "object": "score", "score": 0.75}],
                    "usage": {"prompt_tokens": 9, "total_tokens": 9, "completion_tokens": 0,
                              "prompt_tokens_details": None, "completion_tokens_details": None}}
    docs = ["a", "b", "c"]
    rerank = output_line(_row("/rerank", [[0.1], [0.9], [0.5]], 6, top_n=2, documents=docs), "k", 5)
    body = rerank["response"]["body"]
    assert list(body) == ["id", "model", "usage", "results"]  # no object, no created: as vLLM's
    assert body["usage"] == {"prompt_tokens": 6, "total_tokens": 6}
    assert body["results"] == [{"index": 1, "document": {"text": "b", "multi_modal": None}, "relevance_score": 0.9},
                               {"index": 2, "document": {"text": "c", "multi_modal": None}, "relevance_score": 0.5}]
    every = output_line(_row("/v2/rerank", [[0.1], [0.9]], 4, top_n=5, documents=docs[:2]), "k", 5)
    assert [r["index"] for r in every["response"]["body"]["results"]] == [1, 0]


def test_a_failed_pooling_line_has_the_batch_api_error():
    row = {"id": "c1", "status": "failed", "prompt_tokens": None, "endpoint": None, "model": None, "pooled": None,
           "error": "invalid_url: Model does not support endpoint: /v1/embeddings; this run has task score: ..."}
    line = output_line(row, "k", 1)
    assert line["response"] is None and line["error"]["code"] == "invalid_url"
    assert line["error"]["message"].startswith("Model does not support endpoint: /v1/embeddings")


# ---- whole runs, compared with vLLM's run_batch -----------------------------------------------

RUN_BATCH = """
import asyncio, sys
from vllm.entrypoints.launchers.run_batch import main, parse_args
for model, source, out in zip(*[iter(sys.argv[1:])] * 3):
    sys.argv = ["run_batch", "-i", source, "-o", out, "--model", model, "--runner", "pooling", "--dtype", "float32",
                "--max-model-len", "512", "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20), "--seed", "0"]
    asyncio.run(main(parse_args()))
"""


def _comparable(line: dict[str, Any]) -> dict[str, Any]:
    """An output line less what is random in vLLM's (ids, the creation time)."""
    line = json.loads(json.dumps(line))
    line.pop("id")
    line["response"].pop("request_id")
    line["response"]["body"].pop("id")
    line["response"]["body"].pop("created", None)
    return line


def _assert_same(ours: Any, theirs: Any, where: str = "") -> None:
    """Same keys in the same order, same value types, floats to 1e-4."""
    if isinstance(theirs, float):
        assert isinstance(ours, float) and abs(ours - theirs) <= 1e-4, (where, ours, theirs)
    elif isinstance(theirs, dict):
        assert isinstance(ours, dict) and list(ours) == list(theirs), (where, list(ours), list(theirs))
        for key in theirs:
            _assert_same(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), (where, ours, theirs)
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _assert_same(a, b, f"{where}[{i}]")
    else:
        assert type(ours) is type(theirs) and ours == theirs, (where, ours, theirs)


@pytest.mark.engine
def test_batch_files_answer_as_vllms_run_batch(tmp_path, pooling_models, engine_env):
    runs = {"embed": pooling_models["embed"], "score": pooling_models["cross-encoder"]}
    vllm_args = []
    for task, model in runs.items():
        vllm_args += [str(model), str(EXAMPLE), str(tmp_path / f"vllm-{task}.jsonl")]
    vllm = subprocess.Popen([sys.executable, "-c", RUN_BATCH, *vllm_args], env=engine_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        configs = [write_config(tmp_path / f"{task}.yaml", corpus=EXAMPLE, model_dir=model, run_dir=tmp_path / task,
                                input={"path": str(EXAMPLE), "format": "openai-batch"}, prompt={}, task=task,
                                run={"directory": str(tmp_path / task), "workers": 1}) for task, model in runs.items()]
        with ThreadPoolExecutor(2) as pool:  # independent runs, beside vLLM's own
            for proc in pool.map(lambda c: run_cli(["run", str(c)], engine_env), configs):
                assert proc.returncode == 0, proc.stderr[-3000:]
        _, stderr = vllm.communicate(timeout=600)
    finally:
        vllm.kill()
    assert vllm.returncode == 0, stderr[-3000:]
    requests = [json.loads(line) for line in EXAMPLE.read_text().splitlines()]
    for task in runs:
        ours = [json.loads(line) for line in (tmp_path / task / "openai-batch-output.jsonl").read_text().splitlines()]
        theirs = [json.loads(line) for line in (tmp_path / f"vllm-{task}.jsonl").read_text().splitlines()]
        assert [o["custom_id"] for o in ours] == [t["custom_id"] for t in theirs] == [r["custom_id"] for r in requests]
        for request, mine, reference in zip(requests, ours, theirs):
            if reference["response"]["status_code"] != 200:  # vLLM's run_batch: this model does not serve it
                assert reference["error"] == f"Model does not support endpoint: {request['url']}"
                assert mine["response"] is None and mine["error"]["code"] == "invalid_url"
                assert mine["error"]["message"].startswith(reference["error"] + "; "), mine
                continue
            _assert_same(_comparable(mine), _comparable(reference), request["custom_id"])
        results = read_results(tmp_path / task)
        assert all(r["embedding" if task == "embed" else "score"] is None for r in results)
        assert [len(r["pooled"] or ()) for r in results][:2] == ([1, 3] if task == "embed" else [0, 0])
    served = [o for o in theirs if o["response"]["status_code"] == 200]
    assert len(served) == 5  # the cross-encoder run answers the score and rerank lines
