"""The input files: which files a config names, their formats and short names, and which of their
columns a read keeps.

Files are found locally (a file, a directory, a glob), in an object store (a URL), in a directory
written by ``datasets``' ``save_to_disk`` or in the ``datasets`` cache (``input.format:
hf-dataset``). Errors of the whole input (no files, a suffix of no known format) are raised as
:class:`ConfigError` before any work starts.
"""

from __future__ import annotations

import glob
import json
import posixpath
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from shardinfer.config import InputConfig
from shardinfer.errors import ConfigError, missing_dependency
from shardinfer.inputs import storage

_SUFFIXES = {
    ".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow",
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
    ".csv": "csv",
}

# An OpenAI batch file's rows: the request line whole, identified by its custom_id.
OPENAI_REQUEST, OPENAI_ID = "request", "custom_id"


@dataclass(frozen=True)
class InputFile:
    """One input file: where it is (a local path or a URL), its short name in row ids, and how to
    read it."""

    path: str
    source: str
    format: str  # parquet | arrow | jsonl | csv | openai-batch
    compression: str | None = None  # .gz | .zst | .bz2 | .xz

    @property
    def gzip(self) -> bool:
        return self.compression == ".gz"

    @property
    def local(self) -> bool:
        return not storage.is_remote(self.path)


@dataclass(frozen=True)
class Columns:
    """Which input columns a read keeps, and what the text column holds: text, a chat (``messages``,
    kept as JSON text) or, in an OpenAI batch file, the whole request line (``openai``)."""

    text: str
    id: str | None
    extra: tuple[str, ...] = ()  # pass-through and request columns (template fields, per-row options)
    kind: str = "text"  # text | messages | openai

    @property
    def wanted(self) -> list[str]:
        return list(dict.fromkeys(c for c in (self.text, self.id, *self.extra) if c))


def columns_for(cfg: InputConfig, used: list[tuple[str, str]], *, with_extra: bool = True) -> Columns:
    """The columns to read: the text (or chat, or request line), the id and the ``used`` ones
    ((config key, column) pairs that a row's request reads)."""
    if cfg.format == "openai-batch":
        return Columns(OPENAI_REQUEST, OPENAI_ID, kind="openai")
    extra = tuple(extra_columns(cfg, used)) if with_extra else ()
    if cfg.messages_column:
        return Columns(cfg.messages_column, cfg.id_column, extra, kind="messages")
    return Columns(cfg.text_column, cfg.id_column, extra)


def extra_columns(cfg: InputConfig, used: list[tuple[str, str]]) -> list[str]:
    """Columns kept per row besides the text: pass-through and request columns."""
    names = list(cfg.passthrough) + [c for _, c in used if c != "text"]
    return list(dict.fromkeys(names))


