"""A config from YAML: a safe loader with limits, ``key.sub=value`` overrides, and the typed tree
built from the raw mapping, naming the key, the value and the valid choices of anything wrong.

Overrides (values parsed as YAML) are applied to the raw tree first, so they are checked exactly like
the file. :func:`load_config` and :func:`config_from_dict` give a config whose structure and values
are checked (:mod:`shardinfer.config.values`); the checks against the engines, the prompt templates
and the results columns come on top, in :mod:`shardinfer.planning.validate`, which is how commands
load a config.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from shardinfer.config.schema import OLD_ENGINE_ARGS, Config, ModelConfig, deep_copy, default_of, text_settings
from shardinfer.config.values import check_values
from shardinfer.errors import ConfigError

log = logging.getLogger(__name__)

_DEFAULT_SECTIONS = ("prompt", "sampling", "pooling", "run", "slurm", "output")
MAX_YAML_DEPTH = 100  # nesting levels of a config file or override value
MAX_YAML_NODES = 100_000  # values of a config file or override value, aliases expanded
_WARNED: set[str] = set()  # old keys already warned about in this process


class _Refused(yaml.YAMLError):
    """A YAML document a config never needs: too deep, too large once aliases are expanded, or with a
    key given twice."""


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses documents nested deeper than :data:`MAX_YAML_DEPTH`, holding
    more than :data:`MAX_YAML_NODES` values once aliases are expanded (an alias bomb), aliases to a
    node that holds them (a recursive structure), and keys given twice in one mapping."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> values in it, aliases expanded

    def compose_node(self, parent: Any, index: Any) -> Any:
        mark = self.peek_event().start_mark
        if self.check_event(yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if id(node) not in self._sizes:
                raise _Refused(f"line {mark.line + 1}: an alias refers to a value that holds it (a recursive "
                               f"structure); write the value out instead")
            return node
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise _Refused(f"line {mark.line + 1}: nested more than {MAX_YAML_DEPTH} levels deep; a config needs a "
                           f"few levels: flatten it")
        node = super().compose_node(parent, index)
        self._depth -= 1
        self._sizes[id(node)] = size = 1 + sum(self._sizes[id(child)] for child in _children(node))
        if size > MAX_YAML_NODES:
            raise _Refused(f"line {mark.line + 1}: more than {MAX_YAML_NODES:,} values once its aliases (*name) are "
                           f"expanded; write the values out or use fewer aliases")
        return node

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # <<: *base, whose keys the mapping may override
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the constructor refuses it
                continue
            if first is not None:
                raise _Refused(f"line {line}: key {key!r} is given twice in one mapping (first on line {first}); "
                               f"keep one of them")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _children(node: Any) -> list[Any]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def load_yaml(text: str) -> Any:
    """A YAML value as a config holds it (raises ``yaml.YAMLError``; see :class:`_ConfigLoader`)."""
    loader = _ConfigLoader(text)
    try:
        return loader.get_single_data()
    except ValueError as exc:  # a value Python will not convert, e.g. an integer of 5,000 digits
        raise _Refused(f"a value cannot be read ({exc}); shorten it") from None
    finally:
        loader.dispose()


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}: not UTF-8 text: byte 0x{data[exc.start]:02x} on line {line} ({exc.reason}). "
                          f"Save the file as UTF-8, e.g. iconv -f latin1 -t utf-8 {path}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file, apply ``key.sub=value`` overrides, and build the tree with its structure and
    values checked (:func:`shardinfer.planning.validate.load_checked` adds the checks against the engines,
    prompts and results)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = load_yaml(_read_utf8(path)) or {}
    except _Refused as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    raw.setdefault("name", default_name(path))
    return config_from_dict(raw, overrides)


def default_name(path: Path) -> str:
    """The run name a config file gives when it sets none: its stem, as a simple name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).lstrip(".") or "run"


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Build a :class:`Config` from a plain mapping plus overrides, its structure and values checked."""
    raw = deep_copy(raw)
    for item in overrides or []:
        apply_override(raw, item, text_keys=text_settings())
    for section in _DEFAULT_SECTIONS:
        raw.setdefault(section, {})
    _task_defaults(raw)
    _engine_args(raw)
    config = _build(Config, raw, "")
    check_values(config)
    return config



def _task_defaults(raw: dict[str, Any]) -> None:
    """Pooling tasks read each row's text as it is (``prompt.mode: raw``, what ``LLM.embed`` and
    ``LLM.classify`` do with a text) unless the config asks for the chat template."""
    if raw.get("task", "generate") != "generate" and isinstance(raw["prompt"], dict):
        raw["prompt"].setdefault("mode", "raw")


def _engine_args(raw: dict[str, Any]) -> None:
    """``model.vllm_args`` and ``model.hf_args``, the earlier names of ``model.engine_args``: the one of
    the chosen engine becomes ``model.engine_args`` (a warning says so, once); the other is ignored, as
    it always was. Empty ones (in every run.json of earlier versions) go without a word."""
    model = raw.get("model")
    if not isinstance(model, dict):
        return
    engine = model.get("engine", default_of(next(f for f in dataclasses.fields(ModelConfig) if f.name == "engine")))
    for key, owner in OLD_ENGINE_ARGS.items():
        if key not in model:
            continue
        value = model.pop(key)
        if value is None or value == {}:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"model.{key}: expected a mapping, got {value!r} ({type(value).__name__}); it is the "
                              f"earlier name of model.engine_args, which takes the engine's arguments")
        if owner != engine:
            _warn_once(key, f"model.{key} is deprecated and ignored: it holds {owner}'s arguments and model.engine "
                            f"is {engine!r}; pass the engine's arguments in model.engine_args")
            continue
        _warn_once(key, f"model.{key} is deprecated: use model.engine_args (the arguments of whichever engine "
                        f"runs); its values are used as model.engine_args")
        given = model.get("engine_args")
        if given not in (None, {}) and given != value:
            raise ConfigError(f"model.{key} and model.engine_args are both given, with different values; "
                              f"model.{key} is the earlier name of model.engine_args: keep only model.engine_args "
                              f"(merge the arguments of model.{key} into it)")
        model["engine_args"] = value


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning("%s", message)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, allow_unicode=True)


def apply_override(raw: dict[str, Any], item: str, text_keys: frozenset[str] = frozenset()) -> None:
    """Set ``a.b.c=value`` in a raw mapping; the value is parsed as YAML (``2`` is an int), except
    for the text settings (``text_keys``), whose value is taken as it is written: ``prompt.user={text}``
    is the template ``{text}`` (quotes around the whole value are removed; ``null`` unsets it)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. run.workers=2")
    _check_utf8(item)
    if key.strip() in text_keys:
        value: Any = _text_value(text)
    else:
        try:
            value = load_yaml(text) if text.strip() else ""
        except _Refused as exc:
            raise ConfigError(f"override {item!r}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}. If it is text, quote it: "
                              f"{key.strip()}='{text}'") from exc
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _text_value(text: str) -> str | None:
    if text.strip() in ("null", "~"):
        return None
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        try:
            return str(load_yaml(text))
        except yaml.YAMLError as exc:
            raise ConfigError(f"quoted text {text!r} is not one quoted value ({exc}); quote the whole value once, "
                              f"or leave the quotes out") from None
    return text


