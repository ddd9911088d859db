"""The fast paths of prompt building and result tables give exactly what the plain ways give."""

import numpy as np
import pyarrow as pa
import pytest

from shardinfer.bench.instant_engine import InstantEngine
from shardinfer.bench.sim_engine import WordTokenizer
from shardinfer.config import PromptConfig
from shardinfer.engines.base import Completion, Pooled
from shardinfer.errors import Refused
from shardinfer.models.tasks import PooledShape
from shardinfer.planning.validate import checked_from_dict
from shardinfer.requests.fast_prompts import PROBES, BatchEncoder, ChatFrame
from shardinfer.requests.prompts import SYSTEM, Prompt, PromptBuilder
from shardinfer.results import CONTRACT, ID, ROW, ResultExtras, _pooled_record, _record, result_table

TEXTS = ["plain words", "  spaced out \n", "<think>x</think> and {braces} ünïcode", "line\nbreaks\r\n\t"]


def builder(tokenizer, **cfg):
    return PromptBuilder(PromptConfig(**cfg), tokenizer, max_model_len=512, max_tokens=32)


def jinja(tokenizer, user, system=None):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_the_frame_renders_what_the_chat_template_renders(tokenizer, system):
    b = builder(tokenizer, system=system, user="Q: {text}")
    assert b.chat_frame().frame is not None  # the tiny model's template takes the fast path
    for text in [*TEXTS, *PROBES]:
        assert b.render(text, {}) == jinja(tokenizer, f"Q: {text}", system)
    prompts = b.build(TEXTS, [{} for _ in TEXTS])
    for text, prompt in zip(TEXTS, prompts):
        rendered = jinja(tokenizer, f"Q: {text}", system)
        assert prompt.token_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_a_rows_own_system_message_is_rendered_by_the_template(tokenizer):
    b = builder(tokenizer, system="Config system.")
    assert b.render("text", {SYSTEM: "Own system."}) == jinja(tokenizer, "text", "Own system.")
    assert b.render("text", {SYSTEM: None}) == jinja(tokenizer, "text", "Config system.")


@pytest.mark.parametrize("change", ["content | trim", "content | upper", "content | replace('<think>', '')"])
def test_a_template_that_changes_the_content_is_rendered_per_row(tokenizer, monkeypatch, change):
    template = tokenizer.chat_template.replace("+ content +", f"+ ({change}) +")
    assert template != tokenizer.chat_template
    monkeypatch.setattr(tokenizer, "chat_template", template)
    b = builder(tokenizer)
    assert b.chat_frame().frame is None
    for text in TEXTS:
        assert b.render(text, {}) == jinja(tokenizer, text)


def test_a_change_the_probes_miss_is_caught_by_a_batchs_rows(tokenizer, monkeypatch):
    template = tokenizer.chat_template.replace("+ content +", "+ (content | replace('SECRET', '***')) +")
    monkeypatch.setattr(tokenizer, "chat_template", template)
    b = builder(tokenizer)
    assert b.chat_frame().frame is not None  # no probe holds SECRET
    texts = ["a first row", "SECRET plans"] + [f"row {i}" for i in range(6)]
    prompts = b.build(texts, [{} for _ in texts])  # the second row is among those checked
    assert b.chat_frame().frame is None
    for text, prompt in zip(texts, prompts):
        assert prompt.token_ids == tokenizer(jinja(tokenizer, text), add_special_tokens=False)["input_ids"]


def test_a_template_that_holds_the_content_twice_or_not_at_all_has_no_frame():
    twice = ChatFrame(lambda messages: messages[-1]["content"] * 2, None)
    dropped = ChatFrame(lambda messages: "always the same", None)
    refuses = ChatFrame(lambda messages: 1 / 0, None)  # type: ignore[arg-type,return-value]
    assert twice.frame is None and dropped.frame is None and refuses.frame is None
    assert twice.apply("x") is None


def test_an_empty_content_is_left_to_the_template():
    frame = ChatFrame(lambda messages: "<" + messages[-1]["content"] + ">", None)
    assert frame.apply("x") == "<x>" and frame.apply("") is None


def test_the_backend_gives_the_tokenizers_ids(tokenizer):
    texts = [*TEXTS, *PROBES, "<|im_start|>user\nhi<|im_end|>\n"]
    for special in (False, True):
        encoder = BatchEncoder(tokenizer, add_special_tokens=special)
        assert encoder.backend is not None
        assert encoder(texts) == tokenizer(texts, add_special_tokens=special)["input_ids"]
    assert BatchEncoder(tokenizer, add_special_tokens=False)([]) == []


