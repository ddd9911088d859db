"""OpenAI batch lines of the pooling endpoints: ``/v1/embeddings``, ``/score`` and ``/rerank``.

Which lines a run answers follows vLLM's ``run_batch`` for the same model: a run of ``task: embed``
answers ``/v1/embeddings`` lines, and ``/score`` and ``/rerank`` lines by the cosine similarity of the
two texts' embeddings (vLLM's bi-encoder scoring); a run of ``task: score`` (a cross-encoder) answers
``/score`` and ``/rerank`` lines with the model's score of each (query, document) pair, the pair
tokenized as ``tokenizer(text=query, text_pair=document)``. A line another task would answer fails
alone (:func:`endpoint_problem`).

A line may carry several inputs: a list ``input``, a score line's lists (1:1, 1:N or N:N), a rerank
line's documents. Its row's :class:`~shardinfer.requests.prompts.Prompt` gets one part per engine
request (:meth:`PoolingPrompts.prompt`); the row's results keep each input's values in ``pooled``
(an embedding per input, ``[score]`` per pair) and what else shapes the output line in
``openai_options`` (``encoding_format``; a rerank line's ``top_n`` and documents). The output line's
body is built from them here (:func:`pooling_body`), field for field as vLLM's ``run_batch`` writes
it: ``embd-``/``score-`` ids, ``usage`` with every prompt token of the line, rerank results sorted by
relevance and cut to ``top_n``, ``base64`` as the float32 little-endian bytes.
"""

from __future__ import annotations

import base64
import math
import struct
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from pydantic import TypeAdapter
from typing_extensions import TypedDict

from shardinfer.requests.prompts import Prompt
from shardinfer.requests.row_options import OptionError

EMBEDDINGS = "/v1/embeddings"
KINDS = ("embeddings", "score", "rerank")
# The pooling lines each task answers (vLLM's run_batch answers the same for the same model).
SERVED = {"embed": ("embeddings", "score", "rerank"), "score": ("score", "rerank")}
# A score line's two lists, by the names vLLM takes (the first pair present is used).
_SCORE_KEYS = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2"))
_COMMON = {"model", "user", "request_id", "cache_salt", "priority", "truncate_prompt_tokens", "use_activation",
           "padding", "truncation_side", "mm_processor_kwargs"}
_KEYS = {"embeddings": _COMMON | {"input", "encoding_format", "dimensions", "embed_dtype", "endianness",
                                  "add_special_tokens"},
         "score": _COMMON | {k for pair in _SCORE_KEYS for k in pair} | {"max_tokens_per_query", "max_tokens_per_doc",
                                                                         "instruction", "chat_template_kwargs"},
         "rerank": _COMMON | {"query", "documents", "top_n", "max_tokens_per_query", "max_tokens_per_doc",
                              "instruction", "chat_template_kwargs"}}
# Keys accepted only at these values (what changes nothing); another value fails the line.
_ONLY = {"priority": (0,), "truncate_prompt_tokens": (None,), "padding": (None, "do_not_pad"),
         "truncation_side": (None, "left", "right"), "mm_processor_kwargs": (None,), "embed_dtype": ("float32",),
         "endianness": ("native", "little"), "max_tokens_per_query": (0,), "max_tokens_per_doc": (0,),
         "instruction": (None,), "chat_template_kwargs": (None,)}


def pooling_kind(url: str) -> str | None:
    """embeddings, score or rerank for a pooling url (as vLLM's run_batch matches them), else None."""
    if url == EMBEDDINGS:
        return "embeddings"
    if url.endswith("/score"):
        return "score"
    if url.endswith("/rerank"):
        return "rerank"
    return None


def endpoint_problem(url: str, task: str) -> str | None:
    """Why a run of ``task`` does not answer a line of ``url`` (vLLM's message, then the fix), or None."""
    kind = pooling_kind(url)
    if kind is None:
        if task == "generate":
            return None
        return (f"Model does not support endpoint: {url}; this run has task {task}, which does not generate "
                f"text: run chat and completion lines with task: generate and a causal LM")
    if kind in SERVED.get(task, ()):
        return None
    runs = "task: embed (an embedding model)" + ("" if kind == "embeddings" else " or task: score (a cross-encoder)")
    return f"Model does not support endpoint: {url}; this run has task {task}: run the {url} lines with {runs}"


