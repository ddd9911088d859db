"""The ``sim`` engine of the scale simulation: a GPU that only takes time.

It answers every prompt with ``max_tokens`` tokens after sleeping as long as a real engine would
take at ``TOKENS_PER_S`` (prompt and output tokens), and brings a word tokenizer so worker processes
load no model and no transformers. Everything around it (plan, ledger, parts, reduce) is the real
pipeline. Importing this module registers the engine.
"""

from __future__ import annotations

import subprocess
import time
import zlib
from typing import Any

from shardinfer.config import Config, ModelConfig
from shardinfer.engines.base import BatchQueue, Completion
from shardinfer.engines.registry import EngineSpec, Span, register_engine
from shardinfer.requests.prompts import Prompt

TOKENS_PER_S = 4000.0  # set by the simulation before it starts the workers
VOCAB = 50_000


class WordTokenizer:
    """One token per whitespace-separated word; enough of a tokenizer for the prompt builder."""

    eos_token_id = 0
    pad_token_id = 0

    def __call__(self, texts: str | list[str], add_special_tokens: bool = False) -> dict[str, Any]:
        many = [texts] if isinstance(texts, str) else texts
        ids = [[1 + zlib.crc32(w.encode()) % (VOCAB - 1) for w in t.split()] for t in many]
        return {"input_ids": ids[0] if isinstance(texts, str) else ids}

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False,
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        return " ".join(f"<{m['role']}> {m['content']}" for m in messages) + " <assistant>"

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(f"w{i}" for i in ids)

    def __len__(self) -> int:
        return VOCAB


class SleepEngine(BatchQueue):
    name = "sim"

    def __init__(self, cfg: Config, max_model_len: int):
        super().__init__(attempts=cfg.run.max_attempts)
        self.max_tokens = cfg.sampling.max_tokens

    def load(self) -> None:
        pass

    def generate(self, prompts: list[Prompt]) -> list[Completion]:
        time.sleep(sum(len(p.token_ids or ()) + self.max_tokens for p in prompts) / TOKENS_PER_S)
        out = list(range(1, self.max_tokens + 1))
        return [Completion(out, "", "length") for _ in prompts]

    def versions(self) -> dict[str, str]:
        return {"sim": f"{TOKENS_PER_S:g} tokens/s"}


def _tokenizer(model: ModelConfig) -> WordTokenizer:
    return WordTokenizer()


def _follower(cfg: Config, max_model_len: int, span: Span) -> None:
    """A follower node of a simulated replica: a stand-in engine process that runs until stopped."""
    subprocess.run(["sleep", "infinity"], check=False)


SPEC = register_engine(EngineSpec(
    name="sim", description="simulation: sleeps as long as a real engine would take", create=SleepEngine,
    modules=(), extra="", takes_args=False, replica_gpus=lambda model, node_gpus: 1, tokenizer=_tokenizer,
    follower=_follower, span_args=lambda span: {}))