def test_a_backend_changed_behind_the_tokenizers_back_is_left(tokenizer):
    encoder = BatchEncoder(tokenizer, add_special_tokens=False)
    backend = tokenizer.backend_tokenizer
    backend.enable_truncation(3)
    try:
        texts = ["a long row of many words to cut", "short"]
        assert encoder(texts) == tokenizer(texts, add_special_tokens=False)["input_ids"]
        assert encoder.backend is None and len(encoder(texts)[0]) > 3
    finally:
        backend.no_truncation()


def test_a_tokenizer_without_a_backend_is_called_as_it_is():
    tokenizer = WordTokenizer()
    encoder = BatchEncoder(tokenizer, add_special_tokens=False)
    assert encoder.backend is None
    assert encoder(["a b c", "d"]) == tokenizer(["a b c", "d"])["input_ids"]
    b = builder(tokenizer)
    assert b.chat_frame().frame is None  # not a jinja template: rendered per row
    assert b.render("x y", {}) == tokenizer.apply_chat_template([{"role": "user", "content": "x y"}])


def test_result_columns_are_what_the_row_records_give():
    class Options:
        lora, structured = None, None

    rows = pa.table({ROW: [0, 1, 2, 3, 4, 5], ID: ["a", "b", "c", "d", "e", "f"]})
    problems = ["invalid_row: empty", None, None, None, None, None]
    prompts = [None, Prompt(None, problem="too_long: no"), Prompt([1, 2, 3]), Prompt([1, 2]),
               Prompt([4, 5, 6, 7], truncated=True), Prompt([9], options=Options())]
    completions = [None, None, RuntimeError("boom"), Refused("bad option"), Completion([7, 8], "out", "stop"),
                   Completion([1], "x", "length", more=[Completion([2, 3], "y", "stop")])]
    table = result_table(rows, problems, prompts, completions, [])
    assert table.column_names == [ROW, *CONTRACT]
    for i, row in enumerate(table.to_pylist()):
        record = _record(problems[i], prompts[i], completions[i], ResultExtras())
        assert {name: row[name] for name in CONTRACT[1:]} == {name: record.get(name) for name in CONTRACT[1:]}
    assert table.column("output_tokens").to_pylist() == [None, None, None, None, 2, 3]


def test_the_instant_engine_answers_every_prompt_with_one_token():
    cfg = checked_from_dict({"input": {"path": "/none"}, "model": {"path": "/none", "max_model_len": 512}})
    engine = InstantEngine(cfg, 512)
    engine.submit("unit", [Prompt([1, 2]), Prompt([3])])
    finished = engine.poll()
    assert [(batch, index) for batch, index, _ in finished] == [("unit", 0), ("unit", 1)]
    assert all(c.output_tokens == 1 and c.finish_reason == "length" for _, _, c in finished)
    assert engine.report()["cpu_s_after_load"] >= 0


@pytest.mark.parametrize("shape", [PooledShape("embed", dim=3), PooledShape("embed", dim=3, dtype="float16"),
                                   PooledShape("embed"), PooledShape("classify", labels=("no", "maybe", "yes")),
                                   PooledShape("score")])
def test_pooled_columns_are_what_the_row_records_give(shape):
    width = shape.dim or len(shape.labels) or 1
    rows = pa.table({ROW: list(range(7)), ID: list("abcdefg")})
    problems = ["invalid_row: empty", None, None, None, None, None, None]
    prompts = [None, Prompt(None, problem="too_long: no"), Prompt([1, 2, 3]), Prompt([1, 2]),
               Prompt([4, 5, 6, 7], truncated=True), Prompt([9]), Prompt([8])]
    answers = [None, None, RuntimeError("boom"), Pooled(np.arange(width, dtype=np.float32) / 7),
               Pooled([0.25] * width), Pooled(np.ones(width + 1, dtype=np.float32)), Pooled([0.5] + [0.125] * (width - 1))]
    extras = ResultExtras(pooled=shape)
    table = result_table(rows, problems, prompts, answers, [], extras)
    assert table.column_names == [ROW, "id", *extras.contract()]
    assert table.schema.field(extras.contract()[-1]).type == extras.types()[extras.contract()[-1]]
    got = table.to_pylist()
    for i, row in enumerate(got):
        record = _pooled_record(problems[i], prompts[i], answers[i], extras)
        for name in extras.contract():
            want = record.get(name)
            if name == "embedding" and want is not None:
                assert row[name] == pytest.approx(want, abs=1e-3)
            elif name == "probs" and want is not None:
                assert row[name] == pytest.approx(want, abs=1e-6)
            else:
                assert row[name] == want, (i, name)
    if shape.dim or shape.labels or shape.task == "score":  # an answer of the wrong size fails its row alone
        assert got[5]["status"] == "failed" and f"gave {width + 1} values" in got[5]["error"]
    assert [r["status"] for r in got] == ["failed"] * 3 + ["ok", "truncated", got[5]["status"], "ok"]