@dataclass
class PoolingRequest:
    """A pooling line, checked: its inputs and what shapes its output line."""

    endpoint: str  # the line's url
    kind: str  # embeddings | score | rerank
    model: str
    inputs: list[str | list[int]] = field(default_factory=list)  # embeddings: texts or token ids
    queries: list[str] = field(default_factory=list)  # score, rerank (one query)
    documents: list[str] = field(default_factory=list)
    top_n: int = 0  # rerank: 0 keeps every result
    encoding_format: str = "float"  # embeddings: float | base64
    add_special_tokens: bool = True  # embeddings of texts

    def options(self) -> dict[str, Any]:
        """The row's ``openai_options``: what its output line needs besides the values."""
        if self.kind == "rerank":
            return {"encoding_format": None, "top_n": self.top_n, "documents": self.documents}
        return {"encoding_format": self.encoding_format if self.kind == "embeddings" else None,
                "top_n": None, "documents": None}


@dataclass(frozen=True)
class RunPooling:
    """What a run's lines are checked against: its task, embedding size and activation."""

    task: str
    dimensions: int | None = None  # the run's pooling.dimensions
    activation: bool = True  # the run's normalize (embed) or activation (score)


def parse_pooling(url: str, body: dict[str, Any], model: str, run: RunPooling) -> PoolingRequest:
    """A pooling line's body as a :class:`PoolingRequest`; raises :class:`OptionError` naming the field
    and the fix when the line cannot run."""
    kind = pooling_kind(url)
    assert kind is not None  # routed here by its url
    _check_keys(kind, body, run)
    request = PoolingRequest(url, kind, model)
    if kind == "embeddings":
        return _embeddings(body, request, run)
    if kind == "score":
        first, second = _score_lists(body)
        request.queries, request.documents = first, second
        return request
    request.queries = [_text(body.get("query"), "body.query")]
    request.documents = _texts(body.get("documents"), "body.documents")
    request.top_n = _top_n(body.get("top_n", 0))
    return request


def _check_keys(kind: str, body: dict[str, Any], run: RunPooling) -> None:
    unknown = sorted(k for k in body if k not in _KEYS[kind])
    if unknown:
        raise OptionError(f"body.{unknown[0]}: not a parameter of {kind} requests; supported: "
                          f"{', '.join(sorted(_KEYS[kind]))}", "unsupported_parameter")
    for key, allowed in _ONLY.items():
        if key in body and body[key] not in allowed:
            raise OptionError(f"body.{key}: {body[key]!r} is not supported in a batch line (only "
                              f"{' or '.join(map(repr, allowed))}); remove it", "unsupported_parameter")
    activation = body.get("use_activation")
    if activation is not None and activation != run.activation:
        key = "pooling.normalize" if run.task == "embed" else "pooling.activation"
        raise OptionError(f"body.use_activation: {activation!r} differs from this run's ({run.activation}, "
                          f"{key}); remove it or run these lines with {key}: {activation}", "unsupported_parameter")


def _embeddings(body: dict[str, Any], request: PoolingRequest, run: RunPooling) -> PoolingRequest:
    if "messages" in body:
        raise OptionError("body.messages: chat embeddings are not supported in a batch line; give the text "
                          "as body.input", "unsupported_parameter")
    request.inputs = _embedding_inputs(body.get("input"))
    request.encoding_format = body.get("encoding_format", "float")
    if request.encoding_format not in ("float", "base64"):
        raise OptionError(f"body.encoding_format: {request.encoding_format!r} is not float or base64",
                          "invalid_request")
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions != run.dimensions:
        size = f"{run.dimensions} dimensions" if run.dimensions else "the model's full size"
        raise OptionError(f"body.dimensions: {dimensions!r} differs from this run's embeddings ({size}, "
                          f"pooling.dimensions); a batch line cannot change it: remove it, or run these lines "
                          f"with pooling.dimensions: {dimensions}", "unsupported_parameter")
    special = body.get("add_special_tokens", True)
    if not isinstance(special, bool):
        raise OptionError(f"body.add_special_tokens: expected true or false, got {special!r}", "invalid_request")
    request.add_special_tokens = special
    return request


