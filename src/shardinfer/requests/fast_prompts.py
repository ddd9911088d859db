"""Fast paths of prompt building, each used only where it gives exactly what the plain way gives.

A worker builds hundreds of thousands of prompts; two per-row costs dominated once the tokenizer
itself was batched: the chat template rendered with jinja for every row, and the tokenizer call's
conversion of every encoding into a dict of lists (ids, attention mask, ...) of which one list is
used. Both are replaced here, with checks:

- :class:`ChatFrame`: the chat template rendered once around a placeholder, so a row's prompt is
  ``prefix + content + suffix``. Only for a transformers tokenizer's own jinja template (not a
  rendering function put in its place), and only when the template puts the user's content in the
  prompt as it is: probe contents (whitespace at the ends, special-token text, braces, non-ASCII,
  ...) must come out the same both ways, and a few rows of every batch are rendered both ways too;
  any difference and the template is rendered per row from then on. What no check can show is a
  template that refuses (raises on) a content none of them had: such a row gets its prompt instead
  of failing. Rows with a system message of their own are rendered per row.
- :class:`BatchEncoder`: token ids straight from a fast tokenizer's backend (``tokenizers``), when
  it gives the ids the tokenizer's own call gives for probe texts and for the first row of every
  batch; otherwise the tokenizer's own call.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# Contents a template might change: a template that trims, escapes, rewrites tags or branches on
# any of these is rendered per row.
PROBES = (
    "Hello, World.",
    "  leading and trailing whitespace \n\n",
    "line one\nline two\r\n\ttabbed",
    "<think>reasoning</think> the answer",
    "<tool_response>{}</tool_response>",
    "<|im_start|>user\n{{ braces }} {% raw %} <|im_end|><|endoftext|>",
    "ünïcödé — ελληνικά 中文 🙂 'quotes' \"double\" \\ backslash",
    "/no_think /think",
)

Messages = list[dict[str, Any]]


class ChatFrame:
    """A chat template's output around one user message, rendered once: ``prefix``, ``suffix``."""

    def __init__(self, render: Callable[[Messages], str], system: str | None, *, enabled: bool = True):
        self.render = render
        self.system = system
        self.frame = self._find() if enabled else None

    def messages(self, content: str) -> Messages:
        messages = [{"role": "user", "content": content}]
        if self.system:
            messages.insert(0, {"role": "system", "content": self.system})
        return messages

    def apply(self, content: str) -> str | None:
        """The rendered prompt for ``content``, or None when the template must render it itself."""
        if self.frame is None or not content:  # an empty message may be what a template refuses
            return None
        return self.frame[0] + content + self.frame[1]

    def check(self, contents: list[str]) -> None:
        """Render ``contents`` (a few rows of a batch) both ways; on a difference, or an error, the
        frame is dropped for good."""
        if self.frame is None:
            return
        try:
            same = all(self.render(self.messages(c)) == self.apply(c) for c in contents if c)
        except Exception:  # noqa: BLE001 - the row renders (and fails) the plain way
            same = False
        if not same:
            log.warning("the chat template changes some contents; rendering it for every row")
            self.frame = None

    def _find(self) -> tuple[str, str] | None:
        sentinel = f"\x1eshardinfer-{secrets.token_hex(8)}\x1e"
        try:
            rendered = self.render(self.messages(sentinel))
            if rendered.count(sentinel) != 1:
                return None
            prefix, suffix = rendered.split(sentinel)
            if all(self.render(self.messages(p)) == prefix + p + suffix for p in PROBES):
                return prefix, suffix
        except Exception:  # noqa: BLE001 - a template that refuses the probes renders per row
            return None
        return None


class BatchEncoder:
    """``tokenizer(texts, add_special_tokens=...)["input_ids"]``, from the backend when that is
    the same."""

    def __init__(self, tokenizer: Any, *, add_special_tokens: bool):
        self.tokenizer = tokenizer
        self.add_special_tokens = add_special_tokens
        self.backend = _backend(tokenizer)
        if self.backend is not None and not self._agrees(list(PROBES)):
            self.backend = None

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if self.backend is None or not texts:
            return self._plain(texts)
        ids = self._fast(texts)
        if ids[0] != self._plain(texts[:1])[0]:  # the tokenizer's settings changed since
            log.warning("the tokenizer's backend gives other ids than the tokenizer; using the tokenizer")
            self.backend = None
            return self._plain(texts)
        return ids

    def _plain(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return list(self.tokenizer(texts, add_special_tokens=self.add_special_tokens)["input_ids"])

    def _fast(self, texts: list[str]) -> list[list[int]]:
        encode = getattr(self.backend, "encode_batch_fast", None) or self.backend.encode_batch
        return [e.ids for e in encode(texts, add_special_tokens=self.add_special_tokens)]

    def _agrees(self, texts: list[str]) -> bool:
        """Same ids both ways; the plain call first, as it resets the backend's truncation and
        padding, which the fast call would otherwise apply."""
        try:
            plain = self._plain(texts)
            backend = self.backend
            if getattr(backend, "truncation", None) is not None or getattr(backend, "padding", None) is not None:
                return False
            return self._fast(texts) == plain
        except Exception:  # noqa: BLE001 - any trouble: the tokenizer's own call
            return False


def renders_own_template(tokenizer: Any) -> bool:
    """Whether the tokenizer renders chats with its own jinja template (transformers' method, not
    a function set on the object): what the probes of :class:`ChatFrame` are meant to check."""
    return isinstance(getattr(tokenizer, "chat_template", None), str) and "apply_chat_template" not in vars(tokenizer)


def _backend(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` behind a transformers fast tokenizer, else None."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if isinstance(backend, Tokenizer) else None