def configured_columns(cfg: InputConfig, used: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(config key, column) of every column the config names, which the input must have."""
    pairs = [("input.messages_column", cfg.messages_column) if cfg.messages_column
             else ("input.text_column", cfg.text_column)]
    if cfg.id_column:
        pairs.append(("input.id_column", cfg.id_column))
    pairs += [("input.passthrough", c) for c in cfg.passthrough]
    pairs += [(key, c) for key, c in used if c != "text" and c != cfg.text_column]
    return pairs


# ---- finding the files ------------------------------------------------------------------------


def input_files(cfg: InputConfig) -> list[InputFile]:
    """The input files with their short names, formats and compressions."""
    files = resolve_files(cfg)
    return [InputFile(path, name, file_format(path, cfg.format), storage.compression(path))
            for path, name in zip(files, source_names(files))]


def resolve_files(cfg: InputConfig) -> list[str]:
    """Input files in a deterministic order: a file, every corpus file of a directory, or a glob;
    local paths or URLs (``s3://bucket/docs/*.parquet``)."""
    if cfg.format == "hf-dataset":
        files = hf_dataset_files(cfg)
    elif storage.is_remote(cfg.path):
        files = storage.expand(cfg.path, keep=_suffix_format)
    elif (saved := saved_dataset_files(Path(cfg.path), cfg.split)) is not None:
        files = saved
    else:
        files = [str(p) for p in _local_files(cfg.path)]
    if not files:
        raise ConfigError(
            f"input.path: {cfg.path!r} matches no input file. Give a file, a directory holding "
            f".parquet/.jsonl/.jsonl.gz/.csv files, or a glob such as 'data/*.parquet'."
        )
    for f in files:
        file_format(f, cfg.format)
    return files


def saved_dataset_files(path: Path, split: str | None) -> list[str] | None:
    """The Arrow files of a directory written by ``datasets``' ``save_to_disk`` (a Dataset, or a
    DatasetDict whose split is ``split``), in order; None when ``path`` is not one."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in splits:
            raise ConfigError(f"input.split: {path} holds the splits {', '.join(splits)}; "
                              f"{'choose one' if split is None else repr(split) + ' is not one of them'} "
                              f"(input.split=...)")
        path = path / str(split)
    state = path / "state.json"
    if not state.is_file():
        return None
    return [str(path / entry["filename"]) for entry in json.loads(state.read_text()).get("_data_files", [])]


def hf_dataset_files(cfg: InputConfig) -> list[str]:
    """The cached Arrow files of a Hugging Face dataset (``input.path``: its name), found by the
    datasets library in its cache; nothing is downloaded when HF_DATASETS_OFFLINE is set."""
    try:
        import datasets
    except ImportError as exc:
        raise missing_dependency("datasets", "datasets", "input.format: hf-dataset") from exc
    try:
        loaded = datasets.load_dataset(cfg.path, cfg.config, split=cfg.split)
    except Exception as exc:
        raise ConfigError(f"input.path: the dataset {cfg.path!r} (config {cfg.config!r}, split {cfg.split!r}) "
                          f"cannot be loaded: {exc}. Download it first (datasets.load_dataset) or point "
                          f"input.path at a save_to_disk directory.") from exc
    if isinstance(loaded, dict):
        raise ConfigError(f"input.split: the dataset {cfg.path!r} has the splits {', '.join(loaded)}; choose one")
    return [entry["filename"] for entry in loaded.cache_files]


def _local_files(pattern: str) -> list[Path]:
    path = Path(pattern)
    if path.is_file():
        return [path]
    if path.is_dir():
        return [p for p in sorted(path.rglob("*")) if p.is_file() and _suffix_format(p)]
    return [Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if Path(p).is_file()]


def file_format(path: str | Path, explicit: str = "auto") -> str:
    """The format a file is read as: ``explicit`` (input.format), else the one its suffix names."""
    if explicit == "hf-dataset":
        return "arrow"
    if explicit != "auto":
        return explicit
    fmt = _suffix_format(path)
    if fmt is None:
        raise ConfigError(
            f"input.format: cannot tell the format of {str(path)!r} from its suffix. "
            f"Set input.format to parquet, jsonl or csv."
        )
    return fmt


def _suffix_format(path: str | Path) -> str | None:
    suffixes = [s.lower() for s in PurePosixPath(str(path).split("://")[-1]).suffixes]
    if suffixes and suffixes[-1] in storage.COMPRESSIONS:
        suffixes = suffixes[:-1]
    return _SUFFIXES.get(suffixes[-1]) if suffixes else None


def source_names(files: list[str]) -> list[str]:
    """Short, stable names of the files (relative to their common directory), used in row ids."""
    absolute = [f if storage.is_remote(f) else str(Path(f).resolve()) for f in files]
    names = [f.split("://", 1)[-1] for f in absolute]
    if len(names) == 1:
        return [PurePosixPath(names[0]).name]
    root = posixpath.commonpath([posixpath.dirname(n) for n in names])
    return [posixpath.relpath(n, root) for n in names]
