"""What a row asks of the engine besides its prompt: sampling options, structured output, an adapter.

One set of checks serves the config (``sampling.*``), per-row columns (``sampling.per_row``) and
OpenAI batch request bodies, so a value is valid or not the same way wherever it comes from. A bad
value raises :class:`OptionError` naming the option and the fix; per row, that fails the row alone.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from typing import Any

from shardinfer.config import SamplingConfig, StructuredConfig

MAX_N = 128
MAX_LOGPROBS = 20  # vLLM's default max_logprobs
SEEDS = (-(2**63), 2**63 - 1)  # a request's seed, as vLLM's OpenAI server takes it
STRUCTURED_KINDS = ("json_schema", "regex", "choice", "grammar", "json_object")
# Options a column may set per row (sampling.per_row: {option: column}).
PER_ROW = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "logprobs",
           "presence_penalty", "frequency_penalty", *STRUCTURED_KINDS[:4])


class OptionError(ValueError):
    """A request option that cannot be used; ``code`` is the error's short name."""

    def __init__(self, message: str, code: str = "invalid_option"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Structured:
    """Constrained decoding: the output must match a JSON schema, a regex, one of some choices, a
    grammar, or be any JSON object. ``spec`` is the schema as JSON text, the regex, the choices as a
    JSON list or the grammar ("" for json_object), so options stay hashable."""

    kind: str
    spec: str = ""

    def engine_kwargs(self) -> dict[str, Any]:
        """Arguments of vLLM's ``StructuredOutputsParams``."""
        if self.kind == "json_schema":
            return {"json": json.loads(self.spec)}
        if self.kind == "choice":
            return {"choice": json.loads(self.spec)}
        if self.kind == "json_object":
            return {"json_object": True}
        return {self.kind: self.spec}

    def check(self, text: str) -> str | None:
        """Why an output does not match (None when it does; grammars are not checked here)."""
        if self.kind in ("json_schema", "json_object"):
            return _check_json(text, json.loads(self.spec) if self.kind == "json_schema" else None)
        if self.kind == "regex":
            return None if re.fullmatch(self.spec, text) else f"output does not match the regex {self.spec!r}"
        if self.kind == "choice":
            choices = json.loads(self.spec)
            return None if text in choices else f"output {text[:40]!r} is not one of {choices}"
        return None

    @property
    def checked(self) -> bool:
        return self.kind != "grammar"


@dataclass(frozen=True)
class RowOptions:
    """Everything a row asks of the engine besides its prompt tokens."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # None: off; 0: the chosen tokens' only; k: plus the top k alternatives
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    structured: Structured | None = None
    lora: str | None = None  # an adapter name of model.lora; None: the base model

    def set(self, name: str, value: Any, where: str) -> RowOptions:
        """These options with ``name`` set to a checked ``value`` (``where`` names it in errors)."""
        if name in STRUCTURED_KINDS:
            return replace(self, structured=structured_of(name, value, where))
        return replace(self, **{name: _CHECKS[name](value, where)})

    @property
    def budget_tokens(self) -> int:
        """Output tokens the engine may produce for this row (all samples)."""
        return self.max_tokens * self.n

    def unsupported(self, capabilities: Any) -> str | None:
        """What of these options an engine cannot do (its :class:`Capabilities`), or None."""
        wanted = {"structured_output": self.structured is not None, "lora": self.lora is not None,
                  "samples": self.n > 1, "logprobs": self.logprobs is not None,
                  "penalties": bool(self.presence_penalty or self.frequency_penalty)}
        missing = [name for name, on in wanted.items() if on and not getattr(capabilities, name, False)]
        return ", ".join(missing) or None


def base_options(s: SamplingConfig) -> RowOptions:
    """The config's options, every row's starting point."""
    return RowOptions(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                      seed=s.seed, stop=tuple(s.stop), ignore_eos=s.ignore_eos, n=s.n, logprobs=s.logprobs,
                      structured=config_structured(s.structured))


def config_structured(cfg: StructuredConfig) -> Structured | None:
    """The config's structured output (``sampling.structured``): at most one kind set."""
    chosen = {k: getattr(cfg, k) for k in STRUCTURED_KINDS if getattr(cfg, k) not in (None, False)}
    if len(chosen) > 1:
        raise OptionError(f"sampling.structured: set one of {', '.join(STRUCTURED_KINDS)}, not "
                          f"{' and '.join(chosen)}")
    if not chosen:
        return None
    (kind, value), = chosen.items()
    return structured_of(kind, value, f"sampling.structured.{kind}")


def structured_of(kind: str, value: Any, where: str) -> Structured:
    """A checked :class:`Structured` from a config value, a column value or a request body."""
    if kind == "json_object":
        return Structured("json_object")
    if kind == "json_schema":
        return Structured(kind, json.dumps(_schema(value, where), sort_keys=True))
    if kind == "choice":
        if isinstance(value, str):
            value = _json(value, where)
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise OptionError(f"{where}: choices must be a non-empty list of non-empty strings, got {value!r}",
                              "invalid_choice")
        return Structured(kind, json.dumps(value))
    if not isinstance(value, str) or not value:
        raise OptionError(f"{where}: must be a non-empty string, got {value!r}", f"invalid_{kind}")
    if kind == "regex":
        try:
            re.compile(value)
        except re.error as exc:
            raise OptionError(f"{where}: not a valid regular expression: {exc}", "invalid_regex") from exc
    return Structured(kind, value)


def _schema(value: Any, where: str) -> dict[str, Any]:
    import jsonschema

    if isinstance(value, str):
        value = _json(value, where)
    if not isinstance(value, dict):
        raise OptionError(f"{where}: a JSON schema must be an object, got {type(value).__name__}", "invalid_schema")
    try:
        jsonschema.validators.validator_for(value).check_schema(value)
    except jsonschema.SchemaError as exc:
        path = "/".join(str(p) for p in exc.path) or "(top)"
        raise OptionError(f"{where}: not a valid JSON schema at {path}: {exc.message}", "invalid_schema") from exc
    return value


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise OptionError(f"{where}: not valid JSON: {exc.msg} at column {exc.colno}", "invalid_json") from exc


def _check_json(text: str, schema: dict[str, Any] | None) -> str | None:
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"output is not valid JSON: {exc.msg} at column {exc.colno}"
    if schema is None:
        return None if isinstance(value, dict) else f"output is a JSON {type(value).__name__}, not an object"
    error = jsonschema.exceptions.best_match(jsonschema.validators.validator_for(schema)(schema).iter_errors(value))
    if error is None:
        return None
    return f"output does not match the schema at {'/'.join(str(p) for p in error.path) or '(top)'}: {error.message}"


# ---- one check per option ---------------------------------------------------------------------


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(f"{where}: expected a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        number = math.inf
    if not math.isfinite(number):
        raise OptionError(f"{where}: must be a finite number, got {value!r}")
    return number


def _integer(value: Any, where: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(f"{where}: expected an integer, got {value!r}")
    return value


def _between(lo: float, hi: float, *, integer: bool = False, low_open: bool = False) -> Any:
    def check(value: Any, where: str) -> Any:
        v = _integer(value, where) if integer else _number(value, where)
        if v < lo or v > hi or (low_open and v == lo):
            raise OptionError(f"{where}: must be {'above' if low_open else 'at least'} {lo} and at most {hi}, "
                              f"got {value!r}")
        return v
    return check


def _top_k(value: Any, where: str) -> int | None:
    if value is None:
        return None
    k = _integer(value, where)
    return None if k in (0, -1) else _between(1, 1 << 20, integer=True)(k, where)


def _seed(value: Any, where: str) -> int | None:
    return None if value is None else _between(*SEEDS, integer=True)(value, where)


def _stop(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) and s for s in value):
        raise OptionError(f"{where}: expected a string or a list of non-empty strings, got {value!r}")
    return tuple(value)


def _logprobs(value: Any, where: str) -> int | None:
    if value is None or value is False:
        return None
    if value is True:
        return 0
    return _between(0, MAX_LOGPROBS, integer=True)(value, where)


def _boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise OptionError(f"{where}: expected true or false, got {value!r}")
    return value


_CHECKS: dict[str, Any] = {
    "max_tokens": _between(1, 1 << 24, integer=True),
    "temperature": _between(0, 100),
    "top_p": _between(0, 1, low_open=True),
    "top_k": _top_k,
    "seed": _seed,
    "stop": _stop,
    "ignore_eos": _boolean,
    "n": _between(1, MAX_N, integer=True),
    "logprobs": _logprobs,
    "presence_penalty": _between(-2, 2),
    "frequency_penalty": _between(-2, 2),
}


def check_config(s: SamplingConfig) -> RowOptions:
    """The config's options, each checked as a per-row value would be (raises :class:`OptionError`)."""
    options = base_options(s)
    for name in ("n", "logprobs", "top_k", "stop", "max_tokens"):
        options = options.set(name, getattr(s, name), f"sampling.{name}")
    for name, column in s.per_row.items():
        if name not in PER_ROW:
            raise OptionError(f"sampling.per_row.{name}: not an option a column can set. Valid options: "
                              f"{', '.join(PER_ROW)}")
        if not isinstance(column, str) or not column:
            raise OptionError(f"sampling.per_row.{name}: give the name of the column holding it, got {column!r}")
    return options
