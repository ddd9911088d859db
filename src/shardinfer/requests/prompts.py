"""Rows to prompt token ids: user template, chat template, and the over-long-input policy.

Both engines receive token ids built here, so prompt token counts, truncation and the chat template
are identical whichever engine runs.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from shardinfer.config import Config, PromptConfig
from shardinfer.errors import ConfigError
from shardinfer.requests.fast_prompts import BatchEncoder, ChatFrame, renders_own_template
from shardinfer.requests.row_options import RowOptions

TRUNCATION_MARKER = "\n[...]\n"
SYSTEM = "_system"  # a row's own system message, among the columns handed to render
# A huge document is first cut to this many characters per kept token at each end, so a
# 50 MB row is never tokenized whole; no tokenizer packs more characters into one token.
_CHARS_PER_TOKEN_BOUND = 32
_FRAME_CHECKS = 8  # rows of each batch rendered by the chat template as well (see ChatFrame)


def template_fields(template: str) -> list[str]:
    """Column names used by a ``str.format`` template, e.g. ``{text}`` and ``{title}``."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"prompt.user: {exc}. Write literal braces as {{{{ and }}}}.") from exc
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            field = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ConfigError(
                f"prompt.user: placeholder {{{field}}} must be a plain column name such as {{text}} or {{title}} "
                f"(no format spec or !conversion); write literal braces as {{{{ and }}}}"
            )
        if name not in names:
            names.append(name)
    return names


def request_columns(cfg: Config) -> list[tuple[str, str]]:
    """(config key, column) of every input column a row's request reads besides its text."""
    pairs = [("prompt.user", f) for f in template_fields(cfg.prompt.user) if f != "text"]
    if cfg.input.pair_column:
        pairs.append(("input.pair_column", cfg.input.pair_column))
    if cfg.input.system_column:
        pairs.append(("input.system_column", cfg.input.system_column))
    if cfg.model.lora_column:
        pairs.append(("model.lora_column", cfg.model.lora_column))
    pairs += [(f"sampling.per_row.{option}", column) for option, column in cfg.sampling.per_row.items()]
    return pairs


@dataclass
class Prompt:
    """A row's request to the engine: its prompt token ids and options (or why it has none)."""

    token_ids: list[int] | None
    truncated: bool = False
    token_type_ids: list[int] | None = None  # pairs for a cross-encoder that tells its two texts apart
    problem: str | None = None
    options: RowOptions | None = None  # None: the config's sampling
    endpoint: str | None = None  # OpenAI batch requests: the request's url
    model: str | None = None  # OpenAI batch requests: the request's model
    # A request of several inputs (OpenAI pooling lines): one engine request per part, in input order;
    # the row's result is every part's values.
    parts: list[Prompt] | None = None
    cosine_queries: int | None = None  # bi-encoder scoring: the first parts are queries, values are cosines
    line_options: dict[str, Any] | None = None  # OpenAI pooling lines: what shapes the output line

    @property
    def runnable(self) -> bool:
        """Whether the row goes to the engine (as its token ids, or as its parts)."""
        return self.token_ids is not None or self.parts is not None

    def requests(self) -> list[Prompt]:
        """The engine requests of the row: its parts, or itself."""
        return self.parts if self.parts is not None else [self]

    @property
    def prompt_tokens(self) -> int:
        """Tokens sent to the engine for the row (every part's)."""
        return sum(len(p.token_ids or ()) for p in self.requests())


