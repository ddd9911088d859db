import time

import pytest

from shardinfer.config import PromptConfig
from shardinfer.errors import ConfigError
from shardinfer.requests.prompts import TRUNCATION_MARKER, PromptBuilder, template_fields

DOC = " ".join(f"sentence {i} of the document." for i in range(2000))


def builder(tokenizer, limit_len=512, max_tokens=32, **cfg):
    return PromptBuilder(PromptConfig(**cfg), tokenizer, max_model_len=limit_len, max_tokens=max_tokens)


def test_template_fields():
    assert template_fields("Summarize {title}:\n{text}\n{{literal}} {text}") == ["title", "text"]
    with pytest.raises(ConfigError, match="plain column name"):
        template_fields("{0}")
    with pytest.raises(ConfigError, match="plain column name"):
        template_fields("{row.attr}")
    with pytest.raises(ConfigError, match="literal braces"):
        template_fields("unbalanced {text")


def test_chat_mode_applies_the_models_chat_template(tokenizer):
    b = builder(tokenizer, system="Be brief.", user="Title: {title}\n{text}")
    rendered = b.render("Body.", {"title": "T1"})
    assert rendered == tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Title: T1\nBody."}],
        tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>system" in rendered and rendered.endswith("<|im_start|>assistant\n")
    [prompt] = b.build(["Body."], [{"title": "T1"}])
    assert prompt.token_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert not prompt.truncated and prompt.problem is None


def test_raw_mode_sends_the_rendered_template_only(tokenizer):
    b = builder(tokenizer, mode="raw", system="ignored in raw mode", user="Q: {text}\nA:")
    assert b.render("why?", {}) == "Q: why?\nA:"
    [prompt] = b.build(["why?"], [{}])
    assert tokenizer.decode(prompt.token_ids) == "Q: why?\nA:"


def test_over_long_input_keeps_head_and_tail_and_fits(tokenizer):
    b = builder(tokenizer, system="S.", user="{text}")
    [prompt] = b.build([DOC], [{}])
    assert prompt.truncated and prompt.problem is None
    assert len(prompt.token_ids) <= 512 - 32
    assert len(prompt.token_ids) >= 512 - 32 - 16  # the budget is used, not wasted
    text = tokenizer.decode(prompt.token_ids)
    assert "sentence 0 of the document" in text  # head
    assert "sentence 1999 of the document." in text  # tail
    assert TRUNCATION_MARKER.strip() in text
    assert "sentence 1000 of" not in text  # the middle is gone


def test_over_long_input_fails_the_row_when_asked(tokenizer):
    b = builder(tokenizer, too_long="fail")
    short, long = b.build(["short text", DOC], [{}, {}])
    assert short.problem is None and not short.truncated
    assert long.token_ids is None
    assert long.problem.startswith("too_long: prompt has ")
    assert "the limit is 480 (max_model_len 512 - max_tokens 32)" in long.problem


def test_template_longer_than_the_limit_fails_the_row(tokenizer):
    b = builder(tokenizer, limit_len=64, max_tokens=8, system="word " * 200)
    [prompt] = b.build(["text"], [{}])
    assert prompt.problem.startswith("too_long") and "template without the text" in prompt.problem


def test_huge_document_is_not_tokenized_whole(tokenizer):
    huge = "lorem ipsum dolor sit amet " * 400_000  # 10.8 MB
    b = builder(tokenizer)
    start = time.perf_counter()
    [prompt] = b.build([huge], [{}])
    assert prompt.truncated and len(prompt.token_ids) <= 480
    assert time.perf_counter() - start < 20


def test_batch_keeps_order_and_mixes_fits_and_truncations(tokenizer):
    b = builder(tokenizer)
    texts = ["a b c", DOC, "d e f", DOC[:100]]
    prompts = b.build(texts, [{}] * 4)
    assert [p.truncated for p in prompts] == [False, True, False, False]
    assert "a b c" in tokenizer.decode(prompts[0].token_ids)
    assert "d e f" in tokenizer.decode(prompts[2].token_ids)


def test_a_row_whose_template_fails_is_failed_alone(tokenizer, monkeypatch):
    b = builder(tokenizer, user="{text} / {title}")
    real = tokenizer.apply_chat_template

    def picky(messages, **kw):
        if "BAD" in messages[-1]["content"]:
            raise ValueError("template refused this row")
        return real(messages, **kw)

    monkeypatch.setattr(tokenizer, "apply_chat_template", picky)
    prompts = b.build(["fine", "BAD row", "also fine"], [{"title": "t"}, {"title": "t"}, {"title": None}])
    assert prompts[0].problem is None and prompts[2].problem is None
    assert prompts[1].problem == "prompt_error: ValueError: template refused this row"
    assert tokenizer.decode(prompts[2].token_ids).count("also fine / ") == 1  # a null column renders empty
