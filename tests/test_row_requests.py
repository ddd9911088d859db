"""Rows to requests without an engine: chats, per-row options, OpenAI batch lines, structured output
checks and the config checks that go with them, on the tiny model's real tokenizer."""

import json
from dataclasses import replace

import pyarrow as pa
import pytest

from shardinfer.errors import ConfigError
from shardinfer.inputs import reading
from shardinfer.planning.validate import checked_from_dict
from shardinfer.requests.builder import RequestBuilder, result_extras
from shardinfer.requests.openai_batch import output_line, parse_request
from shardinfer.requests.prompts import request_columns
from shardinfer.requests.row_options import OptionError, Structured, base_options, structured_of

SCHEMA = {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}}


def config(tiny_model, **sections):
    raw = {"input": {"path": "unused.jsonl"}, "model": {"path": str(tiny_model), "max_model_len": 256},
           "sampling": {"max_tokens": 16}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return checked_from_dict(raw)


def build(cfg, tokenizer, texts, columns=None):
    builder = RequestBuilder(cfg, tokenizer, max_model_len=256)
    return builder.build(texts, columns or [{} for _ in texts])


def test_a_chat_column_is_sent_as_it_is_with_the_rows_system_message(tiny_model, tokenizer):
    cfg = config(tiny_model, input={"messages_column": "chat", "system_column": "sys"},
                 prompt={"system": "Default system."})
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Name a module."}]
    prompts = build(cfg, tokenizer, [json.dumps(chat)] * 3 + ["not json", json.dumps([{"role": "user"}])],
                    [{"sys": "Row system."}, {"sys": None}, {"sys": None}, {}, {}])
    expected = tokenizer.apply_chat_template([{"role": "system", "content": "Row system."}, *chat],
                                             tokenize=False, add_generation_prompt=True)
    assert prompts[0].token_ids == tokenizer(expected, add_special_tokens=False)["input_ids"]
    fallback = tokenizer.apply_chat_template([{"role": "system", "content": "Default system."}, *chat],
                                             tokenize=False, add_generation_prompt=True)
    assert prompts[1].token_ids == tokenizer(fallback, add_special_tokens=False)["input_ids"]
    assert prompts[3].problem.startswith("invalid_messages: column 'chat': not a chat")
    assert prompts[4].problem.startswith("invalid_messages: column 'chat'[0].content: expected text")


def test_chat_columns_are_read_from_jsonl_and_parquet_lists(tmp_path):
    chat = [{"role": "user", "content": "Hi"}]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"chat": chat}) + "\n" + json.dumps({"chat": json.dumps(chat)}) + "\n"
                     + json.dumps({"chat": None}) + "\n")
    parquet = tmp_path / "c.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"chat": [chat, chat]}), parquet)
    for path in (jsonl, parquet):
        cfg = checked_from_dict({"input": {"path": str(path), "messages_column": "chat"}, "model": {"path": "m"}})
        f = reading.input_files(cfg.input)[0]
        table = reading.read_table(f, cfg.input)
        texts = table.column(reading.TEXT).to_pylist()
        assert json.loads(texts[0]) == chat and json.loads(texts[1]) == chat
        if path == jsonl:
            assert table.column(reading.PROBLEM).to_pylist()[2].startswith("empty_text: 'chat'")


