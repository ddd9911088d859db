#!/usr/bin/env python3
"""Build the bundled demo corpus ``jobs/data/python-docs.jsonl.gz``.

License: the corpus is made of the documentation text of the running Python
interpreter's standard library (module, class, function and method
docstrings, and the help topics that ``pydoc`` ships in ``pydoc_data``).
That text is part of CPython and is distributed under the Python Software
Foundation License, which permits redistribution; see jobs/data/README.md.

Determinism: for a given Python build the output is byte-identical across
runs.  Modules, members and documents are visited in sorted order; split
points, per-module thresholds and the selection are derived from sha256
hashes of document ids; signatures show only literal defaults taken from
the source, never runtime values; the gzip header carries no file name and
a zero mtime.  Only the standard library is used.

Shape: documents are between MIN_CHARS and MAX_CHARS characters with an
about even spread in log-length (at most PER_BIN per log-length bin).

Usage::

    python jobs/build_demo_corpus.py [--output PATH]
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gzip
import hashlib
import importlib
import inspect
import io
import json
import math
import pkgutil
import re
import statistics
import sys
import textwrap
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SOURCE = "python-stdlib-docs"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "data" / "python-docs.jsonl.gz"

MIN_CHARS = 1_500
MAX_CHARS = 25_000
# Documents are grouped into this many equal-width bins of log(length) and
# at most PER_BIN are kept from each bin, so log-length is spread evenly.
N_BINS = 12
PER_BIN = 24
MIN_DOCUMENTS = 240

# Top-level modules that are skipped: side effects on import (opening a
# browser, printing, GUI toolkits), test suites, installers, platform
# shims, and packages whose import depends on third-party tools.
SKIP_TOP_LEVEL = frozenset(
    {
        "__main__",
        "antigravity",
        "distutils",
        "ensurepip",
        "idlelib",
        "lib2to3",
        "msilib",
        "msvcrt",
        "nt",
        "pydoc_data",
        "readline",
        "test",
        "this",
        "tkinter",
        "turtle",
        "turtledemo",
        "venv",
        "winreg",
        "winsound",
    }
)
# Any dotted component with one of these names is skipped.
SKIP_COMPONENTS = frozenset({"test", "tests", "idle_test"})
# Packages whose submodules are not worth walking (hundreds of tiny codecs).
NO_SUBMODULES = frozenset({"encodings"})

_ADDRESS_RE = re.compile(r" at 0x[0-9a-fA-F]+")
_SIMPLE_DEFAULT_TYPES = (bool, int, float, type(None))


@dataclass(frozen=True)
class Doc:
    """One corpus document before selection."""

    id: str
    title: str
    text: str


# --------------------------------------------------------------------------
# Module discovery
# --------------------------------------------------------------------------


def _is_public_name(dotted: str) -> bool:
    parts = dotted.split(".")
    if parts[0] in SKIP_TOP_LEVEL:
        return False
    if parts[0].startswith("turtle"):
        return False
    return not any(p.startswith("_") or p in SKIP_COMPONENTS for p in parts)


def _quiet_import(name: str):
    """Import ``name`` with warnings and stdout/stderr suppressed; None on failure."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except (Exception, SystemExit):  # noqa: BLE001 - any failure means "skip it"
            return None


def iter_stdlib_modules() -> Iterator[tuple[str, object]]:
    """Yield ``(name, module)`` for importable public stdlib modules, sorted by name."""
    pending = sorted(n for n in sys.stdlib_module_names if _is_public_name(n))
    seen: set[str] = set()
    while pending:
        name = pending.pop(0)
        if name in seen:
            continue
        seen.add(name)
        module = _quiet_import(name)
        if module is None:
            continue
        yield name, module
        path = getattr(module, "__path__", None)
        if path is None or name in NO_SUBMODULES:
            continue
        children = sorted(
            f"{name}.{info.name}" for info in pkgutil.iter_modules(list(path))
        )
        pending = sorted(set(pending) | {c for c in children if _is_public_name(c)})


# --------------------------------------------------------------------------
# Deterministic pseudo-randomness
# --------------------------------------------------------------------------


