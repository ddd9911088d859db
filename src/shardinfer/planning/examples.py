"""Example requests for ``shardinfer plan``: the first rows rendered exactly as the workers will.

One example per kind of request (a text prompt, a chat, an OpenAI chat, completions, embeddings,
score or rerank request), with the prompt the engine will get (each input of a pooling line), its
token count and the options that differ from ``sampling``; and the reasons of the first rows whose
request cannot be made.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from typing import Any

from shardinfer.config import Config
from shardinfer.engines.registry import get_engine
from shardinfer.inputs.unit_reader import UnitReader
from shardinfer.models.info import load_tokenizer
from shardinfer.planning.plan import Plan
from shardinfer.requests.builder import RequestBuilder, input_mode
from shardinfer.requests.prompts import Prompt, request_columns
from shardinfer.results import ID, PROBLEM, TEXT

EXAMPLE_ROWS = 256  # rows of the first units looked at
_SHOWN_CHARS = 1200


def example_requests(cfg: Config, plan: Plan) -> str:
    """The rendered example requests, as text."""
    tokenizer = load_tokenizer(cfg.model, required=False)
    if tokenizer is None or not plan.units:
        return "example requests: none (no tokenizer or no rows)"
    builder = RequestBuilder(cfg, tokenizer, max_model_len=plan.max_model_len,
                             capabilities=get_engine(cfg.model.engine).capabilities)
    rows = _first_rows(cfg, plan)
    valid = [i for i, p in enumerate(rows.column(PROBLEM).to_pylist()) if p is None]
    names = [c for _, c in request_columns(cfg) if c in rows.column_names]
    columns = rows.select(list(dict.fromkeys(names))).take(valid).to_pylist() if names else [{} for _ in valid]
    prompts = builder.build(rows.column(TEXT).take(valid).to_pylist(), columns)
    ids = rows.column(ID).take(valid).to_pylist()
    return _describe(cfg, builder, ids, prompts, tokenizer)


def _first_rows(cfg: Config, plan: Plan) -> Any:
    import pyarrow as pa

    reader = UnitReader(plan, cfg)
    tables, seen = [], 0
    for unit in plan.units:
        tables.append(reader.read(unit))
        seen += unit.rows
        if seen >= EXAMPLE_ROWS:
            break
    return pa.concat_tables(tables, promote_options="permissive").slice(0, EXAMPLE_ROWS)


def _describe(cfg: Config, builder: RequestBuilder, ids: list[str], prompts: list[Prompt], tokenizer: Any) -> str:
    lines: list[str] = []
    shown: set[str] = set()
    problems: Counter[str] = Counter()
    first_problem: dict[str, str] = {}
    for row_id, prompt in zip(ids, prompts):
        if prompt.problem is not None:
            reason = prompt.problem.split(":", 1)[0]
            problems[reason] += 1
            first_problem.setdefault(reason, f"{row_id}: {prompt.problem}")
            continue
        kind = prompt.endpoint or input_mode(cfg)
        if kind in shown:
            continue
        shown.add(kind)
        lines += _example(kind, row_id, prompt, builder, tokenizer)
    if problems:
        lines.append(f"requests that will fail among the first {len(prompts)} valid rows:")
        lines += [f"  {reason}: {count} (e.g. {first_problem[reason][:300]})" for reason, count in problems.items()]
    return os.linesep.join(lines or ["example requests: none of the first rows makes a request"])


def _example(kind: str, row_id: str, prompt: Prompt, builder: RequestBuilder, tokenizer: Any) -> list[str]:
    text = "\n[next input]\n".join(tokenizer.decode(p.token_ids or []) for p in prompt.requests())
    if len(text) > _SHOWN_CHARS:
        text = text[: _SHOWN_CHARS // 2] + f"\n[... {len(text) - _SHOWN_CHARS} characters ...]\n" + text[-_SHOWN_CHARS // 2:]
    head = f"# example request ({kind}): row {row_id!r}, {prompt.prompt_tokens} prompt tokens"
    if prompt.parts is not None:
        head += f" in {len(prompt.parts)} engine request{'s' if len(prompt.parts) > 1 else ''}"
    if prompt.truncated:
        head += ", truncated to fit"
    lines = [head]
    options = prompt.options or builder.base
    changed = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
               if getattr(options, f.name) != getattr(builder.base, f.name)}
    base = builder.base
    lines.append(f"options: {_options_text(changed) if changed else 'as sampling'}"
                 + (f"; structured output: {base.structured.kind}" if base.structured and not changed else ""))
    if prompt.model:
        lines.append(f"model: {prompt.model}")
    lines += ["---", text, "---"]
    return lines


def _options_text(changed: dict[str, Any]) -> str:
    parts = []
    for name, value in changed.items():
        if name == "structured" and value is not None:
            value = f"{value.kind} {value.spec[:200]}"
        parts.append(f"{name}={value}")
    return ", ".join(parts)
