"""Reading a work unit's rows from the input files (the plan says which rows of which files)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardinfer import corpus
from shardinfer.config import Config
from shardinfer.errors import RunError
from shardinfer.plan import Plan, Unit
from shardinfer.prompts import template_fields


@dataclass
class UnitRows:
    rows: list[int] = field(default_factory=list)  # global row indices
    ids: list[str] = field(default_factory=list)
    texts: list[Any] = field(default_factory=list)
    columns: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str | None] = field(default_factory=list)

    def subset(self, keep: set[int]) -> UnitRows:
        """The rows whose global index is in ``keep``, in order."""
        index = [i for i, r in enumerate(self.rows) if r in keep]
        return UnitRows(rows=[self.rows[i] for i in index], ids=[self.ids[i] for i in index],
                        texts=[self.texts[i] for i in index], columns=[self.columns[i] for i in index],
                        problems=[self.problems[i] for i in index])


class UnitReader:
    """Reads a unit's rows from the input files, keeping the last file in memory."""

    def __init__(self, plan: Plan, cfg: Config):
        self.plan = plan
        self.cfg = cfg
        self.extra = corpus.extra_columns(cfg.input, template_fields(cfg.prompt.user))
        self.offsets = [0]
        for f in plan.files:
            self.offsets.append(self.offsets[-1] + f["rows"])
        self._cached: tuple[int, corpus.Rows] | None = None

    def read(self, unit: Unit) -> UnitRows:
        out = UnitRows()
        for file_index, start, end in unit.segments:
            rows = self._file_rows(file_index)
            for i in range(start, end):
                out.rows.append(self.offsets[file_index] + i)
                out.ids.append(rows.ids[i])
                out.texts.append(rows.texts[i])
                out.columns.append({c: rows.columns[c][i] for c in self.extra})
                out.problems.append(rows.problems[i])
        return out

    def _file_rows(self, index: int) -> corpus.Rows:
        if self._cached is None or self._cached[0] != index:
            info = self.plan.files[index]
            path = Path(info["path"])
            check_unchanged(path, info)
            rows = corpus.read_rows(path, info["source"], self.cfg.input, self.extra)
            if len(rows) != info["rows"]:
                raise RunError(f"{path} now has {len(rows)} rows, the plan has {info['rows']}: "
                               f"the input changed since the run was planned. Start a new run.")
            self._cached = (index, rows)
        return self._cached[1]


def check_unchanged(path: Path, info: dict[str, Any]) -> None:
    if not path.is_file():
        raise RunError(f"input file {path} is gone since the run was planned")
    stat = path.stat()
    if stat.st_size != info["bytes"] or abs(stat.st_mtime - info["mtime"]) > 1e-3:
        raise RunError(f"input file {path} changed since the run was planned (size or mtime). "
                       f"Start a new run (another run.directory) to process the new data.")