def _hash_unit(key: str) -> float:
    """A deterministic number in [0, 1) derived from ``key``."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _log_uniform(low: float, high: float, key: str) -> int:
    """A number log-uniform in [low, high], derived from ``key``."""
    a, b = math.log(low), math.log(high)
    return int(math.exp(a + (b - a) * _hash_unit(key)))


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------


def _clean(text: str | None) -> str:
    if not text or not isinstance(text, str):
        return ""
    return _ADDRESS_RE.sub("", inspect.cleandoc(text)).strip()


def _render_default(value: object) -> str:
    """Render a default value of a C function (its text signature is static)."""
    if isinstance(value, _SIMPLE_DEFAULT_TYPES):
        return repr(value)
    if isinstance(value, (str, bytes)) and len(value) <= 40:
        return repr(value)
    return "..."


def _literal(node: ast.expr | None) -> str:
    """Source text of a literal default expression, else "..."."""
    if node is None:
        return "..."
    inner = node.operand if isinstance(node, ast.UnaryOp) else node
    if isinstance(inner, ast.Constant) and len(repr(inner.value)) <= 42:
        return ast.unparse(node)
    return "..."


def _source_defaults(func: object) -> dict[str, str]:
    """Defaults of a Python function as written in its source.

    Runtime values can depend on the machine (``sys.executable``, the
    active install scheme), so they are never rendered; only literals from
    the source are, and anything else becomes "...".
    """
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    except Exception:  # noqa: BLE001 - no source, odd indentation, ...
        return {}
    node = next(
        (n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None
    )
    if node is None:
        return {}
    args = node.args
    positional = args.posonlyargs + args.args
    defaults: dict[str, str] = {}
    for arg, default in zip(positional[len(positional) - len(args.defaults):], args.defaults):
        defaults[arg.arg] = _literal(default)
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        if default is not None:
            defaults[arg.arg] = _literal(default)
    return defaults


def _signature(obj: object) -> str:
    """A signature showing only literal defaults (never arbitrary reprs)."""
    try:
        sig = inspect.signature(obj)
    except Exception:  # noqa: BLE001 - C signatures can fail in many ways
        return "(...)"
    from_source = inspect.isfunction(inspect.unwrap(obj)) if callable(obj) else False
    source_defaults = _source_defaults(obj) if from_source else {}
    parts: list[str] = []
    seen_star = False
    params = list(sig.parameters.values())
    for index, param in enumerate(params):
        kind = param.kind
        if kind is param.VAR_POSITIONAL:
            parts.append(f"*{param.name}")
            seen_star = True
        elif kind is param.VAR_KEYWORD:
            parts.append(f"**{param.name}")
        else:
            if kind is param.KEYWORD_ONLY and not seen_star:
                parts.append("*")
                seen_star = True
            text = param.name
            if param.default is not param.empty:
                if from_source:
                    text += "=" + source_defaults.get(param.name, "...")
                else:
                    text += "=" + _render_default(param.default)
            parts.append(text)
        is_last_positional_only = kind is param.POSITIONAL_ONLY and (
            index + 1 == len(params) or params[index + 1].kind is not param.POSITIONAL_ONLY
        )
        if is_last_positional_only:
            parts.append("/")
    return "(" + ", ".join(parts) + ")"


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line if line else "" for line in text.splitlines())


def _is_private_module(name: str) -> bool:
    return any(part.startswith("_") for part in name.split("."))


def _exported_names(module: object) -> list[str]:
    exported = getattr(module, "__all__", None)
    if isinstance(exported, (list, tuple)):
        return sorted({n for n in exported if isinstance(n, str) and not n.startswith("_")})
    return sorted(n for n in vars(module) if not n.startswith("_"))


def _ownership_rank(module_name: str, home: object) -> int | None:
    """How well ``module_name`` fits as the documenting module of an object.

    0: the object says it lives there; 1: it lives in the private twin
    (``_io`` for ``io``); 2: it lives in some other private module; None:
    it belongs to another public module, which documents it instead.
    """
    if not isinstance(home, str):
        return None
    if home == module_name:
        return 0
    if not _is_private_module(home):
        return None
    if home.lstrip("_").split(".")[0] == module_name:
        return 1
    return 2


def assign_members(modules: list[tuple[str, object]]) -> dict[str, list[tuple[str, object]]]:
    """Map each public module to the classes and routines it documents.

    Every object is documented once, under the best-ranked module that
    exports it (ties broken by module name, then attribute name).
    """
    best: dict[int, tuple[tuple[int, str, bool, str], object]] = {}
    for name, module in modules:
        namespace = vars(module)
        for attr in _exported_names(module):
            obj = namespace.get(attr)
            if obj is None or not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            rank = _ownership_rank(name, getattr(obj, "__module__", None))
            if rank is None:
                continue
            key = (rank, name, attr != getattr(obj, "__name__", attr), attr)
            current = best.get(id(obj))
            if current is None or key < current[0]:
                best[id(obj)] = (key, obj)
    owned: dict[str, list[tuple[str, object]]] = {name: [] for name, _ in modules}
    for (_, name, _, attr), obj in best.values():
        owned[name].append((attr, obj))
    for members in owned.values():
        members.sort(key=lambda item: item[0])
    return owned


def _member_doc(raw: object) -> str:
    if isinstance(raw, (classmethod, staticmethod)):
        raw = raw.__func__
    return _clean(getattr(raw, "__doc__", None))


def _render_method(attr: str, raw: object, owner: type) -> str:
    doc = _member_doc(raw)
    if not doc:
        return ""
    if isinstance(raw, property):
        return f"property {attr}\n{_indent(doc)}"
    func = getattr(owner, attr, raw)
    kind = "method"
    if isinstance(raw, classmethod):
        kind = "classmethod"
    elif isinstance(raw, staticmethod):
        kind = "staticmethod"
    return f"{kind} {attr}{_signature(func)}\n{_indent(doc)}"


def _is_documented_member(name: str) -> bool:
    """Public names and dunders (special methods); never ``_private`` ones."""
    dunder = name.startswith("__") and name.endswith("__") and len(name) > 4
    return dunder or not name.startswith("_")


def _generic_docs() -> frozenset[str]:
    """Docstrings of the built-in types' special methods ("Return self==value.")."""
    docs = set()
    generic_alias = type(list[int])
    iterator = type(iter([]))
    generator = type(x for x in ())
    for base in (object, type, int, float, complex, str, bytes, list, tuple, dict,
                 set, frozenset, BaseException, property, staticmethod, classmethod,
                 generic_alias, iterator, generator):
        docs.add(_clean(base.__doc__))
        for name, raw in vars(base).items():
            if name.startswith("__") and isinstance(getattr(raw, "__doc__", None), str):
                docs.add(_clean(raw.__doc__))
    return frozenset(docs)


