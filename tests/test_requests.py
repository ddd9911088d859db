"""Requests beyond one text in, one text out: OpenAI batch files, chats, per-row options, structured
output, n > 1, logprobs and LoRA adapters, with the real vLLM engine on the tiny model."""

import json

import jsonschema
import pytest

from conftest import demo_docs, read_results, run_cli, write_config, write_jsonl, write_parquet

pytestmark = pytest.mark.engine

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["topic", "score"],
          "properties": {"topic": {"type": "string", "enum": ["python", "os", "other"]},
                         "score": {"type": "integer", "minimum": 0, "maximum": 9}}}
# Small random models pad JSON with whitespace forever unless the grammar forbids it.
NO_WHITESPACE = {"structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}}
VLLM_ARGS = {"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20, **NO_WHITESPACE}


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    from shardinfer.models.tiny import build_tiny_lora

    return build_tiny_lora(tiny_model, tmp_path_factory.mktemp("lora") / "tiny-lora")


@pytest.fixture(scope="module")
def options_run(tmp_path_factory, tiny_model, adapter, engine_env):
    """A Parquet corpus with per-row options and adapters; every row asks for JSON, three outputs and
    logprobs."""
    tmp = tmp_path_factory.mktemp("options")
    texts = [d["text"][:300] for d in demo_docs(4)]
    rows = []
    for i, text in enumerate(texts):
        rows.append({"id": f"base-{i}", "text": text, "lora": None, "temp": None, "budget": None})
        rows.append({"id": f"lora-{i}", "text": text, "lora": "tiny", "temp": None, "budget": None})
    rows.append({"id": "sampled", "text": texts[0], "lora": None, "temp": 1.0, "budget": 40})
    rows.append({"id": "bad-temp", "text": texts[0], "lora": None, "temp": -1.0, "budget": None})
    rows.append({"id": "bad-adapter", "text": texts[0], "lora": "nope", "temp": None, "budget": None})
    corpus = write_parquet(tmp / "rows.parquet", rows)
    config = write_config(
        tmp / "options.yaml", corpus=corpus, model_dir=tiny_model, run_dir=tmp / "run",
        input={"path": str(corpus), "id_column": "id"},
        model={"lora": {"tiny": str(adapter)}, "lora_column": "lora", "engine_args": VLLM_ARGS},
        sampling={"max_tokens": 48, "n": 3, "logprobs": 2, "structured": {"json_schema": SCHEMA},
                  "per_row": {"temperature": "temp", "max_tokens": "budget"}},
    )
    proc = run_cli(["run", str(config)], engine_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {row["id"]: row for row in read_results(tmp / "run")}


def test_greedy_structured_output_matches_the_schema_for_every_row(options_run):
    ran = [r for r in options_run.values() if r["status"] == "ok"]
    assert len(ran) == 9
    for row in ran:
        for text in row["outputs"]:
            jsonschema.validate(json.loads(text), SCHEMA)
        assert row["structured_ok"] is True and row["structured_error"] is None


def test_n_gives_every_output_and_greedy_outputs_agree(options_run):
    for row in options_run.values():
        if row["status"] != "ok":
            continue
        assert len(row["outputs"]) == 3 and len(row["finish_reasons"]) == 3
        assert row["output"] == row["outputs"][0]
        if row["id"] != "sampled":
            assert len(set(row["outputs"])) == 1  # greedy: three times the same
    assert len(set(options_run["sampled"]["outputs"])) > 1


def test_logprobs_have_one_entry_per_token_with_the_top_alternatives(options_run):
    for row in options_run.values():
        if row["status"] != "ok":
            continue
        assert len(row["logprobs"]) == 3
        tokens = sum(len(sample) for sample in row["logprobs"])
        assert tokens == row["output_tokens"]
        for sample, text in zip(row["logprobs"], row["outputs"]):
            # the tokens spell the output, and the end-of-turn token that stopped it
            assert "".join(t["token"] for t in sample).removesuffix("<|im_end|>") == text
            for t in sample:
                assert t["logprob"] <= 0 and len(t["top"]) == 2
                assert t["top"][0]["logprob"] >= t["top"][1]["logprob"]


def test_an_adapter_changes_outputs_and_is_recorded(options_run):
    changed = [i for i in range(4) if options_run[f"lora-{i}"]["output"] != options_run[f"base-{i}"]["output"]]
    assert changed, "the adapter left every output unchanged"
    assert {options_run[f"lora-{i}"]["adapter"] for i in range(4)} == {"tiny"}
    assert {options_run[f"base-{i}"]["adapter"] for i in range(4)} == {None}


def test_bad_per_row_values_fail_their_row_alone(options_run):
    assert options_run["bad-temp"]["status"] == "failed"
    assert options_run["bad-temp"]["error"].startswith("invalid_option: column 'temp' (sampling.per_row.temperature)")
    assert options_run["bad-adapter"]["status"] == "failed"
    assert options_run["bad-adapter"]["error"].startswith("unknown_adapter: column 'lora': adapter 'nope'")
    assert options_run["sampled"]["status"] == "ok"


# ---- OpenAI batch files -----------------------------------------------------------------------


def _chat(custom_id, content, **body):
    """A chat request line; ``body`` adds to (or replaces) the body's model and messages."""
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny-qwen3", "messages": [{"role": "system", "content": "Be brief."},
                                                         {"role": "user", "content": content}], **body}}