def test_per_row_options_are_checked_row_by_row(tiny_model, tokenizer):
    cfg = config(tiny_model, sampling={"max_tokens": 16, "per_row": {"max_tokens": "budget", "temperature": "t",
                                                                     "json_schema": "schema", "stop": "stops"}})
    rows = [{"budget": 100, "t": 0.5, "schema": json.dumps(SCHEMA), "stops": ["END"]},
            {"budget": None, "t": None, "schema": None, "stops": None},
            {"budget": 0, "t": None, "schema": None, "stops": None},
            {"budget": None, "t": "hot", "schema": None, "stops": None},
            {"budget": None, "t": None, "schema": '{"type": "objectx"}', "stops": None},
            {"budget": 200, "t": None, "schema": None, "stops": None},
            {"budget": 250, "t": None, "schema": None, "stops": None}]
    prompts = build(cfg, tokenizer, ["A text about lists. " * 20] * len(rows), rows)
    first = prompts[0].options
    assert first.max_tokens == 100 and first.temperature == 0.5 and first.stop == ("END",)
    assert first.structured == Structured("json_schema", json.dumps(SCHEMA, sort_keys=True))
    assert prompts[1].options is None and prompts[1].token_ids  # the config's options
    assert prompts[2].problem.startswith("invalid_option: column 'budget' (sampling.per_row.max_tokens): must be at least 1")
    assert prompts[3].problem.startswith("invalid_option: column 't' (sampling.per_row.temperature): expected a number")
    assert prompts[4].problem.startswith("invalid_schema: column 'schema' (sampling.per_row.json_schema): not a valid JSON schema")
    # a row's own max_tokens sets its prompt limit: 200 leave 56 tokens (the text is cut to fit),
    # 250 leave 6, less than the chat template alone takes
    assert prompts[5].truncated and len(prompts[5].token_ids) == 56
    assert prompts[6].problem.startswith("too_long: prompt has more than 6 tokens, the limit is 6 "
                                         "(max_model_len 256 - max_tokens 250)")
    assert [c for _, c in request_columns(cfg)] == ["budget", "t", "schema", "stops"]