_GENERIC_DOCS = _generic_docs()


def _is_boilerplate(name: str, raw: object) -> bool:
    if not name.startswith("__"):
        return False
    if name in ("__doc__", "__module__", "__dict__", "__weakref__", "__slots__"):
        return True
    return _member_doc(raw) in _GENERIC_DOCS


def render_class(attr: str, cls: type) -> str:
    """Plain-text documentation of a class and its own public members."""
    bases = ", ".join(b.__name__ for b in cls.__bases__ if b is not object)
    header = f"class {attr}({bases})" if bases else f"class {attr}"
    blocks = [header]
    doc = _clean(cls.__doc__)
    if doc:
        blocks.append(_indent(doc))
    for member in sorted(n for n in vars(cls) if _is_documented_member(n)):
        raw = vars(cls)[member]
        if _is_boilerplate(member, raw):
            continue
        if not (isinstance(raw, property) or inspect.isroutine(raw)
                or isinstance(raw, (classmethod, staticmethod))):
            continue
        rendered = _render_method(member, raw, cls)
        if rendered:
            blocks.append(_indent(rendered))
    if len(blocks) == 1:
        return ""
    return "\n\n".join(blocks)


def render_function(attr: str, func: object) -> str:
    doc = _clean(getattr(func, "__doc__", None))
    if not doc:
        return ""
    return f"function {attr}{_signature(func)}\n{_indent(doc)}"


def _summary(doc: str) -> str:
    first = doc.strip().splitlines()[0].strip() if doc.strip() else ""
    return first[:120]


def module_documents(name: str, module: object, members: list[tuple[str, object]]) -> list[Doc]:
    """The module's document plus one document per large class."""
    docs: list[Doc] = []
    module_doc = _clean(getattr(module, "__doc__", None))
    blocks = [f"Module {name}\n{'=' * (7 + len(name))}"]
    if module_doc:
        blocks.append(module_doc)
    functions = []
    # A class whose documentation reaches this module's (hashed) threshold
    # becomes a document of its own instead of being inlined; varying the
    # threshold per module varies the module documents' lengths.
    split_at = _log_uniform(MIN_CHARS, MAX_CHARS, "split:" + name)
    for attr, obj in members:
        if inspect.isclass(obj):
            text = render_class(attr, obj)
            if not text:
                continue
            if len(text) >= split_at:
                qualified = f"{name}.{attr}"
                summary = _summary(_clean(obj.__doc__))
                title = f"{qualified} — {summary}" if summary else qualified
                docs.append(Doc(qualified, title, f"Class {qualified} (module {name})\n\n{text}"))
                blocks.append(f"class {attr}\n    Documented separately as {qualified}.")
            else:
                blocks.append(text)
        else:
            text = render_function(attr, obj)
            if text:
                functions.append(text)
    blocks.extend(functions)
    summary = _summary(module_doc)
    title = f"{name} — {summary}" if summary else name
    docs.append(Doc(name, title, "\n\n".join(blocks)))
    return docs


# --------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------


