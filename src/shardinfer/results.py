"""The results contract: one row per input row, with these columns, in this order.

| column | type | meaning |
|---|---|---|
| id | string | the row id (id column, else ``<file>:<row>``) |
| output | string | generated text; null when failed |
| status | string | ok, truncated (input cut to fit, head and tail kept) or failed |
| error | string | null unless failed: ``<reason>: <details>`` |
| prompt_tokens | int64 | tokens of the prompt sent to the engine; null when failed before it |
| output_tokens | int64 | generated tokens; null when failed |
| finish_reason | string | stop (EOS or a stop string) or length (max_tokens); null when failed |
| ...optional columns (:data:`OPTIONAL`), only in runs that ask for what they hold (:class:`ResultExtras`) |
| ...pass-through columns from the input |

Pooling tasks (``task: embed | classify | score | reward``) have ``id, status, error, prompt_tokens``
and then their own columns (:func:`pooled_columns`): ``embedding`` (a fixed-size list of float32 or
float16), ``label`` and ``probs`` (a struct of one float per label), or ``score`` (float64). Their
OpenAI batch runs leave those null and add ``endpoint``, ``model``, ``pooled`` (each input of the line:
its embedding, or ``[score]`` per pair, in input order) and ``openai_options`` (what else shapes the
output line: ``encoding_format``; a rerank line's ``top_n`` and documents).

Parts also carry ``_row`` (the global input row index) which the reducer uses to order and check.
This module is the one place that names the columns, the statuses and the reserved names; counts of
rows by status and token sums (a unit's done record, a run's totals) are :class:`RowCounts`.
"""

from __future__ import annotations

import base64
import enum
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shardinfer.engines.base import floats
from shardinfer.errors import Refused
from shardinfer.requests.openai_pooling import pooled_values

ROW = "_row"  # the global input row index, in parts (the reducer orders and checks by it)
# The row shape the corpus readers give the worker (see shardinfer.inputs.rows).
TEXT, ID, PROBLEM, CHARS, OFFSET, LINE = "_text", "_id", "_problem", "_chars", "_offset", "_line"


class Status(str, enum.Enum):
    OK = "ok"
    TRUNCATED = "truncated"  # input cut to fit: head and tail kept
    FAILED = "failed"


STATUSES = tuple(s.value for s in Status)

COLUMNS: dict[str, pa.DataType] = {
    "id": pa.string(), "output": pa.string(), "status": pa.string(), "error": pa.string(),
    "prompt_tokens": pa.int64(), "output_tokens": pa.int64(), "finish_reason": pa.string(),
}
CONTRACT = list(COLUMNS)
_TOP = pa.list_(pa.struct([("token", pa.string()), ("logprob", pa.float64())]))
# Columns a run gets only when it asks for what they hold (see ResultExtras), after the contract's.
OPTIONAL: dict[str, pa.DataType] = {
    "outputs": pa.list_(pa.string()),  # n > 1: every output (output is the first)
    "finish_reasons": pa.list_(pa.string()),
    # logprobs[i][j]: output i's token j, its logprob and the top alternatives
    "logprobs": pa.list_(pa.list_(pa.struct([("token", pa.string()), ("logprob", pa.float64()), ("top", _TOP)]))),
    "structured_ok": pa.bool_(),  # null: no checked structured output asked for
    "structured_error": pa.string(),  # why an output does not match its schema, regex or choices
    "endpoint": pa.string(),  # OpenAI batch files: the request's url
    "model": pa.string(),  # OpenAI batch files: the request's model
    "adapter": pa.string(),  # runs with model.lora: the adapter a row ran with (null: the base model)
    "pooled": pa.list_(pa.list_(pa.float32())),  # OpenAI batch pooling lines: each input's values
    # OpenAI batch pooling lines: what shapes the output line besides the values
    "openai_options": pa.struct([("encoding_format", pa.string()), ("top_n", pa.int64()),
                                 ("documents", pa.list_(pa.string()))]),
}
POOLED_CONTRACT = ["id", "status", "error", "prompt_tokens"]  # the contract of pooling tasks, before their columns
# Names an input column may not take in the results (pass-through columns).
RESERVED = frozenset({*COLUMNS, *OPTIONAL, ROW, TEXT, ID, PROBLEM, CHARS, OFFSET, LINE})
POOLED_NAMES = frozenset({"embedding", "label", "probs", "score"})  # reserved too in a pooling task's results


def pooled_columns(shape: Any) -> dict[str, pa.DataType]:
    """A pooling task's result columns, from its :class:`~shardinfer.models.tasks.PooledShape`."""
    if shape.task == "embed":
        value = pa.float16() if shape.dtype == "float16" else pa.float32()
        return {"embedding": pa.list_(value, shape.dim) if shape.dim else pa.list_(value)}
    if shape.task == "classify":
        return {"label": pa.string(), "probs": pa.struct([(name, pa.float32()) for name in shape.labels])}
    return {"score": pa.float64()}


