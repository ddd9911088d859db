"""Rows of two texts to token ids: (query, document) pairs for a cross-encoder (``task: score``) and
(prompt, response) conversations for a reward model (``task: reward``).

A pair is tokenized as vLLM's ``LLM.score`` tokenizes it for a cross-encoder (the tokenizer's own
pair encoding, ``tokenizer(text=query, text_pair=document)``), so scores equal vLLM's on the same
pair. A pair over the context keeps its query and cuts the document's end (``prompt.too_long:
truncate``, status truncated) or fails; so does a (prompt, response) conversation, whose prompt is
cut (head and tail kept) and response kept whole. A row whose second
text is missing or not text fails alone, naming the column.
"""

from __future__ import annotations

from typing import Any

from shardinfer.config import Config
from shardinfer.requests.prompts import TRUNCATION_MARKER, Prompt, PromptBuilder


def _chat(prompt: str, response: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


class PairBuilder:
    """The prompts of ``task: score`` and of ``task: reward`` with ``input.pair_column``."""

    def __init__(self, cfg: Config, tokenizer: Any, text: PromptBuilder, *, max_model_len: int):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.text = text  # renders conversations with the chat template
        self.max_model_len = max_model_len
        self.column = cfg.input.pair_column

    def build(self, texts: list[str], columns: list[dict[str, Any]]) -> list[Prompt]:
        firsts, seconds, problems = self._pairs(texts, columns)
        ok = [i for i, p in enumerate(problems) if p is None]
        made = iter(self._score([firsts[i] for i in ok], [seconds[i] for i in ok]) if self.cfg.task == "score"
                    else self._reward([firsts[i] for i in ok], [seconds[i] for i in ok]))
        return [Prompt(None, problem=p) if p is not None else next(made) for p in problems]

    def _pairs(self, texts: list[str], columns: list[dict[str, Any]]) -> tuple[list[str], list[str], list[str | None]]:
        """(first texts, second texts, problems): the row's text and its pair column, or the config's
        query and the row's text."""
        query = self.cfg.pooling.query
        if query is not None:
            return [query] * len(texts), texts, [None] * len(texts)
        firsts, seconds, problems = [], [], []
        for text, cols in zip(texts, columns):
            value = cols.get(self.column) if self.column else None
            firsts.append(text)
            seconds.append(value if isinstance(value, str) else "")
            problems.append(self._problem(value))
        return firsts, seconds, problems

    def _problem(self, value: Any) -> str | None:
        what = "document" if self.cfg.task == "score" else "response"
        if value is None:
            return (f"missing_pair: column {self.column!r} (input.pair_column) is null or missing in this row; "
                    f"give each row its {what}")
        if not isinstance(value, str):
            return (f"not_text: column {self.column!r} (input.pair_column) holds {type(value).__name__}, not text; "
                    f"give the {what} as a string")
        if not value.strip():
            return f"empty_text: column {self.column!r} (input.pair_column) is empty in this row"
        return None

    def _score(self, queries: list[str], documents: list[str]) -> list[Prompt]:
        if not queries:
            return []
        encoded = self.tokenizer(text=queries, text_pair=documents)
        types = encoded.get("token_type_ids")
        prompts = []
        for i, ids in enumerate(encoded["input_ids"]):
            if len(ids) <= self.max_model_len:
                prompts.append(Prompt(ids, token_type_ids=types[i] if types is not None else None))
            else:
                prompts.append(self._too_long_pair(queries[i], documents[i], len(ids)))
        return prompts

    def _too_long_pair(self, query: str, document: str, n_tokens: int) -> Prompt:
        """Cut the document to fit; a query that alone fills the context is cut too (longest first)."""
        if self.cfg.prompt.too_long == "truncate":
            for how in ("only_second", "longest_first"):
                try:
                    cut = self.tokenizer(text=query, text_pair=document, truncation=how, max_length=self.max_model_len)
                except Exception:  # noqa: BLE001 - the tokenizer cannot cut this way: try the next
                    continue
                if len(cut["input_ids"]) <= self.max_model_len:
                    return Prompt(cut["input_ids"], truncated=True, token_type_ids=cut.get("token_type_ids"))
        return Prompt(None, problem=f"too_long: the pair has {n_tokens} tokens, the limit is max_model_len "
                                    f"{self.max_model_len}; set prompt.too_long=truncate (cuts the document) or "
                                    f"raise model.max_model_len")

    def _reward(self, prompts: list[str], responses: list[str]) -> list[Prompt]:
        built = []
        for prompt, response in zip(prompts, responses):
            made = self.conversation(_chat(prompt, response))
            if made.token_ids is None and made.problem and made.problem.startswith("too_long") \
                    and self.cfg.prompt.too_long == "truncate":
                made = self._cut_prompt(prompt, response) or made
            built.append(made)
        return built

    def _cut_prompt(self, prompt: str, response: str) -> Prompt | None:
        """The conversation with the prompt's head and tail kept (the response whole) so it fits, or
        None when the response alone fills the context."""
        overhead = self.conversation(_chat(TRUNCATION_MARKER, response)).token_ids
        if overhead is None:
            return None
        keep = self.max_model_len - len(overhead)
        for _ in range(8):
            if keep <= 0:
                return None
            made = self.conversation(_chat(self.text.head_and_tail(prompt, keep), response))
            if made.token_ids is not None:
                return Prompt(made.token_ids, truncated=True)
            keep -= max(keep // 8, 2)
        return None

    def conversation(self, messages: list[dict[str, Any]]) -> Prompt:
        """A whole conversation (the reward model reads the response's turn) as token ids; over the
        context it fails."""
        try:
            rendered = self.text.chat(messages)
        except Exception as exc:  # noqa: BLE001 - a chat the template refuses fails its row only
            return Prompt(None, problem=f"prompt_error: the chat template refused this chat: {exc}")
        ids = self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_model_len:
            return Prompt(None, problem=f"too_long: the conversation has {len(ids)} tokens, the limit is "
                                        f"max_model_len {self.max_model_len}; shorten it or raise model.max_model_len")
        return Prompt(ids)