def _check_utf8(item: str) -> None:
    """Command-line arguments that are not UTF-8 reach Python as lone surrogates."""
    try:
        item.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"override {item!r}: not UTF-8 text (at character {exc.start + 1}); pass overrides as "
                          f"UTF-8 text") from None


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(raw, fields, where)
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name not in raw:
            if default_of(f) is dataclasses.MISSING:
                raise ConfigError(f"{key} is required: {f.metadata['help']}")
            continue
        kwargs[name] = _coerce(hints[name], raw[name], key)
    return cls(**kwargs)


def _reject_unknown(raw: dict, fields: dict, where: str) -> None:
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            full = f"{where}.{key}" if where else str(key)
            raise ConfigError(f"unknown key {full!r}.{hint} Valid keys{' of ' + where if where else ''}: "
                              f"{', '.join(fields)}")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, key)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not a valid choice. Valid choices: {', '.join(map(str, args))}")
        return value
    if origin is list:
        return _coerce_list(args[0], value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r} ({type(value).__name__})")
        return {str(k): (str(v) if args[1] is str else v) for k, v in value.items()}
    return _coerce_scalar(tp, value, key)


def _coerce_list(item_type: Any, value: Any, key: str) -> list:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list, got {value!r} ({type(value).__name__}){_mapping_hint(value)}")
    return [_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]


def _coerce_scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return _finite(value, key)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r} ({type(value).__name__}){_mapping_hint(value)}")


def _finite(value: int | float, key: str) -> float:
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}; give an ordinary number such as 0.5")
    return number


def _mapping_hint(value: Any) -> str:
    """``{END}`` in YAML is a mapping with a null value: the user most likely meant text."""
    if isinstance(value, dict) and value and all(v is None for v in value.values()):
        text = "{" + ", ".join(map(str, value)) + "}"
        return f". {text} was read as a mapping: quote it to mean text ('{text}')"
    return ""
