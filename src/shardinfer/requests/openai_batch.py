"""OpenAI Batch API files: request lines in, the Batch API's output file out.

A request line is ``{"custom_id", "method": "POST", "url", "body"}`` with ``url``
``/v1/chat/completions`` (``body.messages``) or ``/v1/completions`` (``body.prompt``), run by
``task: generate``, or a pooling endpoint (``/v1/embeddings``, ``/score``, ``/rerank``: see
:mod:`shardinfer.requests.openai_pooling`), run by ``task: embed`` or ``score``. The body's
options start from the config's ``sampling`` and are checked like any per-row option; a request
that cannot run (its endpoint not answered by the run's task included) fails alone, its reason
becoming the ``error`` of its output line.

The output file has one line per request, in input order: ``{"id", "custom_id", "response":
{"status_code": 200, "request_id", "body": <chat.completion | text_completion>}, "error": null}``,
or ``"response": null`` and ``"error": {"code", "message"}`` for a request that failed. A pooling
line's body is an embeddings, score or rerank response (:func:`~shardinfer.requests.openai_pooling.pooling_body`).

Both lines are typed dicts checked with pydantic (:class:`RequestLine`, :class:`OutputLine`):
they are read and written as JSON objects, and checking a typed dict costs a third of building a
model (microseconds per line, on every line of a batch). A request's body is checked option by
option, as the per-row options of the other formats are (RowOptions).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import pyarrow as pa
from pydantic import AfterValidator, InstanceOf, TypeAdapter, ValidationError
from typing_extensions import NotRequired, TypedDict  # pydantic reads typing's TypedDict from Python 3.12 only

from shardinfer.requests.openai_pooling import (
    EMBEDDINGS,
    PoolingRequest,
    RunPooling,
    endpoint_problem,
    parse_pooling,
    pooling_body,
    pooling_kind,
)
from shardinfer.requests.row_options import OptionError, RowOptions, structured_of

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
OUTPUT_FILE = "openai-batch-output.jsonl"
URLS = f"{CHAT}, {COMPLETIONS}, {EMBEDDINGS}, /score or /rerank"
ROLES = ("system", "developer", "user", "assistant", "tool")
# Body keys taken as they are (the Batch API and vLLM's extras), and those accepted and ignored.
_OPTIONS = {"max_tokens": "max_tokens", "max_completion_tokens": "max_tokens", "temperature": "temperature",
            "top_p": "top_p", "top_k": "top_k", "seed": "seed", "stop": "stop", "n": "n",
            "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
            "ignore_eos": "ignore_eos"}
_GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}
_STRUCTURED_OUTPUTS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                       "json_object": "json_object"}
_IGNORED = {"model", "messages", "prompt", "logprobs", "top_logprobs", "response_format", "structured_outputs",
            "user", "metadata", "store", "stream", "service_tier", "parallel_tool_calls", "echo"}


def _known_url(url: str) -> str:
    """A url some run answers (which runs answer it is the run's task's to say)."""
    if url in (CHAT, COMPLETIONS, EMBEDDINGS) or url.endswith(("/score", "/rerank")):
        return url
    raise ValueError("not a supported endpoint")


class RequestLine(TypedDict):
    """A line of a Batch API input file; keys of other names are ignored, as the Batch API does."""

    # The reader names the row by it (a number too; any other value: the row's place in the file).
    custom_id: NotRequired[object]
    method: NotRequired[Literal["POST"]]
    url: Annotated[str, AfterValidator(_known_url)]  # chat, completions or a pooling endpoint
    body: InstanceOf[dict]  # a JSON object, checked by parse_request option by option


@cache
def _request_line_adapter() -> TypeAdapter[RequestLine]:
    return TypeAdapter(RequestLine)


# The error of a request line whose field is wrong: (code, message for the value found).
_LINE_ERRORS = {
    "method": ("invalid_method", lambda v: f"method {v!r} is not supported; use POST"),
    "url": ("invalid_url", lambda v: f"url {v!r} is not supported; use {URLS}"),
    "body": ("invalid_request", lambda v: "body: the request has no body object"),
}


@dataclass
class BatchRequest:
    """One request line, checked: what to render and the options to run it with."""

    endpoint: str
    model: str
    options: RowOptions
    messages: list[dict[str, Any]] | None = None  # chat
    prompt: str | None = None  # completions


def parse_request(line: str, base: RowOptions, served: list[str], adapters: dict[str, str],
                  pooling: RunPooling | None = None) -> BatchRequest | PoolingRequest:
    """A request line (a JSON object, as the reader checked) as a :class:`BatchRequest` (chat,
    completions) or a :class:`PoolingRequest`; raises :class:`OptionError` with the Batch API's error
    code when it cannot run, or when the run's task (``pooling``, None: generate) does not answer it."""
    request = request_line(line)
    run = pooling or RunPooling("generate")
    url, body = request["url"], request["body"]
    if url not in (CHAT, COMPLETIONS) and pooling_kind(url) is None:
        raise OptionError(_LINE_ERRORS["url"][1](url), "invalid_url")
    problem = endpoint_problem(url, run.task)
    if problem is not None:
        raise OptionError(problem, "invalid_url")
    model = body.get("model")
    if pooling_kind(url) is not None:  # a missing model is the run's, as vLLM takes it
        _model_options(served[0] if model is None else model, base, served, {})
        return parse_pooling(url, body, served[0] if model is None else model, run)
    options = _model_options(model, base, served, adapters)
    assert isinstance(model, str)  # checked by _model_options
    options = _body_options(body, options, chat=request["url"] == CHAT)
    if request["url"] == CHAT:
        return BatchRequest(CHAT, model, options, messages=check_messages(body.get("messages"), "body.messages"))
    return BatchRequest(COMPLETIONS, model, options, prompt=_completion_prompt(body.get("prompt")))