class PromptBuilder:
    """Renders rows into prompt token ids that fit ``max_model_len - max_tokens``."""

    def __init__(self, cfg: PromptConfig, tokenizer: Any, *, max_model_len: int, max_tokens: int,
                 generation_prompt: bool = True):
        self.cfg = cfg
        self.generation_prompt = generation_prompt  # pooling tasks read the chat as it is
        self.tokenizer = tokenizer
        self.limit = max_model_len - max_tokens
        self.max_model_len = max_model_len
        self.max_tokens = max_tokens
        self._frame: ChatFrame | None = None  # made on first use, as are the encoders
        self._encoders: dict[bool, BatchEncoder] = {}

    def build(self, texts: list[str], columns: list[dict[str, Any]],
              max_tokens: list[int] | None = None) -> list[Prompt]:
        """Prompts for a batch of valid rows (texts are non-empty strings); ``max_tokens`` per row
        when rows set their own."""
        budgets = max_tokens or [self.max_tokens] * len(texts)
        if texts and self.cfg.mode == "chat":
            self._check_frame(texts, columns)
        huge = [len(t) > self._limit(b) * _CHARS_PER_TOKEN_BOUND for t, b in zip(texts, budgets)]
        rendered: list[str | Exception | None] = [
            None if h else self._try_render(t, c) for t, c, h in zip(texts, columns, huge)]
        ok = [r for r in rendered if isinstance(r, str)]
        encoded = iter(self._encode(ok) if ok else [])
        prompts = []
        for text, cols, is_huge, r, budget in zip(texts, columns, huge, rendered, budgets):
            if isinstance(r, Exception):
                prompts.append(Prompt(None, problem=f"prompt_error: {type(r).__name__}: {r}"))
                continue
            ids = None if is_huge else next(encoded)
            if ids is not None and len(ids) <= self._limit(budget):
                prompts.append(Prompt(ids))
            else:
                prompts.append(self._too_long(text, cols, len(ids) if ids else None, budget))
        return prompts

    def _limit(self, max_tokens: int) -> int:
        """Prompt tokens that leave room for ``max_tokens`` of output."""
        return self.max_model_len - max_tokens

    def _try_render(self, text: str, columns: dict[str, Any]) -> str | Exception:
        try:
            return self.render(text, columns)
        except Exception as exc:  # noqa: BLE001 - a template error fails this row only
            return exc

    def render(self, text: str, columns: dict[str, Any]) -> str:
        user, system = self._user_and_system(text, columns)
        if self.cfg.mode == "raw":
            return user
        framed = self.chat_frame().apply(user) if system == self.cfg.system else None
        if framed is not None:
            return framed
        return self.chat(self._messages(user, system))

    def _user_and_system(self, text: str, columns: dict[str, Any]) -> tuple[str, str | None]:
        values = {k: "" if v is None else v for k, v in columns.items()}
        system = values.pop(SYSTEM, None) or self.cfg.system
        return self.cfg.user.format_map({**values, "text": text}), system

    @staticmethod
    def _messages(user: str, system: str | None) -> list[dict[str, Any]]:
        messages = [{"role": "user", "content": user}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        return messages

    def chat(self, messages: list[dict[str, Any]]) -> str:
        """A chat rendered by the model's chat template, ready for the assistant's turn."""
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=self.generation_prompt, **self.cfg.chat_template_kwargs
        )

    def chat_frame(self) -> ChatFrame:
        """The chat template rendered once around the user's message (with the config's system
        message), for rows without a system message of their own."""
        if self._frame is None:
            self._frame = ChatFrame(self.chat, self.cfg.system, enabled=renders_own_template(self.tokenizer))
        return self._frame

    def _check_frame(self, texts: list[str], columns: list[dict[str, Any]]) -> None:
        """A few rows of a batch (the first, then spread over it) rendered both ways: the frame
        stays only while they agree."""
        users = []
        for i in sorted({0, *range(0, len(texts), max(len(texts) // _FRAME_CHECKS, 1))})[:_FRAME_CHECKS]:
            try:
                user, system = self._user_and_system(texts[i], columns[i])
            except Exception:  # noqa: BLE001 - the row fails when it is rendered
                continue
            if system == self.cfg.system:
                users.append(user)
        self.chat_frame().check(users)

    def encode(self, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
        """Token ids of many texts in one call (as ``tokenizer(texts, ...)["input_ids"]``)."""
        if add_special_tokens not in self._encoders:
            self._encoders[add_special_tokens] = BatchEncoder(self.tokenizer, add_special_tokens=add_special_tokens)
        return self._encoders[add_special_tokens](texts)

    def _encode(self, prompts: list[str]) -> list[list[int]]:
        # The chat template already holds the special tokens; raw prompts get the tokenizer's own.
        return self.encode(prompts, add_special_tokens=self.cfg.mode == "raw")

    def _too_long(self, text: str, columns: dict[str, Any], n_tokens: int | None, max_tokens: int) -> Prompt:
        if self.cfg.too_long == "fail":
            return Prompt(None, problem=self._too_long_message(n_tokens, max_tokens))
        return self._truncate(text, columns, n_tokens, max_tokens)

    def _too_long_message(self, n_tokens: int | None, max_tokens: int) -> str:
        limit = self._limit(max_tokens)
        size = f"{n_tokens} tokens" if n_tokens else f"more than {limit} tokens"
        return (
            f"too_long: prompt has {size}, the limit is {limit} "
            f"(max_model_len {self.max_model_len} - max_tokens {max_tokens}); "
            f"set prompt.too_long=truncate or raise model.max_model_len"
        )

    def _truncate(self, text: str, columns: dict[str, Any], n_tokens: int | None, max_tokens: int) -> Prompt:
        """Keep the head and the tail of the text, joined by a marker, so the prompt fits."""
        limit = self._limit(max_tokens)
        overhead = len(self._encode([self.render(TRUNCATION_MARKER, columns)])[0])
        keep = limit - overhead
        for _ in range(8):
            if keep <= 0:
                break
            ids = self._encode([self.render(self.head_and_tail(text, keep), columns)])[0]
            if len(ids) <= limit:
                return Prompt(ids, truncated=True)
            keep -= len(ids) - limit + 2
        return Prompt(None, problem=self._too_long_message(n_tokens, max_tokens)
                      + " (the template without the text already fills the limit)")

    def head_and_tail(self, text: str, keep: int) -> str:
        window = keep * _CHARS_PER_TOKEN_BOUND
        if len(text) > 2 * window:
            text = text[:window] + text[-window:]
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        head, tail = ids[: keep - keep // 2], ids[len(ids) - keep // 2:] if keep // 2 else []
        decode = self.tokenizer.decode
        return decode(head) + TRUNCATION_MARKER + decode(tail)