@dataclass(frozen=True)
class ResultExtras:
    """Which optional columns a run's results have (the same for every part of the run), and the
    options of rows that have none of their own."""

    samples: bool = False
    logprobs: bool = False
    structured: bool = False
    openai: bool = False
    adapters: bool = False
    base: Any = None  # RowOptions of rows without their own
    pooled: Any = None  # PooledShape of a pooling task (None: generate)

    def contract(self) -> list[str]:
        """The contract's columns after ``id`` (a pooling task's own included)."""
        if self.pooled is None:
            return CONTRACT[1:]
        return POOLED_CONTRACT[1:] + list(pooled_columns(self.pooled))

    def types(self) -> dict[str, pa.DataType]:
        return {**_TYPES, **(pooled_columns(self.pooled) if self.pooled is not None else {})}

    def columns(self) -> list[str]:
        groups = {"samples": ["outputs", "finish_reasons"], "logprobs": ["logprobs"],
                  "structured": ["structured_ok", "structured_error"], "openai": ["endpoint", "model"],
                  "adapters": ["adapter"]}
        columns = [c for flag, cols in groups.items() if getattr(self, flag) for c in cols]
        return columns + (["pooled", "openai_options"] if self.openai and self.pooled is not None else [])
_TYPES = {ROW: pa.int64(), **COLUMNS, **OPTIONAL}