def _embedding_inputs(value: Any) -> list[str | list[int]]:
    """``input``: a text, a list of texts, a list of token ids or a list of such lists."""
    where = "body.input"
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise OptionError(f"{where}: expected a text, a list of texts or token ids, got "
                          f"{'an empty list' if value == [] else type(value).__name__}", "invalid_request")
    if all(_is_token(v) for v in value):
        return [list(value)]
    inputs: list[str | list[int]] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            inputs.append(item)
        elif isinstance(item, list) and item and all(_is_token(v) for v in item):
            inputs.append(list(item))
        else:
            raise OptionError(f"{where}[{i}]: expected a text or a non-empty list of token ids (integers), got "
                              f"{type(item).__name__}", "invalid_request")
    return inputs


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _score_lists(body: dict[str, Any]) -> tuple[list[str], list[str]]:
    """A score line's two lists, 1:1, 1:N or N:N (vLLM's rule)."""
    for first, second in _SCORE_KEYS:
        if first in body and second in body:
            queries, documents = _texts(body[first], f"body.{first}"), _texts(body[second], f"body.{second}")
            if len(queries) > 1 and len(queries) != len(documents):
                raise OptionError(f"body.{first}, body.{second}: {len(queries)} and {len(documents)} texts; input "
                                  f"lengths must be either 1:1, 1:N or N:N", "invalid_request")
            return queries, documents
    names = " or ".join(f"{a} and {b}" for a, b in _SCORE_KEYS)
    raise OptionError(f"body: a score request gives two lists of texts: {names}", "invalid_request")


def _texts(value: Any, where: str) -> list[str]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise OptionError(f"{where}: at least one text must be given", "invalid_request")
    return [_text(v, f"{where}[{i}]" if isinstance(value, list) else where) for i, v in enumerate(values)]


def _text(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "content" in value:
        raise OptionError(f"{where}: multimodal content is not supported; give text", "unsupported_parameter")
    raise OptionError(f"{where}: expected text, got {type(value).__name__}", "invalid_request")


def _top_n(value: Any) -> int:
    if not _is_token(value) or value < 0:
        raise OptionError(f"body.top_n: expected an integer >= 0 (0: every document), got {value!r}",
                          "invalid_request")
    return int(value)


# ---- requests to the engine -------------------------------------------------------------------


class PoolingPrompts:
    """The engine requests of pooling lines: one part per input (per pair for a cross-encoder)."""

    def __init__(self, tokenizer: Any, *, task: str, max_model_len: int):
        self.tokenizer = tokenizer
        self.task = task
        self.max_model_len = max_model_len

    def prompt(self, request: PoolingRequest) -> Prompt:
        """The row's prompt (its parts), or why the line cannot run."""
        queries: int | None = None
        if request.kind == "embeddings":
            parts = [self._embedding(x, request.add_special_tokens, f"body.input[{i}]")
                     for i, x in enumerate(request.inputs)]
        elif self.task == "embed":  # bi-encoder: each text embedded once, pairs scored by cosine
            queries = len(request.queries)
            parts = [self._embedding(t, True, f"{what} {i}") for what, texts in
                     (("query", request.queries), ("document", request.documents)) for i, t in enumerate(texts)]
        else:
            firsts = request.queries * len(request.documents) if len(request.queries) == 1 else request.queries
            parts = [self._pair(q, d, i) for i, (q, d) in enumerate(zip(firsts, request.documents))]
        problem = next((p.problem for p in parts if p.problem is not None), None)
        if problem is not None:
            return Prompt(None, problem=problem, endpoint=request.endpoint, model=request.model)
        return Prompt(None, endpoint=request.endpoint, model=request.model, parts=parts, cosine_queries=queries,
                      line_options=request.options())

    def _embedding(self, value: str | list[int], special: bool, where: str) -> Prompt:
        ids = value if isinstance(value, list) else self.tokenizer(value, add_special_tokens=special)["input_ids"]
        return self._fits(Prompt(list(ids)), where)

    def _pair(self, query: str, document: str, index: int) -> Prompt:
        encoded = self.tokenizer(text=query, text_pair=document)
        types = encoded.get("token_type_ids")
        return self._fits(Prompt(encoded["input_ids"], token_type_ids=types), f"pair {index}")

    def _fits(self, prompt: Prompt, where: str) -> Prompt:
        n = len(prompt.token_ids or ())
        if n == 0:
            return Prompt(None, problem=f"invalid_request: {where}: the prompt is empty (0 tokens); give some text")
        if n > self.max_model_len:
            return Prompt(None, problem=f"context_length_exceeded: {where} has {n} tokens, the limit is max_model_len "
                                        f"{self.max_model_len}; shorten it or raise model.max_model_len")
        return prompt


def pooled_values(prompt: Prompt, items: list[list[float]]) -> list[list[float]]:
    """A row's ``pooled`` values from its parts' values: as they are, or (bi-encoder scoring) the
    cosine similarity of each (query, document) pair's embeddings as ``[score]``."""
    if prompt.cosine_queries is None:
        return items
    queries, documents = items[:prompt.cosine_queries], items[prompt.cosine_queries:]
    if len(queries) == 1:
        queries = queries * len(documents)
    return [[_cosine(q, d)] for q, d in zip(queries, documents)]


def _cosine(a: list[float], b: list[float]) -> float:
    norms = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return sum(x * y for x, y in zip(a, b)) / max(norms, 1e-8)


# ---- the output line's body -------------------------------------------------------------------


class Usage(TypedDict):
    """vLLM's UsageInfo of a pooling response: every prompt token of the line, no completion."""

    prompt_tokens: int
    total_tokens: int
    completion_tokens: int
    prompt_tokens_details: None
    completion_tokens_details: None


class EmbeddingData(TypedDict):
    index: int
    object: str  # "embedding"
    embedding: list[float] | str  # base64: the float32 little-endian bytes


class EmbeddingBody(TypedDict):
    id: str
    object: str  # "list"
    created: int
    model: str
    data: list[EmbeddingData]
    usage: Usage


class ScoreData(TypedDict):
    index: int
    object: str  # "score"
    score: float


class ScoreBody(TypedDict):
    id: str
    object: str  # "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: Usage


class RerankDocument(TypedDict):
    text: str
    multi_modal: None


class RerankResult(TypedDict):
    index: int
    document: RerankDocument
    relevance_score: float


class RerankUsage(TypedDict):
    prompt_tokens: int
    total_tokens: int


class RerankBody(TypedDict):
    """A rerank response has no ``object`` nor ``created`` (as vLLM's)."""

    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]


