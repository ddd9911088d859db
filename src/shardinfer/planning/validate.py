"""A config checked against the rest of shardinfer: the one way a user's config enters a command.

:mod:`shardinfer.config` builds the tree and checks its structure and values, knowing nothing of the
stages above it. What needs them is checked here, once: the engine is a registered one (and takes
the arguments given), the request options and input modes go together and the engine supports them,
the user template has plain ``{column}`` fields, and the pass-through columns do not shadow a
results column.

:func:`load_checked` and :func:`checked_from_dict` are :func:`shardinfer.config.load_config` and
:func:`shardinfer.config.config_from_dict` followed by :func:`validate`; the CLI, the launches, the
run directory (its saved config read back) and the benchmarks load configs through them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shardinfer.config import Config, config_from_dict, load_config
from shardinfer.engines.registry import EngineSpec, engine_names, engines
from shardinfer.errors import ConfigError
from shardinfer.requests.prompts import template_fields
from shardinfer.requests.row_options import OptionError, RowOptions, check_config
from shardinfer.results import CONTRACT, POOLED_NAMES, RESERVED


def load_checked(path: str | Path, overrides: list[str] | None = None) -> Config:
    """A config file plus ``key.sub=value`` overrides, with every check."""
    return validate(load_config(path, overrides))


def checked_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """A config from a plain mapping plus overrides, with every check."""
    return validate(config_from_dict(raw, overrides))


def validate(config: Config) -> Config:
    """The checks that need the engines, the requests and the results contract (raises
    :class:`~shardinfer.errors.ConfigError`); returns the config."""
    spec = _engine(config)
    _passthrough(config)
    options = _options(config)
    _modes(config)
    _template(config)
    _capabilities(config, spec, options)
    _task(config, spec)
    return config


def reference_notes() -> dict[str, str]:
    """What the config reference adds to the fields' own help: the engines registered now."""
    return {"model.engine": f"(registered: {', '.join(engine_names())})"}


def _engine(config: Config) -> EngineSpec:
    known = engines()
    name = config.model.engine
    if name not in known:
        raise ConfigError(f"model.engine: {name!r} is not a valid choice. Valid choices: {', '.join(known)}")
    spec = known[name]
    if config.model.engine_args and not spec.takes_args:
        raise ConfigError(f"model.engine_args: engine {name} takes no arguments, got "
                          f"{', '.join(map(str, config.model.engine_args))}; remove model.engine_args")
    return spec


def _passthrough(config: Config) -> None:
    for name in config.input.passthrough:
        if name in RESERVED or (config.task != "generate" and name in POOLED_NAMES):
            raise ConfigError(
                f"input.passthrough: {name!r} is a results column already. Remove it"
                + (" (the id column is the results' id)" if name == config.input.id_column else "")
                + f"; results columns are: {', '.join(CONTRACT)}."
            )


def _options(config: Config) -> RowOptions:
    """The request options of the config, checked as a row's would be."""
    try:
        return check_config(config.sampling)
    except OptionError as exc:
        raise ConfigError(str(exc)) from exc


def _modes(config: Config) -> None:
    """The input modes and settings that go together."""
    i, model = config.input, config.model
    if i.format == "openai-batch":
        for key, value in (("input.messages_column", i.messages_column), ("input.system_column", i.system_column),
                           ("input.passthrough", i.passthrough), ("sampling.per_row", config.sampling.per_row),
                           ("model.lora_column", model.lora_column)):
            if value:
                raise ConfigError(f"{key}: an OpenAI batch file carries each request whole (messages, options, "
                                  f"model); remove {key} or set input.format to jsonl")
    if i.messages_column and config.prompt.user != "{text}":
        raise ConfigError("prompt.user: a template does not apply to input.messages_column (the chat is sent as "
                          "it is); remove prompt.user or use input.text_column")
    if model.lora_column and not model.lora:
        raise ConfigError("model.lora_column: no adapters are named; set model.lora: {name: adapter directory}")


def _template(config: Config) -> None:
    """The user template: plain ``{column}`` fields only, and not empty where it is the prompt."""
    template_fields(config.prompt.user)
    if not (config.input.messages_column or config.input.format == "openai-batch") and not config.prompt.user.strip():
        raise ConfigError("prompt.user: the template is empty, so every prompt would be empty; give a template "
                          "such as prompt.user='{text}' or 'Summarize: {text}'")


def _task(config: Config, spec: EngineSpec) -> None:
    """The engine runs the task; a pooling task takes no generation settings."""
    if config.task not in spec.tasks:
        able = [name for name, s in engines().items() if config.task in s.tasks]
        raise ConfigError(f"task: engine {spec.name} does not run task {config.task} (it runs "
                          f"{', '.join(spec.tasks)}). Use model.engine={' or '.join(able) or '(no registered engine)'}")
    if config.task == "generate":
        return
    sampling = config.sampling
    generation = {"sampling.per_row": sampling.per_row, "sampling.n": sampling.n != 1,
                  "sampling.logprobs": sampling.logprobs is not None, "model.lora_column": config.model.lora_column,
                  "sampling.structured": any(vars(sampling.structured).values())}
    for key, asked in generation.items():
        if asked:
            raise ConfigError(f"{key}: a generation setting; task {config.task} generates nothing. Remove it, or "
                              f"set task: generate")


def _capabilities(config: Config, spec: EngineSpec, options: RowOptions) -> None:
    """What the config asks of the engine, against what it declares."""
    per_row = config.sampling.per_row
    needs = {
        "structured output (sampling.structured, sampling.per_row)": ("structured_output", options.structured
                                                                      or set(per_row) & {"json_schema", "regex",
                                                                                         "choice", "grammar"}),
        "LoRA adapters (model.lora)": ("lora", config.model.lora),
        "n > 1 (sampling.n, sampling.per_row.n)": ("samples", options.n > 1 or "n" in per_row),
        "logprobs (sampling.logprobs, sampling.per_row.logprobs)": ("logprobs", options.logprobs is not None
                                                                    or "logprobs" in per_row),
        "penalties (sampling.per_row)": ("penalties", set(per_row) & {"presence_penalty", "frequency_penalty"}),
    }
    for what, (capability, wanted) in needs.items():
        if wanted and not getattr(spec.capabilities, capability):
            able = [name for name, s in engines().items() if getattr(s.capabilities, capability)]
            raise ConfigError(f"model.engine: {spec.name} does not support {what}. Use model.engine="
                              f"{' or '.join(able) or '(no registered engine)'}, or drop the setting.")
