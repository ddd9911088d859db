"""The published result set: ``results`` is a link to one complete version in ``results.d/``.

A reduce writes its files into a new, hidden version directory, lists them with their row counts in
``_manifest.json`` and only then swings the ``results`` link over to it (a rename: atomic). A reader
of ``results/`` therefore sees the previous set or the new one, never a part of either, also when a
reduce is killed half way. Reduces of one run take turns under ``.results.lock``; the one that
publishes removes the versions before it. :func:`published_problem` checks what ``status`` reports as
finished.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from shardinfer.ledger.rundir import RunDir

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
VERSIONS = "results.d"
_UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


@contextmanager
def results_lock(run_dir: RunDir) -> Iterator[bool]:
    """Hold the run's results lock (waiting for another reduce to finish); yields whether the
    filesystem supports the lock (without it, reduces are not serialized but still publish whole)."""
    run_dir.path.mkdir(parents=True, exist_ok=True)
    with open(run_dir.results_lock, "a") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            log.info("the filesystem of %s has no file locks; reduces are not serialized", run_dir.path)
            yield False
            return
        yield True


def new_version(run_dir: RunDir) -> Path:
    """An empty, hidden directory for the files of a new result set."""
    root = run_dir.path / VERSIONS
    root.mkdir(parents=True, exist_ok=True)
    path = root / f".incomplete-{uuid.uuid4().hex[:12]}"
    path.mkdir()
    return path


def publish_version(run_dir: RunDir, version: Path, *, tidy: bool = True) -> Path:
    """Write the version's manifest, name it, and point ``results`` at it in one rename; then remove
    older versions (``tidy``: only under the results lock, when no other reduce writes)."""
    files = {p.name: pq.read_metadata(p).num_rows for p in sorted(version.glob("*.parquet"))}
    manifest = {"files": files, "rows": sum(files.values()), "published_at": time.time()}
    (version / MANIFEST).write_text(json.dumps(manifest, indent=1))
    final = version.with_name(f"v-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}")
    version.rename(final)
    _point_at(run_dir, final)
    if tidy:
        _remove_others(run_dir, final)
    return final


def _point_at(run_dir: RunDir, version: Path) -> None:
    link = run_dir.results
    if link.is_dir() and not link.is_symlink():  # a results directory of an older version of shardinfer
        link.rename(version.with_name(f".legacy-{uuid.uuid4().hex[:8]}"))
    tmp = link.with_name(f".results.link-{uuid.uuid4().hex[:8]}")
    os.symlink(os.path.relpath(version, link.parent), tmp)
    os.replace(tmp, link)


def _remove_others(run_dir: RunDir, keep: Path) -> None:
    for path in (run_dir.path / VERSIONS).iterdir():
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)
    for stale in (run_dir.path / ".results.tmp", *run_dir.path.glob(".results.link-*")):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def published_problem(run_dir: RunDir, expected_rows: int) -> str | None:
    """Why ``results/`` is not the run's complete result set, or None when it is: every file its
    manifest lists is there with its rows, and they add up to the run's rows."""
    results = run_dir.results
    if not results.is_dir():
        return f"{results} is missing"
    manifest_path = results / MANIFEST
    try:
        listed = json.loads(manifest_path.read_text())["files"] if manifest_path.is_file() else None
    except (ValueError, KeyError, OSError):
        return f"{manifest_path} is damaged"
    if listed is None:  # written by an older version: the files there are the set
        listed = {p.name: None for p in results.glob("part-*.parquet")}
    total = 0
    for name, rows in listed.items():
        try:
            found = pq.read_metadata(results / name).num_rows
        except (OSError, pa.ArrowInvalid):
            return f"{results / name} is missing or unreadable"
        if rows is not None and found != rows:
            return f"{results / name} holds {found} rows, its manifest says {rows}"
        total += found
    if total != expected_rows:
        return f"{results} holds {total} rows for {expected_rows} input rows"
    return None