_BODIES: dict[str, Any] = {"embeddings": EmbeddingBody, "score": ScoreBody, "rerank": RerankBody}


@cache
def _body_adapter(kind: str) -> TypeAdapter[Any]:
    return TypeAdapter(_BODIES[kind])


def pooling_body(row: dict[str, Any], key: str, created: int) -> EmbeddingBody | ScoreBody | RerankBody:
    """The response body of a pooling line that ran (its results row), validated."""
    kind = pooling_kind(row["endpoint"]) or ""
    values, options, tokens = row["pooled"], row.get("openai_options") or {}, row["prompt_tokens"]
    body: EmbeddingBody | ScoreBody | RerankBody
    if kind == "embeddings":
        base64_ = options.get("encoding_format") == "base64"
        body = {"id": f"embd-{key}", "object": "list", "created": created, "model": row["model"],
                "data": [{"index": i, "object": "embedding", "embedding": _base64(v) if base64_ else v}
                         for i, v in enumerate(values)], "usage": _usage(tokens)}
    elif kind == "score":
        body = {"id": f"score-{key}", "object": "list", "created": created, "model": row["model"],
                "data": [{"index": i, "object": "score", "score": v[0]} for i, v in enumerate(values)],
                "usage": _usage(tokens)}
    else:
        body = {"id": f"score-{key}", "model": row["model"], "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "results": _rerank_results(values, options.get("documents") or [], options.get("top_n") or 0)}
    return _body_adapter(kind).validate_python(body)


def _usage(tokens: int) -> Usage:
    return {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0, "prompt_tokens_details": None,
            "completion_tokens_details": None}


def _base64(values: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")


def _rerank_results(values: list[list[float]], documents: list[str], top_n: int) -> list[RerankResult]:
    """Every document's score, most relevant first; the first ``top_n`` when it is below their number."""
    results: list[RerankResult] = [{"index": i, "document": {"text": text, "multi_modal": None},
                                    "relevance_score": v[0]} for i, (text, v) in enumerate(zip(documents, values))]
    results.sort(key=lambda r: r["relevance_score"], reverse=True)
    return results[:top_n] if 0 < top_n < len(documents) else results