@dataclass
class RowCounts:
    """Rows by status and token sums: of a unit (kept in its done record) or of a whole run."""

    rows: int = 0
    ok: int = 0
    truncated: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0

    @classmethod
    def of(cls, table: pa.Table) -> RowCounts:
        """Counts of a results table (no ``output_tokens`` column: a pooling task's, 0)."""
        by_status = {str(v["values"]): int(v["counts"]) for v in pc.value_counts(table.column("status")).to_pylist()}
        return cls(rows=table.num_rows, **{s: by_status.get(s, 0) for s in STATUSES},
                   prompt_tokens=_sum(table, "prompt_tokens"), output_tokens=_sum(table, "output_tokens"))

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> RowCounts:
        return cls(**{f.name: int(record.get(f.name) or 0) for f in fields(cls)})

    def to_record(self) -> dict[str, int]:
        return asdict(self)

    def __add__(self, other: RowCounts) -> RowCounts:
        return RowCounts(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    @property
    def accounted(self) -> int:
        """Rows that have a status: equals ``rows`` in a consistent result set."""
        return self.ok + self.truncated + self.failed

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens

    def by_status(self) -> dict[str, int]:
        return {s: getattr(self, s) for s in STATUSES}



def summary_line(rows: dict[str, int]) -> str:
    """``rows: N in, A ok, B truncated, C failed`` from a report's ``rows``: every command ends with it."""
    return f"rows: {rows['in']} in, " + ", ".join(f"{rows.get(s, 0)} {s}" for s in STATUSES)


@dataclass
class Totals(RowCounts):
    """A run's counts plus its failed rows by reason (the part of ``error`` before the colon)."""

    reasons: Counter[str] = field(default_factory=Counter)

    def add(self, table: pa.Table) -> None:
        counts = RowCounts.of(table)
        for f in fields(RowCounts):
            setattr(self, f.name, getattr(self, f.name) + getattr(counts, f.name))
        errors = table.column("error").drop_null()
        if len(errors):
            reasons = pc.utf8_slice_codeunits(errors, 0, 64)
            self.reasons.update(e.split(":", 1)[0] for e in reasons.to_pylist())


def _sum(table: pa.Table, column: str) -> int:
    if column not in table.column_names:
        return 0
    return int(pc.sum(table.column(column)).as_py() or 0)


def failed_rows(table: pa.Table) -> pa.Array:
    """The ``_row`` indices of a part's failed rows."""
    mask = pc.equal(table.column("status"), Status.FAILED.value)
    return table.filter(mask).column(ROW).combine_chunks()


def result_table(rows: pa.Table, problems: list[str | None], prompts: list[Any], completions: list[Any],
                 passthrough: list[str], extras: ResultExtras | None = None) -> pa.Table:
    """A unit's results: every input row (a row of ``rows``, the corpus's row shape) gets exactly
    one result row; ids and pass-through columns go across as they are, in Arrow."""
    extras = extras or ResultExtras()
    n = rows.num_rows
    out: dict[str, Any] = {ROW: rows.column(ROW), "id": rows.column(ID)}
    types = extras.types()
    record: Callable[..., dict[str, Any]] = _record
    names = extras.columns()
    if extras.pooled is None:  # generation: the contract column by column, a record only for extras
        for name, values in _contract_columns(problems, prompts, completions).items():
            out[name] = pa.array(values, type=types[name])
    elif not extras.openai:  # a pooling task: its columns column by column too
        out.update(pooled_table_columns(problems, prompts, completions, extras.pooled, types))
        record = _pooled_record
    else:
        names, record = extras.contract() + names, _pooled_record
    if names:
        records = [record(problems[i], prompts[i], completions[i], extras) for i in range(n)]
        for name in names:
            out[name] = pa.array([r.get(name) for r in records], type=types[name])
    for name in passthrough:
        out[name] = rows.column(name)
    return pa.table(out)


def _contract_columns(problems: list[str | None], prompts: list[Any], completions: list[Any]) -> dict[str, list[Any]]:
    """The contract's columns after ``id``, filled column by column (no record per row: a unit has
    thousands of rows); the same values as :func:`_record` gives."""
    columns: dict[str, list[Any]] = {name: [] for name in CONTRACT[1:]}
    output, status, error = columns["output"], columns["status"], columns["error"]
    prompt_tokens, output_tokens, finish = columns["prompt_tokens"], columns["output_tokens"], columns["finish_reason"]
    ok, truncated, failed = Status.OK.value, Status.TRUNCATED.value, Status.FAILED.value
    for problem, prompt, completion in zip(problems, prompts, completions):
        if problem is None and prompt.problem is None and not isinstance(completion, Exception):
            output.append(completion.text)
            status.append(truncated if prompt.truncated else ok)
            error.append(None)
            prompt_tokens.append(len(prompt.token_ids))
            output_tokens.append(completion.output_tokens)
            finish.append(completion.finish_reason)
            continue
        status.append(failed)
        error.append(problem if problem is not None else prompt.problem if prompt.problem is not None
                     else _engine_error(completion))
        prompt_tokens.append(len(prompt.token_ids) if problem is None and prompt.problem is None else None)
        for column in (output, output_tokens, finish):
            column.append(None)
    return columns


def pooled_table_columns(problems: list[str | None], prompts: list[Any], pooled: list[Any], shape: Any,
                         types: dict[str, pa.DataType]) -> dict[str, pa.Array]:
    """A pooling task's contract columns and its own, column by column (an embedding column from one
    array of the rows' values, not a Python float per value); the same values as
    :func:`_pooled_record` gives."""
    columns, ok = _pooled_statuses(problems, prompts, pooled, shape)
    values = [pooled[i].values for i in ok]
    if shape.task == "embed":
        columns["embedding"] = _embedding_column(values, ok, len(pooled), types["embedding"])
        return columns
    labels: list[Any] = [None] * len(pooled)
    probs: list[Any] = [None] * len(pooled)
    for i, row in zip(ok, values):
        if shape.task == "classify":
            labels[i], probs[i] = _label_and_probs(shape, floats(row))
        else:
            probs[i] = float(row[0])
    if shape.task == "classify":
        return {**columns, "label": pa.array(labels, types["label"]), "probs": pa.array(probs, types["probs"])}
    return {**columns, "score": pa.array(probs, types["score"])}


def _pooled_statuses(problems: list[str | None], prompts: list[Any], pooled: list[Any],
                     shape: Any) -> tuple[dict[str, pa.Array], list[int]]:
    """The status, error and prompt_tokens columns of a pooling unit, and the rows that have values."""
    status, error, tokens, ok = [], [], [], []
    for i, (problem, prompt, value) in enumerate(zip(problems, prompts, pooled)):
        why = problem if problem is not None else prompt.problem
        if why is None:
            why = _engine_error(value) if isinstance(value, Exception) else _values_problem(shape, value.values)
        if why is None:
            ok.append(i)
        status.append(Status.FAILED.value if why is not None else Status.TRUNCATED.value if prompt.truncated
                      else Status.OK.value)
        error.append(why)
        tokens.append(prompt.prompt_tokens if problem is None and prompt.problem is None else None)
    return {"status": pa.array(status, pa.string()), "error": pa.array(error, pa.string()),
            "prompt_tokens": pa.array(tokens, pa.int64())}, ok


def _values_problem(shape: Any, values: Any) -> str | None:
    """An engine answer that does not fit the task's column, as a row error."""
    expected = shape.dim if shape.task == "embed" else len(shape.labels) if shape.task == "classify" else 1
    if expected and len(values) != expected:
        return f"engine_error: the engine gave {len(values)} values for this row where the {shape.task} " \
               f"column holds {expected}"
    return None


def _embedding_column(values: list[Any], ok: list[int], n: int, kind: pa.DataType) -> pa.Array:
    """The embedding column: a fixed-size list built from one (rows, dim) array, null where failed."""
    if not isinstance(kind, pa.FixedSizeListType):  # dimensions not known: a list per row
        full: list[Any] = [None] * n
        for i, row in zip(ok, values):
            full[i] = floats(row)
        return pa.array(full, kind)
    dim, dtype = kind.list_size, kind.value_type.to_pandas_dtype()
    matrix = np.zeros((n, dim), dtype=dtype)
    if ok:
        matrix[ok] = np.asarray(values, dtype=dtype)
    failed = np.ones(n, dtype=bool)
    failed[ok] = False
    flat = pa.array(matrix.reshape(-1), type=kind.value_type)
    return pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(failed) if failed.any() else None)


