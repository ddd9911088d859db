"""The plan's records: the work units, where each unit's rows are in the input files, and the
input files themselves, as saved in ``plan.json`` and loaded back, checked field by field, by every
process of a run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Annotated, Any

from pydantic import BeforeValidator, TypeAdapter, ValidationError

from shardinfer.errors import RunError
from shardinfer.records import describe_errors


@dataclass
class Segment:
    """A unit's rows in one file, and where they start: byte offsets (and the line number) for
    JSONL and CSV, row group and offset into it for Parquet; None in plans made before positions."""

    file: int
    start: int  # first row, counted within the file
    end: int  # row after the last
    begin: int | None = None  # byte offset of the first row (uncompressed, for gzip)
    stop: int | None = None  # byte offset after the last row
    line: int | None = None  # line number of the first row
    row_group: int | None = None
    group_offset: int | None = None

    @property
    def rows(self) -> int:
        return self.end - self.start

    def to_json(self) -> list[Any]:
        if self.row_group is not None:
            return [self.file, self.start, self.end, "rg", self.row_group, self.group_offset]
        if self.begin is not None:
            return [self.file, self.start, self.end, self.begin, self.stop, self.line]
        return [self.file, self.start, self.end]

    @classmethod
    def from_json(cls, data: Sequence[Any]) -> Segment:
        """A segment as plan.json keeps it, checked (ValidationError)."""
        return _segment_adapter().validate_python(data)


def _segment_fields(data: Any) -> Any:
    """A segment's compact list, ``[file, start, end]`` with ``begin, stop, line`` or ``"rg", row_group,
    group_offset`` after it, as its fields by name (pydantic then checks their types)."""
    if not isinstance(data, (list, tuple)):
        return data  # a Segment, or what pydantic names as wrong
    if len(data) == 3:
        return {"file": data[0], "start": data[1], "end": data[2]}
    if len(data) == 6 and data[3] == "rg":
        return {"file": data[0], "start": data[1], "end": data[2], "row_group": data[4], "group_offset": data[5]}
    if len(data) == 6:
        return {"file": data[0], "start": data[1], "end": data[2], "begin": data[3], "stop": data[4], "line": data[5]}
    raise ValueError("expected [file, start, end], optionally followed by 3 positions")


def _pairs(data: Any) -> Any:
    """Duplicates as plan.json keeps them, ``[[row, first row], ...]``, as a dict."""
    if isinstance(data, list) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in data):
        try:
            return dict(data)
        except TypeError:  # a key that is a list or an object: pydantic names the field
            pass
    return data


@cache
def _segment_adapter() -> TypeAdapter[Segment]:
    return TypeAdapter(Annotated[Segment, BeforeValidator(_segment_fields)])


@dataclass
class Unit:
    unit: int
    first_row: int  # global index of the unit's first row
    rows: int
    cost: int
    segments: list[Annotated[Segment, BeforeValidator(_segment_fields)]]


@dataclass
class Plan:
    files: list[dict[str, Any]]
    total_rows: int
    units: list[Unit]
    max_model_len: int
    prompt_limit: int
    chars_per_token: float
    estimate: str
    # global row -> first row with that id
    duplicates: Annotated[dict[int, int], BeforeValidator(_pairs)] = field(default_factory=dict)
    histogram: list[tuple[str, int]] = field(default_factory=list)
    over_limit: int = 0
    over_limit_ids: list[str] = field(default_factory=list)
    problem_rows: int = 0
    replaced_utf8: int = 0  # rows whose invalid UTF-8 bytes were replaced with U+FFFD
    notes: list[str] = field(default_factory=list)  # what the user should know about reading the input
    prompt_tokens: int = 0  # estimated prompt tokens of the rows that run (over-long rows at the limit)
    output_tokens: int = 0  # the most output tokens those rows may ask for (max_tokens each)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["units"] = [{**asdict(u), "segments": [s.to_json() for s in u.segments]} for u in self.units]
        data["duplicates"] = [[k, v] for k, v in sorted(self.duplicates.items())]
        return data

    @classmethod
    def from_json(cls, data: Any, where: str = "plan.json") -> Plan:
        """The plan saved in ``where``, checked: a field of the wrong type, missing or out of range
        (a damaged or foreign file) is a :class:`RunError` naming it. Fields unknown to this
        version are ignored; those added since a run was planned take their defaults."""
        try:
            plan = _plan_adapter().validate_python(data)
        except ValidationError as exc:
            raise _damaged(where, describe_errors(exc)) from None
        problem = _inconsistency(plan)
        if problem:
            raise _damaged(where, problem)
        return plan


@cache
def _plan_adapter() -> TypeAdapter[Plan]:
    return TypeAdapter(Plan)


def _damaged(where: str, problem: str) -> RunError:
    return RunError(f"{where} cannot be read as a plan (damaged, foreign, or of another shardinfer version): "
                    f"{problem}. Restore the file, or start the run anew in another directory (run.directory=NEW_DIR)")


def _inconsistency(plan: Plan) -> str | None:
    """What in a plan of well-typed fields cannot be: units out of order, rows outside their files."""
    files = []
    for i, info in enumerate(plan.files):
        for key, kind in (("path", str), ("source", str), ("rows", int)):
            if not isinstance(info.get(key), kind):
                return f"files[{i}].{key}: {'missing' if key not in info else f'found {info[key]!r}'}"
        files.append(info["rows"])
    for i, u in enumerate(plan.units):
        if u.unit != i:
            return f"units[{i}].unit: {u.unit}, not its place in the list"
        rows = 0
        for j, seg in enumerate(u.segments):
            if not (0 <= seg.file < len(files) and 0 <= seg.start <= seg.end <= files[seg.file]):
                return (f"units[{i}].segments[{j}]: rows {seg.start}-{seg.end} of file {seg.file}, which is not "
                        f"among the {len(files)} file(s) or has fewer rows")
            rows += seg.rows
        if rows != u.rows:
            return f"units[{i}].rows: {u.rows}, but its segments hold {rows}"
    return None
