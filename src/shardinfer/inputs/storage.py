"""Where input and result files live: local paths, or object stores and web servers through fsspec
(``s3://``, ``gs://``, ``hf://``, ``http(s)://``), and how their bytes are opened.

Credentials are found the store's own way (environment, config files, instance roles) and never
written anywhere by shardinfer. Compressed files (``.gz``, ``.zst``, ``.bz2``, ``.xz``) are
decompressed as they are read. Every failure of the store (no such bucket or file, no credentials,
access denied, a missing package) becomes a :class:`ConfigError` naming the path and the fix.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, cast

from shardinfer.errors import ConfigError, missing_dependency

COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz")
# The package each protocol needs, and the extra that installs it.
PROTOCOLS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"),
             "hf": ("huggingface_hub", "hf"), "http": ("aiohttp", "http"), "https": ("aiohttp", "http")}
_BLOCK = 8 << 20  # bytes fetched per remote read: a unit's range arrives in a few requests


def is_remote(path: str | Path) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def protocol(path: str) -> str:
    return str(path).split("://", 1)[0] if is_remote(path) else "file"


def compression(path: str | Path) -> str | None:
    suffix = posixpath.splitext(str(path).lower())[1]
    return suffix if suffix in COMPRESSIONS else None


def filesystem(path: str) -> tuple[Any, str]:
    """The fsspec filesystem of a URL and the path within it."""
    try:
        import fsspec
    except ImportError as exc:
        raise missing_dependency("fsspec", PROTOCOLS.get(protocol(path), ("", "s3"))[1]) from exc
    try:
        return fsspec.core.url_to_fs(path)
    except ImportError as exc:
        module, extra = PROTOCOLS.get(protocol(path), (protocol(path), protocol(path)))
        raise missing_dependency(module, extra, f"to read {path}") from exc
    except ValueError as exc:  # an unknown protocol
        raise ConfigError(f"{path}: {exc}. Give a local path or an s3://, gs://, hf:// or http(s):// URL.") from exc


def url(fs: Any, path: str) -> str:
    """A path of ``fs`` as a full URL (fsspec's own paths drop the protocol)."""
    return fs.unstrip_protocol(path)


@contextlib.contextmanager
def errors(path: str, what: str = "input.path") -> Iterator[None]:
    """Store failures as config errors that name the path and say what to do."""
    try:
        yield
    except FileNotFoundError as exc:
        raise ConfigError(f"{what}: {path} does not exist ({exc}). Check the bucket and the key.") from exc
    except PermissionError as exc:
        raise ConfigError(f"{what}: access to {path} is denied ({exc}). Check the credentials' rights.") from exc
    except ConfigError:
        raise
    except Exception as exc:
        name = type(exc).__name__
        if "Credential" in name or "credential" in str(exc):
            raise ConfigError(f"{what}: no credentials for {path} ({name}: {exc}). Set them the store's usual "
                              f"way (e.g. AWS_ACCESS_KEY_ID / AWS_PROFILE, gcloud auth, HF_TOKEN).") from exc
        if "NoSuchBucket" in name or "NoSuchBucket" in str(exc) or "bucket does not exist" in str(exc).lower():
            raise ConfigError(f"{what}: the bucket of {path} does not exist ({exc}).") from exc
        raise


def open_bytes(path: str, offset: int = 0) -> IO[bytes]:
    """The file's raw bytes from ``offset`` (remote files: read in large blocks, on demand)."""
    if not is_remote(path):
        fh = open(path, "rb")  # noqa: SIM115 - returned to the caller's with-block
        fh.seek(offset)
        return fh
    fs, inner = filesystem(path)
    with errors(path):
        remote = fs.open(inner, "rb", block_size=_BLOCK)
        try:
            remote.seek(offset)
            if offset and protocol(path) in ("http", "https"):
                remote.read(1)  # a web server may not take range requests: find out now
                remote.seek(offset)
        except (ValueError, io.UnsupportedOperation):  # it does not: read from the start
            remote.close()
            return skip_to(cast(IO[bytes], fs.open(inner, "rb", block_size=0)), offset)
    return cast(IO[bytes], remote)


def open_decompressed(path: str) -> IO[bytes]:
    """The file's content from the start, decompressed by suffix."""
    raw = open_bytes(path)
    kind = compression(path)
    if kind == ".gz":
        return cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
    if kind == ".bz2":
        return cast(IO[bytes], bz2.BZ2File(raw, "rb"))
    if kind == ".xz":
        return cast(IO[bytes], lzma.LZMAFile(raw, "rb"))
    if kind == ".zst":
        try:
            import zstandard
        except ImportError as exc:
            raise missing_dependency("zstandard", "zstd", f"to read {path}") from exc
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        return cast(IO[bytes], io.BufferedReader(reader, buffer_size=1 << 20))  # lines, buffered reads
    return raw


def skip_to(stream: IO[bytes], offset: int) -> IO[bytes]:
    """A decompressed stream moved forward to ``offset`` (by seeking where it can, else by reading)."""
    try:
        stream.seek(offset)
    except (io.UnsupportedOperation, OSError, ValueError):
        left = offset
        while left > 0:
            chunk = stream.read(min(left, 8 << 20))
            if not chunk:
                break
            left -= len(chunk)
    return stream


def stat(path: str) -> dict[str, Any]:
    """Size, and what the store guarantees changes with the content: the ETag or generation of an
    object, the modification time of a local file."""
    if not is_remote(path):
        st = Path(path).stat()
        return {"bytes": st.st_size, "mtime": st.st_mtime, "version": None}
    fs, inner = filesystem(path)
    with errors(path):
        info = fs.info(inner)
    version = next((str(info[k]) for k in ("ETag", "etag", "generation", "VersionId", "sha", "last_commit",
                                           "LastModified", "mtime") if info.get(k)), None)
    return {"bytes": int(info.get("size") or 0), "mtime": None, "version": version}


def expand(pattern: str, keep: Any) -> list[str]:
    """A file, every file below a directory that ``keep(path)`` accepts, or a glob; sorted URLs."""
    fs, inner = filesystem(pattern)
    with errors(pattern):
        if fs.isfile(inner):
            return [url(fs, inner)]
        if fs.isdir(inner):
            return sorted(url(fs, p) for p in fs.find(inner) if keep(p))
        found = sorted(url(fs, p) for p in fs.glob(inner) if fs.isfile(p))
        root = inner.split("/", 1)[0]
        if not found and protocol(pattern) in ("s3", "s3a", "gs", "gcs") and not fs.exists(root):
            raise ConfigError(f"input.path: the bucket {protocol(pattern)}://{root} of {pattern} does not exist, or "
                              f"these credentials cannot see it. Check the name and the credentials.")
        return found
