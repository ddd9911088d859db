"""Rows to engine requests: prompt token ids plus each row's own options.

Three kinds of rows, one per input mode:

- **text** (``input.text_column``): the ``prompt.user`` template, the chat template, truncation of
  over-long documents (:class:`~shardinfer.prompts.PromptBuilder`);
- **messages** (``input.messages_column``): a chat sent as it is (a per-row or the config's system
  message is put first when the chat has none);
- **openai** (``input.format: openai-batch``): a Batch API request line (:mod:`shardinfer.openai_batch`);
  a pooling line (embeddings, score, rerank) becomes one engine request per input, the parts of its
  prompt (:mod:`shardinfer.requests.openai_pooling`).

Options start from ``sampling`` and may be set per row from columns (``sampling.per_row``), by a
row's adapter column (``model.lora_column``) or by a request body. A row whose request cannot be
made fails alone, with the reason; chats and requests that do not fit the context fail (only text
rows are truncated).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from shardinfer.config import Config
from shardinfer.models.tasks import pooled_shape
from shardinfer.requests.openai_batch import check_messages, parse_request
from shardinfer.requests.openai_pooling import PoolingPrompts, PoolingRequest, RunPooling
from shardinfer.requests.pairs import PairBuilder
from shardinfer.requests.prompts import SYSTEM, Prompt, PromptBuilder, template_fields
from shardinfer.requests.row_options import OptionError, RowOptions, base_options
from shardinfer.results import ResultExtras


def served_names(cfg: Config) -> list[str]:
    """Model names an OpenAI batch request may give: model.served_name, else the path and its last part."""
    if cfg.model.served_name:
        return [cfg.model.served_name]
    path = cfg.model.path.rstrip("/")
    return list(dict.fromkeys([path, Path(path).name]))


def result_extras(cfg: Config) -> ResultExtras:
    """The optional result columns of a run: those its config can ask for, the same for every part."""
    per_row, mode = set(cfg.sampling.per_row), input_mode(cfg)
    base = base_options(cfg.sampling)
    if cfg.task != "generate":
        return ResultExtras(openai=mode == "openai", base=base, pooled=pooled_shape(cfg))
    return ResultExtras(
        samples=base.n > 1 or "n" in per_row or mode == "openai",
        logprobs=base.logprobs is not None or "logprobs" in per_row or mode == "openai",
        structured=base.structured is not None or bool(per_row & {"json_schema", "regex", "choice"})
        or mode == "openai",
        openai=mode == "openai", adapters=bool(cfg.model.lora), base=base)


def run_pooling(cfg: Config) -> RunPooling:
    """What an OpenAI pooling line is checked against: the run's task, dimensions and activation."""
    if cfg.task == "embed":
        normalize = cfg.pooling.normalize
        return RunPooling("embed", cfg.pooling.dimensions, True if normalize is None else normalize)
    activation = cfg.pooling.activation
    return RunPooling(cfg.task, activation=(cfg.task != "reward") if activation is None else activation)


def input_mode(cfg: Config) -> str:
    if cfg.input.format == "openai-batch":
        return "openai"
    return "messages" if cfg.input.messages_column else "text"


@dataclass
class _Chat:
    """A row's request before tokenization: a chat to template or a raw prompt."""

    options: RowOptions
    messages: list[dict[str, Any]] | None = None
    raw: str | None = None
    endpoint: str | None = None
    model: str | None = None