def split_long(doc: Doc) -> list[Doc]:
    """Split an over-long document into parts at paragraph breaks.

    Each part's size is capped by a hashed, log-uniform length so that the
    parts fill the upper length bins evenly instead of piling up at
    MAX_CHARS.  Parts get ids ``<id>#<n>``.
    """
    if len(doc.text) <= MAX_CHARS:
        return [doc]
    parts: list[str] = []
    rest = doc.text
    while len(rest) > MAX_CHARS:
        cap = _log_uniform(MAX_CHARS / 4, MAX_CHARS, f"cap:{doc.id}#{len(parts) + 1}")
        cut = rest.rfind("\n\n", 0, cap)
        if cut < MIN_CHARS:
            cut = cap
        parts.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip("\n")
    parts.append(rest.rstrip())
    return [
        Doc(f"{doc.id}#{n}", f"{doc.title} (part {n})", text)
        for n, text in enumerate(parts, start=1)
    ]


def _bin_of(length: int) -> int:
    span = math.log(MAX_CHARS) - math.log(MIN_CHARS)
    position = (math.log(length) - math.log(MIN_CHARS)) / span
    return min(N_BINS - 1, max(0, int(position * N_BINS)))


def select(docs: list[Doc]) -> list[Doc]:
    """Keep up to PER_BIN documents per log-length bin, chosen by id hash."""
    bins: dict[int, list[Doc]] = {}
    for doc in docs:
        if MIN_CHARS <= len(doc.text) <= MAX_CHARS:
            bins.setdefault(_bin_of(len(doc.text)), []).append(doc)
    chosen: list[Doc] = []
    for index in sorted(bins):
        ranked = sorted(bins[index], key=lambda d: (_hash_unit("pick:" + d.id), d.id))
        chosen.extend(ranked[:PER_BIN])
    return sorted(chosen, key=lambda d: d.id)


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def topic_documents() -> list[Doc]:
    """The language and library help topics that ``pydoc`` ships."""
    module = _quiet_import("pydoc_data.topics")
    topics = getattr(module, "topics", None)
    if not isinstance(topics, dict):
        return []
    docs = []
    for key in sorted(topics):
        text = _ADDRESS_RE.sub("", topics[key]).strip()
        if not text:
            continue
        heading = text.splitlines()[0].strip()
        docs.append(Doc(f"pydoc_data.topics.{key}", f"{key} — {heading}", text))
    return docs


def collect_documents() -> list[Doc]:
    modules = list(iter_stdlib_modules())
    owned = assign_members(modules)
    docs: dict[str, Doc] = {}
    for name, module in modules:
        for doc in module_documents(name, module, owned[name]):
            docs.setdefault(doc.id, doc)
    for doc in topic_documents():
        docs.setdefault(doc.id, doc)
    result: list[Doc] = []
    for key in sorted(docs):
        result.extend(split_long(docs[key]))
    return result


def _check_no_local_paths(docs: list[Doc]) -> None:
    """Refuse to write text that mentions this machine's installation paths."""
    markers = {sys.prefix, sys.base_prefix, sys.exec_prefix, str(Path.home())}
    markers = {m for m in markers if m and m not in ("/", "/usr", "/usr/local")}
    for doc in docs:
        for marker in markers:
            if marker in doc.text:
                raise SystemExit(f"document {doc.id!r} mentions local path {marker!r}")


def write_jsonl_gz(docs: list[Doc], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for doc in docs:
        record = {"id": doc.id, "title": doc.title, "text": doc.text, "source": SOURCE}
        lines.append(json.dumps(record, ensure_ascii=False, sort_keys=False))
    payload = ("\n".join(lines) + "\n").encode("utf-8")
    tmp = output.with_name(output.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
        gz.write(payload)
    tmp.replace(output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)

    candidates = collect_documents()
    docs = select(candidates)
    _check_no_local_paths(docs)
    if len({d.id for d in docs}) != len(docs):
        raise SystemExit("duplicate document ids")
    if len(docs) < MIN_DOCUMENTS:
        raise SystemExit(f"only {len(docs)} documents selected, need {MIN_DOCUMENTS}")
    write_jsonl_gz(docs, args.output)

    lengths = sorted(len(d.text) for d in docs)
    digest = hashlib.sha256(args.output.read_bytes()).hexdigest()
    print(f"python {sys.version.split()[0]}: {len(candidates)} candidate documents")
    print(
        f"wrote {len(docs)} documents to {args.output} "
        f"({args.output.stat().st_size} bytes, sha256 {digest[:16]})"
    )
    print(
        f"chars: min {lengths[0]}, median {int(statistics.median(lengths))}, "
        f"max {lengths[-1]}, total {sum(lengths)}"
    )
    counts = [0] * N_BINS
    for length in lengths:
        counts[_bin_of(length)] += 1
    print("documents per log-length bin:", " ".join(str(c) for c in counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