def batch_lines(adapter_name: str) -> tuple[list, dict]:
    """Good and bad request lines, and what each must come out as (custom_id -> status or error code)."""
    doc = demo_docs(1)[0]["text"][:200]
    lines = [
        _chat("chat", doc, max_tokens=12),
        {"custom_id": "completion", "method": "POST", "url": "/v1/completions",
         "body": {"model": "tiny-qwen3", "prompt": doc, "max_tokens": 8, "logprobs": 2}},
        _chat("schema", doc, max_completion_tokens=40,
              response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA, "strict": True}}),
        _chat("samples", doc, max_tokens=8, n=2, temperature=1.0, seed=3),
        _chat("chat-logprobs", doc, max_tokens=6, logprobs=True, top_logprobs=3),
        _chat("system", [{"type": "text", "text": doc}], max_tokens=6),
        _chat("adapter", doc, max_tokens=12, model=adapter_name),
        '{"custom_id": "broken", "method": "POST", "url": ',
        {"custom_id": "embeddings", "method": "POST", "url": "/v1/embeddings", "body": {"model": "tiny-qwen3", "input": "x"}},
        _chat("other-model", doc, model="gpt-4o"),
        _chat("bad-schema", doc, response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "objectx"}}}),
        _chat("unknown-param", doc, logit_bias_typo=1),
        _chat("bad-role", doc, messages=[{"role": "robot", "content": "hi"}]),
        _chat("chat", "the same custom_id again", max_tokens=4),
    ]
    expected = {"chat": "ok", "completion": "ok", "schema": "ok", "samples": "ok", "chat-logprobs": "ok",
                "system": "ok", "adapter": "ok", "embeddings": "invalid_url",
                "other-model": "model_not_found", "bad-schema": "invalid_schema",
                "unknown-param": "unsupported_parameter", "bad-role": "invalid_messages"}
    return lines, expected


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory, tiny_model, adapter, engine_env):
    tmp = tmp_path_factory.mktemp("openai")
    lines, expected = batch_lines("tiny-lora")
    corpus = write_jsonl(tmp / "requests.jsonl", lines)
    config = write_config(tmp / "batch.yaml", corpus=corpus, model_dir=tiny_model, run_dir=tmp / "run",
                          input={"path": str(corpus), "format": "openai-batch"}, prompt={},
                          model={"lora": {"tiny-lora": str(adapter)}, "engine_args": VLLM_ARGS},
                          run={"directory": str(tmp / "run"), "workers": 2, "unit_tokens": 200})
    proc = run_cli(["run", str(config)], engine_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [json.loads(line) for line in (tmp / "run" / "openai-batch-output.jsonl").read_text().splitlines()]
    return lines, expected, out, read_results(tmp / "run"), config


def test_every_request_line_gets_one_output_line_in_input_order(batch_run):
    lines, _, out, results, _ = batch_run
    assert len(out) == len(lines) == len(results)
    ids = [line["custom_id"] if isinstance(line, dict) else "requests.jsonl:7" for line in lines]
    assert [o["custom_id"] for o in out] == ids
    assert len({o["id"] for o in out}) == len(out)
    assert all(set(o) == {"id", "custom_id", "response", "error"} for o in out)


def test_good_requests_answer_in_the_batch_api_format(batch_run, tokenizer):
    lines, expected, out, _, _ = batch_run
    by_id = {o["custom_id"]: o for o in out[:7]}
    for custom_id in [k for k, v in expected.items() if v == "ok"]:
        o = by_id[custom_id]
        assert o["error"] is None
        response = o["response"]
        assert response["status_code"] == 200 and response["request_id"]
        body = response["body"]
        assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
        assert body["usage"]["completion_tokens"] > 0
        for i, choice in enumerate(body["choices"]):
            assert choice["index"] == i and choice["finish_reason"] in ("stop", "length")
    chat = by_id["chat"]["response"]["body"]
    assert chat["object"] == "chat.completion" and chat["model"] == "tiny-qwen3"
    assert chat["choices"][0]["message"]["role"] == "assistant" and chat["choices"][0]["logprobs"] is None
    request = lines[0]["body"]["messages"]
    text = tokenizer.apply_chat_template(request, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert chat["usage"]["prompt_tokens"] == len(prompt)
    completion = by_id["completion"]["response"]["body"]
    assert completion["object"] == "text_completion" and "text" in completion["choices"][0]
    lp = completion["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == completion["usage"]["completion_tokens"]
    assert all(len(top) <= 2 for top in lp["top_logprobs"])
    assert "".join(lp["tokens"]) == completion["choices"][0]["text"]
    content = by_id["chat-logprobs"]["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert content and all(len(t["top_logprobs"]) == 3 and set(t) == {"token", "logprob", "bytes", "top_logprobs"}
                           for t in content)
    jsonschema.validate(json.loads(by_id["schema"]["response"]["body"]["choices"][0]["message"]["content"]), SCHEMA)
    assert len(by_id["samples"]["response"]["body"]["choices"]) == 2
    assert by_id["adapter"]["response"]["body"]["model"] == "tiny-lora"
    assert by_id["adapter"]["response"]["body"]["choices"][0]["message"]["content"] != \
        chat["choices"][0]["message"]["content"]


def test_bad_request_lines_fail_alone_with_the_batch_api_error(batch_run):
    lines, expected, out, results, _ = batch_run
    by_id = {o["custom_id"]: o for o in out}
    for custom_id, code in expected.items():
        if code == "ok":
            continue
        o = by_id[custom_id]
        assert o["response"] is None and o["error"]["code"] == code, o
        assert o["error"]["message"]
    broken = by_id["requests.jsonl:7"]["error"]
    assert broken["code"] == "invalid_json"
    duplicate = out[-1]["error"]
    assert out[-1]["custom_id"] == "chat" and duplicate["code"] == "duplicate_id"
    statuses = [r["status"] for r in results]
    assert statuses.count("failed") == 1 + 1 + sum(v != "ok" for v in expected.values())


def test_plan_shows_a_rendered_request_of_each_kind(batch_run, engine_env):
    *_, config = batch_run
    proc = run_cli(["plan", str(config)], engine_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "# example request (/v1/chat/completions)" in proc.stdout
    assert "# example request (/v1/completions)" in proc.stdout
    assert "<|im_start|>assistant" in proc.stdout
    assert "invalid_url: 1" in proc.stdout and "model_not_found: 1" in proc.stdout