class RequestBuilder:
    """Builds the :class:`Prompt` of every valid row of a unit."""

    def __init__(self, cfg: Config, tokenizer: Any, *, max_model_len: int, capabilities: Any = None):
        self.cfg = cfg
        self.mode = input_mode(cfg)
        self.base = base_options(cfg.sampling)
        self.pooling = cfg.task != "generate"
        self.output_budget = 0 if self.pooling else cfg.sampling.max_tokens  # context kept for the output
        self.text = PromptBuilder(cfg.prompt, tokenizer, max_model_len=max_model_len, max_tokens=self.output_budget,
                                  generation_prompt=not self.pooling)
        self.pairs = (PairBuilder(cfg, tokenizer, self.text, max_model_len=max_model_len)
                      if cfg.task == "score" or (cfg.task == "reward" and cfg.input.pair_column) else None)
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.capabilities = capabilities
        self.served = served_names(cfg)
        self.run_pooling = run_pooling(cfg)
        self.pooling_lines = PoolingPrompts(tokenizer, task=cfg.task, max_model_len=max_model_len)
        self.template_keys = set(template_fields(cfg.prompt.user))  # parsed once, not per batch

    def build(self, texts: list[str], columns: list[dict[str, Any]]) -> list[Prompt]:
        """Prompts for a batch of valid rows (``texts`` are their ``_text`` values, ``columns`` the
        request columns of each row)."""
        if self.pairs is not None and self.mode == "text":
            return self.pairs.build(texts, columns)
        if self.mode == "text":
            return self._text_rows(texts, columns)
        prompts: list[Prompt | None] = [None] * len(texts)
        chats: dict[int, _Chat] = {}
        for i, (text, cols) in enumerate(zip(texts, columns)):
            try:
                request = self._openai(text) if self.mode == "openai" else self._messages(text, cols)
            except OptionError as exc:
                prompts[i] = Prompt(None, problem=f"{exc.code}: {exc}")
                continue
            if isinstance(request, PoolingRequest):
                prompts[i] = self.pooling_lines.prompt(request)
            else:
                chats[i] = request
        for i, prompt in zip(chats, self._encode(list(chats.values()))):
            prompts[i] = prompt
        return [p for p in prompts if p is not None]

    def _text_rows(self, texts: list[str], columns: list[dict[str, Any]]) -> list[Prompt]:
        options: list[RowOptions | OptionError] = [self._row_options(c) for c in columns]
        ok = [i for i, o in enumerate(options) if isinstance(o, RowOptions)]
        template_columns = [{k: v for k, v in columns[i].items() if k in self.template_keys} for i in ok]
        for cols, i in zip(template_columns, ok):
            if self.cfg.input.system_column:
                cols[SYSTEM] = columns[i].get(self.cfg.input.system_column)
        budgets = None if self.pooling else [o.max_tokens for o in options if isinstance(o, RowOptions)]
        built = self.text.build([texts[i] for i in ok], template_columns, budgets)
        prompts: list[Prompt] = []
        made = iter(built)
        for o in options:
            if isinstance(o, OptionError):
                prompts.append(Prompt(None, problem=f"{o.code}: {o}"))
                continue
            prompt = next(made)
            prompt.options = None if o is self.base or o == self.base else o
            prompts.append(self._supported(prompt))
        return prompts

    def _row_options(self, columns: dict[str, Any]) -> RowOptions | OptionError:
        """The config's options with the row's own (per-row columns, adapter column) applied."""
        options = self.base
        try:
            for option, column in self.cfg.sampling.per_row.items():
                value = columns.get(column)
                if value is not None:
                    options = options.set(option, value, f"column {column!r} (sampling.per_row.{option})")
            if self.cfg.model.lora_column:
                options = self._adapter(options, columns.get(self.cfg.model.lora_column))
        except OptionError as exc:
            return exc
        return options

    def _adapter(self, options: RowOptions, name: Any) -> RowOptions:
        if name is None or name == "":
            return options
        if name not in self.cfg.model.lora:
            raise OptionError(f"column {self.cfg.model.lora_column!r}: adapter {name!r} is not in model.lora "
                              f"(adapters: {', '.join(self.cfg.model.lora) or 'none'})", "unknown_adapter")
        return replace(options, lora=str(name))

    def _messages(self, text: str, columns: dict[str, Any]) -> _Chat:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise OptionError(f"column {self.cfg.input.messages_column!r}: not a chat (a list of {{role, content}}) "
                              f"nor its JSON text: {exc.msg}", "invalid_messages") from exc
        messages = check_messages(value, f"column {self.cfg.input.messages_column!r}")
        system = columns.get(self.cfg.input.system_column) if self.cfg.input.system_column else None
        system = system or self.cfg.prompt.system
        if system and messages[0]["role"] not in ("system", "developer"):
            messages = [{"role": "system", "content": str(system)}, *messages]
        options = self._row_options(columns)
        if isinstance(options, OptionError):
            raise options
        return _Chat(options, messages=messages)

    def _openai(self, text: str) -> _Chat | PoolingRequest:
        request = parse_request(text, self.base, self.served, self.cfg.model.lora, self.run_pooling)
        if isinstance(request, PoolingRequest):
            return request
        return _Chat(request.options, messages=request.messages, raw=request.prompt, endpoint=request.endpoint,
                     model=request.model)

    def _encode(self, chats: list[_Chat]) -> list[Prompt]:
        """Render and tokenize chats (chat template, no added special tokens) and raw prompts (the
        tokenizer's own special tokens); a request longer than its context fails."""
        rendered: list[str | OptionError] = []
        for chat in chats:
            try:
                rendered.append(self.text.chat(chat.messages) if chat.messages is not None else chat.raw or "")
            except Exception as exc:  # noqa: BLE001 - a chat the template refuses fails its row only
                rendered.append(OptionError(f"the chat template refused this chat: {exc}", "prompt_error"))
        token_ids = self._token_ids(chats, rendered)
        prompts = []
        for i, (chat, text) in enumerate(zip(chats, rendered)):
            if isinstance(text, OptionError):
                prompts.append(Prompt(None, problem=f"{text.code}: {text}"))
                continue
            prompts.append(self._supported(self._fit(chat, token_ids[i])))
        return prompts

    def _token_ids(self, chats: list[_Chat], rendered: list[str | OptionError]) -> dict[int, list[int]]:
        """Token ids of the rendered requests, by position: one tokenizer call for the chats, one
        for the raw prompts (which get the tokenizer's special tokens)."""
        ids: dict[int, list[int]] = {}
        for raw in (False, True):
            index = [i for i, (c, t) in enumerate(zip(chats, rendered))
                     if isinstance(t, str) and (c.messages is None) == raw]
            ids.update(zip(index, self.text.encode([str(rendered[i]) for i in index], add_special_tokens=raw)))
        return ids

    def _fit(self, chat: _Chat, ids: list[int]) -> Prompt:
        options = None if chat.options == self.base else chat.options
        budget = 0 if self.pooling else chat.options.max_tokens
        limit = self.max_model_len - budget
        if len(ids) > limit:
            problem = (f"context_length_exceeded: the prompt has {len(ids)} tokens, the limit is {limit} "
                       f"(max_model_len {self.max_model_len} - max_tokens {budget}); shorten "
                       f"the request, lower its max_tokens or raise model.max_model_len")
            return Prompt(None, problem=problem, endpoint=chat.endpoint, model=chat.model)
        return Prompt(ids, options=options, endpoint=chat.endpoint, model=chat.model)

    def _supported(self, prompt: Prompt) -> Prompt:
        """A row asking for what the engine cannot do fails, naming it."""
        if prompt.options is None or self.capabilities is None or prompt.problem is not None:
            return prompt
        missing = prompt.options.unsupported(self.capabilities)
        if missing:
            return replace(prompt, token_ids=None,
                           problem=f"unsupported: engine {self.cfg.model.engine} does not support {missing}; "
                                   f"use model.engine=vllm")
        return prompt
