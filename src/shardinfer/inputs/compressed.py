"""Opening an input file at a byte offset of its uncompressed bytes.

Plain files seek. A local gzipped file seeks through a saved index (the optional indexed_gzip
package), built once when the run is planned; without one, and for other compressions (.zst, .bz2,
.xz), a file is decompressed from the start up to the offset.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO

from shardinfer.inputs import storage
from shardinfer.inputs.files import InputFile


def gzip_indexing() -> bool:
    """Whether gzipped input can be indexed (the optional indexed_gzip package)."""
    try:
        import indexed_gzip  # noqa: F401
    except ImportError:
        return False
    return True


def open_at(f: InputFile, offset: int, gz_index: Path | None) -> IO[bytes]:
    """The file's (uncompressed) bytes from ``offset``. A local gzipped file seeks through its saved
    index (indexed_gzip); other compressed files are decompressed from the start up to ``offset``."""
    if f.compression is None:
        return storage.open_bytes(f.path, offset)
    if f.gzip and f.local and gz_index is not None and gz_index.is_file() and gzip_indexing():
        import indexed_gzip

        indexed: IO[bytes] = indexed_gzip.IndexedGzipFile(str(f.path), index_file=str(gz_index))
        indexed.seek(offset)
        return indexed
    return storage.skip_to(storage.open_decompressed(f.path), offset)


def index_gzip(f: InputFile, out: Path) -> Path | None:
    """Build and save the seek index of a local gzipped file once (plan time); None without
    indexed_gzip."""
    if not f.gzip or not f.local or not gzip_indexing():
        return None
    import indexed_gzip

    with indexed_gzip.IndexedGzipFile(str(f.path), spacing=4 << 20) as fh:
        fh.build_full_index()
        out.parent.mkdir(parents=True, exist_ok=True)
        fh.export_index(str(out))
    return out