def request_line(line: str) -> RequestLine:
    """A request line's text as a :class:`RequestLine`; raises :class:`OptionError` with the Batch API's
    error code for the first field that is wrong (method, url, body, in that order). The text is
    parsed by ``json`` as the reader parsed it (pydantic's parser refuses lone surrogates, which
    ``json`` takes)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise OptionError(f"{exc.msg} at column {exc.colno}", "invalid_json") from None
    try:
        return _request_line_adapter().validate_python(obj)
    except ValidationError as exc:
        loc = exc.errors(include_url=False)[0]["loc"]
        if not loc:
            raise OptionError(f"a JSON {type(obj).__name__}, not a request object", "invalid_json") from None
        code, message = _LINE_ERRORS[str(loc[0])]
        raise OptionError(message(obj.get(loc[0])), code) from None


def _model_options(model: Any, base: RowOptions, served: list[str], adapters: dict[str, str]) -> RowOptions:
    if not isinstance(model, str) or not model:
        raise OptionError("body.model: missing; give the name of the model this run serves", "invalid_request")
    if model in adapters:
        return replace(base, lora=model)
    if model not in served:
        known = served + sorted(adapters)
        raise OptionError(f"body.model: {model!r} is not loaded in this run; it serves {', '.join(map(repr, known))}",
                          "model_not_found")
    return base


def _body_options(body: dict[str, Any], options: RowOptions, *, chat: bool) -> RowOptions:
    unknown = sorted(k for k in body if k not in _OPTIONS and k not in _GUIDED and k not in _IGNORED)
    if unknown:
        raise OptionError(f"body.{unknown[0]}: not a supported parameter; supported: "
                          f"{', '.join(sorted({*_OPTIONS, *_GUIDED, 'logprobs', 'top_logprobs', 'response_format', 'structured_outputs'}))}",
                          "unsupported_parameter")
    if body.get("stream"):
        raise OptionError("body.stream: batch requests are not streamed; remove it", "unsupported_parameter")
    for key, name in _OPTIONS.items():
        if body.get(key) is not None:
            options = options.set(name, body[key], f"body.{key}")
    options = _logprobs(body, options, chat=chat)
    for key, kind in _GUIDED.items():
        if body.get(key) is not None:
            options = replace(options, structured=structured_of(kind, body[key], f"body.{key}"))
    options = _structured_outputs(body.get("structured_outputs"), options)
    return _response_format(body.get("response_format"), options)


def _logprobs(body: dict[str, Any], options: RowOptions, *, chat: bool) -> RowOptions:
    """Chat: ``logprobs: true`` and ``top_logprobs: k``; completions: ``logprobs: k``."""
    if chat:
        if not body.get("logprobs"):
            if body.get("top_logprobs"):
                raise OptionError("body.top_logprobs: needs logprobs: true", "invalid_request")
            return options
        return options.set("logprobs", body.get("top_logprobs") or 0, "body.top_logprobs")
    if body.get("logprobs") is None:
        return options
    return options.set("logprobs", body["logprobs"], "body.logprobs")


def _structured_outputs(spec: Any, options: RowOptions) -> RowOptions:
    if spec is None:
        return options
    if not isinstance(spec, dict):
        raise OptionError("body.structured_outputs: expected an object such as {\"json\": {...}}", "invalid_request")
    chosen = {k: v for k, v in spec.items() if k in _STRUCTURED_OUTPUTS and v not in (None, False)}
    if len(chosen) != 1:
        raise OptionError(f"body.structured_outputs: set exactly one of {', '.join(_STRUCTURED_OUTPUTS)}",
                          "invalid_request")
    (key, value), = chosen.items()
    return replace(options, structured=structured_of(_STRUCTURED_OUTPUTS[key], value, f"body.structured_outputs.{key}"))


def _response_format(spec: Any, options: RowOptions) -> RowOptions:
    if spec is None:
        return options
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "text":
        return options
    if kind == "json_object":
        return replace(options, structured=structured_of("json_object", True, "body.response_format"))
    if kind == "json_schema":
        inner = spec.get("json_schema")
        schema = inner.get("schema") if isinstance(inner, dict) else None
        if schema is None:
            raise OptionError("body.response_format.json_schema.schema: missing", "invalid_schema")
        return replace(options, structured=structured_of("json_schema", schema,
                                                         "body.response_format.json_schema.schema"))
    raise OptionError(f"body.response_format.type: {kind!r} is not one of text, json_object, json_schema",
                      "invalid_request")


def check_messages(messages: Any, where: str) -> list[dict[str, Any]]:
    """A chat as a list of ``{role, content}`` with text content (parts of type text are joined)."""
    if not isinstance(messages, list) or not messages:
        raise OptionError(f"{where}: expected a non-empty list of {{role, content}} messages", "invalid_messages")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else None
            raise OptionError(f"{where}[{i}].role: {role!r} is not one of {', '.join(ROLES)}", "invalid_messages")
        content = message.get("content")
        if isinstance(content, list):
            content = _text_parts(content, f"{where}[{i}].content")
        if not isinstance(content, str):
            raise OptionError(f"{where}[{i}].content: expected text, got {type(content).__name__}", "invalid_messages")
        checked.append({**message, "content": content})
    return checked


def _text_parts(parts: list[Any], where: str) -> str:
    texts = []
    for part in parts:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise OptionError(f"{where}: only text parts are supported ({{\"type\": \"text\", \"text\": ...}})",
                              "invalid_messages")
        texts.append(part["text"])
    return "".join(texts)


def _completion_prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise OptionError("body.prompt: expected one non-empty string (a list of prompts is not supported in a "
                          "batch line: give each its own line)", "invalid_prompt")
    return prompt


# ---- the output file --------------------------------------------------------------------------


class OutputFile:
    """The Batch API output file, written as the reduce merges the results (in input order): it is
    fed the same tables as the Parquet results, under a temporary name until ``close``."""

    def __init__(self, out: Path, run_id: str):
        self.out, self.run_id = out, run_id
        self.tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        self.fh = self.tmp.open("w", encoding="utf-8")
        self.created = int(time.time())
        self.lines = 0

    def add(self, table: pa.Table) -> None:
        for batch in table.to_batches(max_chunksize=8192):
            for row in batch.to_pylist():
                line = output_line(row, f"{self.run_id}-{self.lines}", self.created)
                self.fh.write(json.dumps(line, ensure_ascii=False) + "\n")
                self.lines += 1

    def close(self) -> int:
        """Put the file in place; returns the lines written."""
        self.fh.close()
        self.tmp.replace(self.out)
        return self.lines


class BatchError(TypedDict):
    """Why a request failed: the Batch API's error code and a message."""

    code: str
    message: str