def test_openai_request_bodies_become_options(tiny_model):
    base = base_options(config(tiny_model).sampling)
    line = {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny-qwen3", "messages": [{"role": "user", "content": "hi"}],
                     "max_completion_tokens": 5, "temperature": 0.7, "top_p": 0.9, "seed": 4, "stop": "END",
                     "n": 2, "logprobs": True, "top_logprobs": 3, "presence_penalty": 0.5,
                     "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}}}
    request = parse_request(json.dumps(line), base, ["tiny-qwen3"], {"ad": "/x"})
    o = request.options
    assert (o.max_tokens, o.temperature, o.top_p, o.seed, o.stop, o.n, o.logprobs, o.presence_penalty) == \
        (5, 0.7, 0.9, 4, ("END",), 2, 3, 0.5)
    assert o.structured.kind == "json_schema" and o.lora is None
    completion = {"custom_id": "y", "url": "/v1/completions",
                  "body": {"model": "ad", "prompt": ["once"], "logprobs": 1, "guided_regex": "[a-z]+"}}
    request = parse_request(json.dumps(completion), base, ["tiny-qwen3"], {"ad": "/x"})
    assert request.prompt == "once" and request.options.lora == "ad" and request.options.logprobs == 1
    assert request.options.structured == Structured("regex", "[a-z]+")
    vllm_extra = {**line, "body": {**line["body"], "response_format": None,
                                   "structured_outputs": {"choice": ["yes", "no"]}}}
    assert parse_request(json.dumps(vllm_extra), base, ["tiny-qwen3"], {}).options.structured.kind == "choice"


@pytest.mark.parametrize("change,code", [
    ({"method": "GET"}, "invalid_method"),
    ({"url": "/v1/responses"}, "invalid_url"),
    ({"body": {"model": "other", "messages": [{"role": "user", "content": "x"}]}}, "model_not_found"),
    ({"body": {"messages": [{"role": "user", "content": "x"}]}}, "invalid_request"),
    ({"body": {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}}, "unsupported_parameter"),
    ({"body": {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": []}}, "unsupported_parameter"),
    ({"body": {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0}}, "invalid_option"),
    ({"body": {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}}, "invalid_request"),
    ({"body": {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}}, "invalid_messages"),
    ({"body": {"model": "m", "messages": [{"role": "user", "content": "x"}],
               "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 3}}}}}, "invalid_schema"),
    ({"url": "/v1/completions", "body": {"model": "m", "prompt": ["a", "b"]}}, "invalid_prompt"),
])
def test_a_request_that_cannot_run_is_refused_with_the_batch_api_code(tiny_model, change, code):
    line = {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": "x"}]}, **change}
    with pytest.raises(OptionError) as err:
        parse_request(json.dumps(line), base_options(config(tiny_model).sampling), ["m"], {})
    assert err.value.code == code and str(err.value)


def test_openai_batch_lines_are_read_whole_and_known_by_custom_id(tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_text('{"custom_id": "a", "body": {}}\n\n{"custom_id": \n[1, 2]\n{"custom_id": 7}\n{"body": {}}\n')
    cfg = checked_from_dict({"input": {"path": str(path), "format": "openai-batch"}, "model": {"path": "m"}})
    f = reading.input_files(cfg.input)[0]
    cols = reading.columns_for(cfg.input, [])
    table = pa.concat_tables(reading.scan(f, cols, "replace", reading.ReadStats()))
    assert table.column(reading.ID).to_pylist() == ["a", "requests.jsonl:1", "requests.jsonl:2", "7", "requests.jsonl:4"]
    problems = table.column(reading.PROBLEM).to_pylist()
    assert problems[0] is None and problems[3] is None
    assert problems[1].startswith("invalid_json: line 3") and problems[2].startswith("invalid_json: line 4 is a JSON list")
    assert problems[4].startswith("missing_id: column 'custom_id'")
    assert json.loads(table.column(reading.TEXT)[0].as_py()) == {"custom_id": "a", "body": {}}


def test_structured_checks_say_why_an_output_does_not_match():
    schema = structured_of("json_schema", SCHEMA, "x")
    assert schema.check('{"a": 1}') is None
    assert "not valid JSON" in schema.check('{"a": 1')
    assert "at a" in schema.check('{"a": "one"}')
    assert structured_of("regex", "[0-9]+", "x").check("12") is None
    assert structured_of("regex", "[0-9]+", "x").check("12a")
    assert structured_of("choice", ["yes", "no"], "x").check("maybe")
    assert structured_of("json_object", True, "x").check("[1]").endswith("not an object")
    with pytest.raises(OptionError, match="not a valid regular expression"):
        structured_of("regex", "(", "x")


@pytest.mark.parametrize("sections,message", [
    ({"model": {"engine": "hf"}, "sampling": {"structured": {"regex": "[a-z]+"}}},
     "hf does not support structured output"),
    ({"model": {"engine": "hf"}, "sampling": {"logprobs": 2}}, "hf does not support logprobs"),
    ({"model": {"engine": "hf", "lora": {"a": "/x"}}}, "hf does not support LoRA"),
    ({"sampling": {"structured": {"regex": "a", "choice": ["b"]}}}, "set one of"),
    ({"sampling": {"structured": {"json_schema": {"type": "objectx"}}}}, "not a valid JSON schema"),
    ({"sampling": {"per_row": {"tempreature": "t"}}}, "not an option a column can set"),
    ({"sampling": {"n": 0}}, "sampling.n: must be at least 1"),
    ({"sampling": {"logprobs": 50}}, "sampling.logprobs: must be at least 0 and at most 20"),
    ({"input": {"format": "openai-batch", "passthrough": ["x"]}}, "an OpenAI batch file carries each request whole"),
    ({"input": {"messages_column": "chat"}, "prompt": {"user": "Summarize {text}"}}, "does not apply"),
    ({"model": {"lora_column": "adapter"}}, "no adapters are named"),
])
def test_requests_the_engine_or_the_input_cannot_serve_are_config_errors(tiny_model, sections, message):
    with pytest.raises(ConfigError, match=message):
        config(tiny_model, **sections)


def test_optional_result_columns_follow_the_config_and_the_output_line_format(tiny_model):
    plain = result_extras(config(tiny_model))
    assert plain.columns() == []
    batch = result_extras(config(tiny_model, input={"format": "openai-batch"}))
    assert batch.columns() == ["outputs", "finish_reasons", "logprobs", "structured_ok", "structured_error",
                               "endpoint", "model"]
    row = {"id": "c1", "status": "ok", "output": "hi", "outputs": ["hi", "yo"], "finish_reasons": ["stop", "length"],
           "prompt_tokens": 3, "output_tokens": 4, "finish_reason": "stop", "endpoint": "/v1/completions",
           "model": "m", "logprobs": None, "error": None}
    line = output_line(row, "k", 0)
    assert line["response"]["body"]["object"] == "text_completion"
    assert [c["text"] for c in line["response"]["body"]["choices"]] == ["hi", "yo"]
    assert line["response"]["body"]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    failed = output_line({**row, "status": "failed", "error": "invalid_url: url '/x' is not supported"}, "k", 0)
    assert failed["response"] is None and failed["error"] == {"code": "invalid_url", "message": "url '/x' is not supported"}
    assert replace(base_options(config(tiny_model).sampling), n=2).budget_tokens == 32