def _label_and_probs(shape: Any, values: list[float]) -> tuple[str, dict[str, float]]:
    labels = shape.labels or tuple(f"LABEL_{i}" for i in range(len(values)))
    best = max(range(len(values)), key=values.__getitem__)
    return labels[best], dict(zip(labels, values))


def _engine_error(error: Exception) -> str:
    return (f"invalid_request: {error}" if isinstance(error, Refused)
            else f"engine_error: {type(error).__name__}: {error}")


def _record(problem: str | None, prompt: Any, completion: Any, extras: ResultExtras) -> dict[str, Any]:
    if problem is not None:
        return _failed(problem)
    request = {"endpoint": prompt.endpoint, "model": prompt.model}
    options = prompt.options or extras.base
    if options is not None and options.lora:
        request["adapter"] = options.lora
    if prompt.problem is not None:
        return {**_failed(prompt.problem), **request}
    if isinstance(completion, Exception):
        return {**_failed(_engine_error(completion)),
                "prompt_tokens": len(prompt.token_ids), **request}
    record = {
        "output": completion.text, "status": (Status.TRUNCATED if prompt.truncated else Status.OK).value,
        "prompt_tokens": len(prompt.token_ids), "output_tokens": completion.output_tokens,
        "finish_reason": completion.finish_reason, **request,
        "outputs": [s.text for s in completion.samples], "finish_reasons": [s.finish_reason for s in completion.samples],
    }
    if any(s.logprobs is not None for s in completion.samples):
        record["logprobs"] = [[{"token": t.token, "logprob": t.logprob,
                                "top": [{"token": a, "logprob": lp} for a, lp in t.top]} for t in s.logprobs or []]
                              for s in completion.samples]
    structured = options.structured if options is not None else None
    if structured is not None and structured.checked:
        why = next((w for s in completion.samples if (w := structured.check(s.text)) is not None), None)
        record["structured_ok"], record["structured_error"] = why is None, why
    return record


def _pooled_record(problem: str | None, prompt: Any, pooled: Any, extras: ResultExtras) -> dict[str, Any]:
    """A pooling task's result: the embedding, the label and its probabilities, or the score."""
    request = {"endpoint": prompt.endpoint, "model": prompt.model} if prompt is not None else {}
    if problem is not None:
        return _failed(problem)
    if prompt.problem is not None:
        return {**_failed(prompt.problem), **request}
    if isinstance(pooled, Exception):
        error = (f"invalid_request: {pooled}" if isinstance(pooled, Refused)
                 else f"engine_error: {type(pooled).__name__}: {pooled}")
        return {**_failed(error), "prompt_tokens": prompt.prompt_tokens, **request}
    record = {"status": (Status.TRUNCATED if prompt.truncated else Status.OK).value,
              "prompt_tokens": prompt.prompt_tokens, **request}
    if prompt.parts is not None:  # an OpenAI pooling line: every input's values
        return {**record, "pooled": pooled_values(prompt, pooled.items), "openai_options": prompt.line_options}
    shape, values = extras.pooled, floats(pooled.values)
    if (why := _values_problem(shape, values)) is not None:
        return {**_failed(why), "prompt_tokens": prompt.prompt_tokens, **request}
    if shape.task == "embed":
        record["embedding"] = values
    elif shape.task == "classify":
        record["label"], record["probs"] = _label_and_probs(shape, values)
    else:
        record["score"] = values[0]
    return record


def _failed(error: str) -> dict[str, Any]:
    return {"status": Status.FAILED.value, "error": error}


def schema_record(table: pa.Table) -> str:
    """A part's schema as text, kept in its done record so the reducer reads each part once."""
    return base64.b64encode(table.schema.serialize().to_pybytes()).decode("ascii")


def schema_from_record(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def empty_result_schema(passthrough: list[str], extras: ResultExtras | None = None) -> pa.Schema:
    """The schema of the results of a run without rows: the contract's columns (and the task's)."""
    extras = extras or ResultExtras()
    types = extras.types()
    contract = [("id", pa.string())] + [(name, types[name]) for name in extras.contract()]
    return pa.schema(contract + [(name, pa.null()) for name in passthrough])