class BatchResponse(TypedDict):
    """The response to a request that ran."""

    status_code: int
    request_id: str
    body: InstanceOf[dict]  # a chat.completion or text_completion object


class OutputLine(TypedDict):
    """A line of the Batch API output file: a response, or the error of a request that failed (the
    other is null). It is written as it was validated, with ``json`` (pydantic's JSON has no spaces)."""

    id: str
    custom_id: str
    response: BatchResponse | None
    error: BatchError | None


@cache
def _output_line_adapter() -> TypeAdapter[OutputLine]:
    return TypeAdapter(OutputLine)


def output_line(row: dict[str, Any], key: str, created: int) -> OutputLine:
    """One result row as a Batch API output line, validated (``key`` makes its ids unique)."""
    line: OutputLine = {"id": f"batch_req_{key}", "custom_id": row["id"], "response": None, "error": None}
    if row["status"] == "failed":
        code, _, message = (row.get("error") or "failed: unknown").partition(": ")
        line["error"] = {"code": code, "message": message or code}
        return _output_line_adapter().validate_python(line)
    if pooling_kind(row.get("endpoint") or "") is not None:
        body = cast(dict, pooling_body(row, key, created))  # a typed dict, already validated
        line["response"] = {"status_code": 200, "request_id": f"req_{key}", "body": body}
        return _output_line_adapter().validate_python(line)
    chat = row.get("endpoint") != COMPLETIONS
    body = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{key}", "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": row.get("model"), "choices": _choices(row, chat),
            "usage": {"prompt_tokens": row["prompt_tokens"], "completion_tokens": row["output_tokens"],
                      "total_tokens": row["prompt_tokens"] + row["output_tokens"]}}
    line["response"] = {"status_code": 200, "request_id": f"req_{key}", "body": body}
    return _output_line_adapter().validate_python(line)


