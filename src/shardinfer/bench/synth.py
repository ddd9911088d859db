"""A synthetic corpus of real text whose prompts have the token lengths a benchmark asks for.

Source texts (the bundled Python documentation by default) are tokenized once into one long token
stream; each document is a window of that stream, decoded back to text, sized so that the full
prompt (template and chat markup included, exactly as the pipeline builds it) is a length drawn
uniformly from the requested range. The length is checked by building the prompt and the window
adjusted until it lands in range.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from shardinfer.config import InputConfig
from shardinfer.errors import ConfigError
from shardinfer.inputs import reading
from shardinfer.requests.prompts import PromptBuilder

BUNDLED = "python-docs.jsonl.gz"
_TRIES = 6


@dataclass
class SynthDoc:
    text: str
    prompt_ids: list[int]


@contextlib.contextmanager
def bundled_corpus() -> Iterator[Path]:
    """The path of the corpus shipped in the package (PSF-licensed Python documentation): installed
    as the package ``shardinfer.data``, or ``jobs/data`` of a source checkout run from ``src/``."""
    checkout = Path(__file__).resolve().parents[3] / "jobs" / "data" / BUNDLED
    if checkout.is_file():
        yield checkout
        return
    with resources.as_file(resources.files("shardinfer.data") / BUNDLED) as path:
        yield path


def source_texts(path: str | None) -> list[str]:
    """The non-empty texts of a corpus file (any input format, column ``text``), or of the bundled one."""
    if path is None:
        with bundled_corpus() as bundled:
            return source_texts(str(bundled))
    cfg = InputConfig(path=path)
    [source] = reading.input_files(cfg)
    table = reading.read_table(source, cfg)
    texts = table.column(reading.TEXT).filter(table.column(reading.PROBLEM).is_null()).to_pylist()
    if not texts:
        raise ConfigError(f"--text-source {path}: no rows with a non-empty 'text' column")
    return texts


def make_docs(builder: PromptBuilder, tokenizer: Any, texts: list[str], *, docs: int,
              lengths: tuple[int, int], seed: int = 0) -> list[SynthDoc]:
    """``docs`` documents whose prompts are ``lengths[0]``..``lengths[1]`` tokens long."""
    lo, hi = lengths
    if not 0 < lo <= hi:
        raise ConfigError(f"--input-len {lo}-{hi}: give MIN-MAX with 0 < MIN <= MAX, e.g. 2000-4000")
    if hi > builder.limit:
        raise ConfigError(f"--input-len {lo}-{hi}: prompts of {hi} tokens do not fit max_model_len "
                          f"{builder.max_model_len} minus {builder.max_tokens} output tokens. Lower the "
                          f"range or raise --max-model-len.")
    stream = _token_stream(tokenizer, texts)
    overhead = len(builder.build(["x"], [{}])[0].token_ids or []) - 1
    if lo <= overhead:
        raise ConfigError(f"--input-len {lo}-{hi}: the prompt template alone is {overhead} tokens; "
                          f"ask for more than that")
    rng = random.Random(seed)
    return [_doc(builder, tokenizer, stream, rng.randint(lo, hi), overhead, rng, (lo, hi)) for _ in range(docs)]


def random_prompts(docs: int, lengths: tuple[int, int], vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Prompts of random token ids (no shared prefix, nothing a prefix cache can reuse), drawn from
    the upper part of the vocabulary (the lowest ids are often special tokens)."""
    rng = random.Random(seed)
    low = min(1000, vocab_size // 4)
    return [[rng.randrange(low, vocab_size) for _ in range(rng.randint(*lengths))] for _ in range(docs)]


def _token_stream(tokenizer: Any, texts: list[str]) -> list[int]:
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
    if len(stream) < 64:
        raise ConfigError("the source texts hold fewer than 64 tokens; give a bigger --text-source")
    return stream


def _doc(builder: PromptBuilder, tokenizer: Any, stream: list[int], target: int, overhead: int,
         rng: random.Random, bounds: tuple[int, int]) -> SynthDoc:
    size = max(target - overhead, 1)
    start = rng.randrange(len(stream))
    for _ in range(_TRIES):
        text = tokenizer.decode(_window(stream, start, size), skip_special_tokens=True)
        ids = builder.build([text], [{}])[0].token_ids or []
        if bounds[0] <= len(ids) <= bounds[1] and text.strip():
            return SynthDoc(text, ids)
        size = max(size + (target - len(ids)), 1)
    raise ConfigError(f"could not build a document of {target} prompt tokens from the source texts "
                      f"(got {len(ids)}); widen --input-len")


def _window(stream: list[int], start: int, size: int) -> list[int]:
    """``size`` tokens from ``start``, wrapping around the stream (repeated as needed)."""
    out: list[int] = []
    while len(out) < size:
        take = stream[start:start + size - len(out)]
        out.extend(take)
        start = 0
    return out