def _choices(row: dict[str, Any], chat: bool) -> list[dict[str, Any]]:
    texts = row.get("outputs") or [row["output"]]
    reasons = row.get("finish_reasons") or [row["finish_reason"]]
    logprobs = row.get("logprobs")
    choices = []
    for i, (text, reason) in enumerate(zip(texts, reasons)):
        tokens = logprobs[i] if logprobs else None
        choice: dict[str, Any] = {"index": i}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
            choice["logprobs"] = None if tokens is None else {"content": [_chat_logprob(t) for t in tokens]}
        else:
            choice["text"] = text
            choice["logprobs"] = None if tokens is None else _completion_logprobs(tokens)
        choice["finish_reason"] = reason
        choices.append(choice)
    return choices


def _chat_logprob(token: dict[str, Any]) -> dict[str, Any]:
    return {"token": token["token"], "logprob": token["logprob"], "bytes": list(token["token"].encode("utf-8")),
            "top_logprobs": [{"token": t["token"], "logprob": t["logprob"], "bytes": list(t["token"].encode("utf-8"))}
                             for t in token["top"] or []]}


def _completion_logprobs(tokens: list[dict[str, Any]]) -> dict[str, Any]:
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t["token"])
    return {"tokens": [t["token"] for t in tokens], "token_logprobs": [t["logprob"] for t in tokens],
            "top_logprobs": [{a["token"]: a["logprob"] for a in t["top"] or []} for t in tokens],
            "text_offset": offsets}
