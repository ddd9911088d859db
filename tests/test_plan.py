import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardinfer.config import config_from_dict
from shardinfer.planning.plan import Plan, cut_units, describe, make_plan, segments_for, token_histogram


@given(costs=st.lists(st.integers(min_value=1, max_value=5000), max_size=400),
       target=st.integers(min_value=1, max_value=20000), max_rows=st.integers(min_value=1, max_value=64))
def test_cut_units_puts_every_row_in_exactly_one_unit(costs, target, max_rows):
    ranges = cut_units(costs, target, max_rows)
    covered = [i for a, b in ranges for i in range(a, b)]
    assert covered == list(range(len(costs)))
    for a, b in ranges:
        assert b - a >= 1 and b - a <= max_rows
        # a unit only goes over the target when a single row does
        assert sum(costs[a:b]) <= target or b - a == 1 or sum(costs[a:b - 1]) <= target
    assert cut_units(costs, target, max_rows) == ranges  # deterministic


@given(costs=st.lists(st.integers(min_value=1, max_value=300), min_size=50, max_size=400),
       workers=st.integers(min_value=1, max_value=8))
def test_units_are_balanced_by_cost_not_rows(costs, workers):
    target = max(1, sum(costs) // (workers * 8))
    ranges = cut_units(costs, target, 10_000)
    unit_costs = [sum(costs[a:b]) for a, b in ranges]
    # every unit but the last is within one row's cost of the target
    assert all(target - max(costs) < c <= target + max(costs) for c in unit_costs[:-1])


@given(sizes=st.lists(st.integers(min_value=0, max_value=30), min_size=1, max_size=8), data=st.data())
def test_segments_map_global_rows_onto_files(sizes, data):
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    total = offsets[-1]
    first = data.draw(st.integers(min_value=0, max_value=total))
    end = data.draw(st.integers(min_value=first, max_value=total))
    pieces = segments_for(first, end, offsets)
    rows = [offsets[f] + i for f, a, b in pieces for i in range(a, b)]
    assert rows == list(range(first, end))
    assert all(0 <= a < b <= sizes[f] for f, a, b in pieces)


def _write_corpus(tmp_path, lengths, files):
    per_file = -(-len(lengths) // files) if lengths else 0
    for f in range(files):
        chunk = lengths[f * per_file:(f + 1) * per_file]
        with open(tmp_path / f"part-{f:02d}.jsonl", "w") as fh:
            for i, n in enumerate(chunk):
                fh.write(json.dumps({"text": ("word " * n).strip() or None, "n": i}) + "\n")


def _cfg(tmp_path, **run):
    return config_from_dict({
        "input": {"path": str(tmp_path)},
        "model": {"path": str(tmp_path / "no-model"), "max_model_len": 600},
        "sampling": {"max_tokens": 50}, "run": run,
    })


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(min_value=0, max_value=900), min_size=1, max_size=120),
       files=st.integers(min_value=1, max_value=4), workers=st.integers(min_value=1, max_value=6))
def test_make_plan_assigns_every_row_once_for_many_sizes(tmp_path_factory, lengths, files, workers):
    tmp_path = tmp_path_factory.mktemp("corpus")
    files = min(files, len(lengths))
    _write_corpus(tmp_path, lengths, files)
    plan = make_plan(_cfg(tmp_path), workers)
    rows = [u.first_row + i for u in plan.units for i in range(u.rows)]
    assert rows == list(range(len(lengths)))
    assert plan.total_rows == len(lengths) == sum(f["rows"] for f in plan.files)
    for u in plan.units:
        assert sum(seg.rows for seg in u.segments) == u.rows
    assert [u.unit for u in plan.units] == list(range(len(plan.units)))
    again = make_plan(_cfg(tmp_path), workers)
    assert again.to_json() == plan.to_json()


def test_plan_round_trips_and_reports_limits_duplicates_and_problems(tmp_path):
    with open(tmp_path / "c.jsonl", "w") as fh:
        for i, n in enumerate([10, 3000, 0, 20, 20]):
            fh.write(json.dumps({"text": "word " * n, "id": "dup" if i >= 3 else f"r{i}"}) + "\n")
    cfg = config_from_dict({"input": {"path": str(tmp_path), "id_column": "id"},
                            "model": {"path": str(tmp_path / "m"), "max_model_len": 600},
                            "sampling": {"max_tokens": 50}})
    plan = make_plan(cfg, 2)
    assert plan.estimate.startswith("characters / 4")
    assert plan.over_limit == 1 and plan.over_limit_ids == ["r1"]
    assert plan.duplicates == {4: 3}
    assert plan.problem_rows == 1  # the empty text
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    text = describe(plan, cfg)
    assert "rows over the limit (estimated): 1" in text and "duplicate ids (later rows fail): 1" in text


def test_plan_uses_the_model_tokenizer_when_present(tmp_path, tiny_model):
    _write_corpus(tmp_path, [200, 300, 400], 1)
    cfg = config_from_dict({"input": {"path": str(tmp_path)}, "model": {"path": str(tiny_model)},
                            "sampling": {"max_tokens": 50}})
    plan = make_plan(cfg, 1)
    assert plan.estimate.startswith("tokenizer on a sample of 3 rows")
    assert plan.max_model_len == 8192  # from the model's config.json
    assert 0.5 < plan.chars_per_token < 10


def test_unit_tokens_and_max_unit_rows_bound_units(tmp_path):
    _write_corpus(tmp_path, [40] * 100, 1)
    plan = make_plan(_cfg(tmp_path, unit_tokens=1000, max_unit_rows=7), 1)
    assert all(u.rows <= 7 for u in plan.units)
    assert all(u.cost <= 1000 for u in plan.units)


def test_token_histogram_buckets():
    assert token_histogram([]) == []
    hist = dict(token_histogram([1, 63, 64, 200, 1000]))
    assert hist["0-63"] == 2 and hist["64-127"] == 1 and hist["128-255"] == 1 and hist["512-1023"] == 1


@pytest.mark.parametrize("workers", [1, 3])
def test_more_workers_mean_more_units(tmp_path, workers):
    _write_corpus(tmp_path, [40] * 300, 1)
    assert len(make_plan(_cfg(tmp_path), workers).units) >= 8 * workers


def test_id_hashes_match_equal_ids_and_tell_different_ones_apart():
    import numpy as np
    import pyarrow as pa

    from shardinfer.planning.plan import id_hashes

    ids = pa.array([f"doc-{i}" for i in range(50_000)] + ["", "é", "doc-7", "doc-10"])
    h1, h2 = id_hashes(ids)
    pairs = set(zip(h1.tolist(), h2.tolist()))
    assert len(pairs) == 50_002  # two repeats, everything else distinct
    assert (h1[50_002], h2[50_002]) == (h1[7], h2[7]) and (h1[50_003], h2[50_003]) == (h1[10], h2[10])
    sliced = id_hashes(ids.slice(5, 10))  # an array that starts inside its buffers
    assert np.array_equal(sliced[0], h1[5:15]) and np.array_equal(sliced[1], h2[5:15])
    assert len(set(h1.tolist())) > 50_000 - 2  # the first hash alone almost never collides


def test_duplicate_ids_across_files_point_at_the_first_row(tmp_path):
    for f, ids in enumerate([["a", "b", "a"], ["c", "b", "a"]]):
        with open(tmp_path / f"p{f}.jsonl", "w") as fh:
            for i in ids:
                fh.write(json.dumps({"text": f"row {i}", "id": i}) + "\n")
    cfg = config_from_dict({"input": {"path": str(tmp_path), "id_column": "id"},
                            "model": {"path": str(tmp_path / "m"), "max_model_len": 600},
                            "sampling": {"max_tokens": 50}})
    assert make_plan(cfg, 1).duplicates == {2: 0, 4: 1, 5: 0}


@pytest.mark.parametrize("indexed", [True, False])
def test_workers_read_only_their_units_from_every_format(tmp_path, monkeypatch, indexed):
    """Each unit read alone (a byte range, a row group, a gzip seek) gives the rows a whole read gives."""
    import csv
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from shardinfer.inputs import compressed
    from shardinfer.inputs.unit_reader import UnitReader

    if not indexed:
        monkeypatch.setattr(compressed, "gzip_indexing", lambda: False)
    records = [{"id": f"r{i}", "text": f"document {i} " + "word " * (i % 37), "n": i} for i in range(900)]
    records[100]["text"] = ""  # a bad row keeps its place
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(records[:300]), tmp_path / "in" / "a.parquet", row_group_size=64)
    with gzip.open(tmp_path / "in" / "b.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" + ("\n" if i % 50 == 0 else "") for i, r in enumerate(records[300:600]))
    with open(tmp_path / "in" / "c.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "text", "n"])
        writer.writeheader()
        writer.writerows({**r, "text": r["text"] + ("\nsecond line" if r["n"] % 7 == 0 else "")}
                         for r in records[600:])
    cfg = config_from_dict({"input": {"path": str(tmp_path / "in"), "id_column": "id", "passthrough": ["n"]},
                            "model": {"path": str(tmp_path / "m"), "max_model_len": 600},
                            "sampling": {"max_tokens": 50}, "run": {"unit_tokens": 300}})
    plan = make_plan(cfg, 2, index_dir=tmp_path / "index")
    assert len(plan.units) > 20
    assert (plan.files[1].get("gzip_index") is not None) == indexed
    assert any("gzipped" in note for note in plan.notes) != indexed
    reader = UnitReader(plan, cfg, tmp_path / "index")
    tables = [reader.read(u) for u in reversed(plan.units)]  # CSV's n is text, the others' a number
    read = pa.concat_tables([t.set_column(t.column_names.index("n"), "n", t.column("n").cast(pa.string()))
                             for t in tables]).sort_by("_row")
    assert read.column("_row").to_pylist() == list(range(900))
    assert read.column("_id").to_pylist() == [r["id"] for r in records]
    assert read.column("n").to_pylist() == [str(r["n"]) for r in records]
    forward = UnitReader(plan, cfg, tmp_path / "index")  # in order: Parquet reads go on where they stopped
    ahead = pa.concat_tables([t.set_column(t.column_names.index("n"), "n", t.column("n").cast(pa.string()))
                              for t in (forward.read(u) for u in plan.units)])
    assert ahead.equals(read.select(ahead.column_names))
    assert read.column("_problem").to_pylist()[100].startswith("empty_text")
    assert sum(p is not None for p in read.column("_problem").to_pylist()) == 1


def test_a_unit_deep_in_a_big_row_group_is_read_by_skipping_pages_with_the_files_own_types(tmp_path, monkeypatch):
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    from shardinfer.inputs import parquet_slice
    from shardinfer.inputs.unit_reader import UnitReader

    n = 30_000
    table = pa.table({"id": [f"r{i}" for i in range(n)], "text": [f"doc {i} " + "w " * (i % 13) for i in range(n)],
                      "tags": [[i % 3, i % 5] for i in range(n)],
                      "at": pa.array([datetime.datetime(2026, 1, 1) + datetime.timedelta(seconds=i) for i in range(n)]),
                      "note": [None if i % 4 else f"n{i}" for i in range(n)]})
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=n)  # one row group
    cfg = config_from_dict({"input": {"path": str(tmp_path / "big.parquet"), "id_column": "id",
                                      "passthrough": ["tags", "at", "note"]},
                            "model": {"path": str(tmp_path / "m"), "max_model_len": 600},
                            "sampling": {"max_tokens": 20}, "run": {"unit_tokens": 4000}})
    plan = make_plan(cfg, 2)
    deep = [u for u in plan.units if u.first_row > parquet_slice.DEEP_ROWS]
    assert len(deep) > 3
    sliced = []
    real_read_slice = parquet_slice.read_slice
    monkeypatch.setattr(parquet_slice, "read_slice", lambda *a: sliced.append(a[2]) or real_read_slice(*a))
    fast = [UnitReader(plan, cfg).read(u) for u in deep]  # each in a new reader: no cursor to go on from
    assert sliced == [u.first_row for u in deep]
    monkeypatch.setattr(parquet_slice, "DEEP_ROWS", 10**9)  # the same units decoded from the row group's start
    decoded = [UnitReader(plan, cfg).read(u) for u in deep]
    for got, want in zip(fast, decoded):
        assert got.schema == want.schema and got.equals(want)
    assert fast[-1].column("_id").to_pylist()[-1] == f"r{n - 1}"


def test_a_parquet_file_polars_cannot_read_falls_back_to_decoding(tmp_path, monkeypatch):
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shardinfer.inputs import parquet_slice

    pq.write_table(pa.table({"text": [f"t{i}" for i in range(100)]}), tmp_path / "a.parquet")

    def refuse(*_a, **_k):
        raise pl.exceptions.ComputeError("cannot read")

    monkeypatch.setattr(pl, "scan_parquet", refuse)
    schema = pa.schema([("text", pa.string())])
    assert parquet_slice.read_slice(str(tmp_path / "a.parquet"), schema, 50, 10) is None
    monkeypatch.undo()
    assert parquet_slice.read_slice(str(tmp_path / "a.parquet"), schema, 50, 10) is None  # not tried again
    parquet_slice._UNAVAILABLE.clear()
    assert parquet_slice.read_slice(str(tmp_path / "a.parquet"), schema, 50, 10).column("text").to_pylist() == \
        [f"t{i}" for i in range(50, 60)]


def test_a_deep_slice_is_read_from_a_path_with_glob_characters_and_a_hive_style_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shardinfer.inputs import parquet_slice

    (tmp_path / "year=2024").mkdir()
    path = tmp_path / "year=2024" / "part[1].parquet"
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(20_000)]}), path)
    table = parquet_slice.read_slice(str(path), pa.schema([("text", pa.string())]), 15_000, 3)
    assert table is not None and table.column_names == ["text"]
    assert table.column("text").to_pylist() == ["t15000", "t15001", "t15002"]


def _bad_corpus(root):
    """Files of every format whose rows fail in every way a reader knows, among good rows."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir()
    deep = b"[" * 100_000 + b"]" * 100_000
    lines = [b'{"text": "good 0", "id": "j0"}', b'{"text": "nul \x00 raw", "id": "j1"}', b"", b"   ",
             b'{"text": "escaped \\u0000 nul", "id": "j2"}', b'{"text": 5, "id": "j3"}', b'{"text": [1], "id": "j4"}',
             b'{"text": {"a": 1}, "id": "j5"}', b'{"text": true, "id": "j6"}', b"not json",
             b'{"text": "x", "id": "j7", "meta": ' + deep + b"}", deep, b'{"text": "2024-01-01", "id": "j8"}',
             b'{"text": "half \\ud800", "id": "j9"}', b'{"text": "good 1", "id": "j10"}']
    (root / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (root / "b-blank.jsonl").write_bytes(b"\n \n\t\n")
    (root / "c-empty.jsonl").write_bytes(b"")
    (root / "d-ints.jsonl").write_bytes(b"".join(b'{"text": %d, "id": "i%d"}\n' % (i, i) for i in range(5)))
    csv_body = (b'text,id\ngood,c0\n"open quote,c1\nnext,c2\n"multi\nline",c3\n"closed" then,c4\n'
                b'"a ""quoted"" word",c5\nmore,c6\n"open again,c7\nlast,c8\n')
    (root / "e.csv").write_bytes(csv_body)
    with gzip.open(root / "f.csv.gz", "wb") as fh:
        fh.write(csv_body)
    pq.write_table(pa.table({"text": pa.array([b"bytes", b"caf\xe9", None, b"ok"], pa.large_binary()),
                             "id": ["p0", "p1", "p2", "p3"]}), root / "g.parquet", row_group_size=2)
    pq.write_table(pa.table({"text": pa.array([1, 2, 3], pa.int64()), "id": ["q0", "q1", "q2"]}), root / "h.parquet")


@pytest.mark.parametrize("invalid_utf8", ["replace", "fail"])
def test_bad_rows_of_every_kind_plan_and_read_alike_unit_by_unit(tmp_path, invalid_utf8):
    """Each bad row gets its status at plan time and again when its unit is read alone, units of bad
    rows only included: the same rows, the same reasons, text typed as text."""
    import pyarrow as pa

    from shardinfer.inputs import reading
    from shardinfer.inputs.unit_reader import UnitReader

    _bad_corpus(tmp_path / "in")
    cfg = config_from_dict({"input": {"path": str(tmp_path / "in"), "id_column": "id", "invalid_utf8": invalid_utf8},
                            "model": {"path": str(tmp_path / "m"), "max_model_len": 600},
                            "sampling": {"max_tokens": 50}, "run": {"unit_tokens": 2}})
    plan = make_plan(cfg, 1)
    files = reading.input_files(cfg.input)
    whole = pa.concat_tables([t for t in (reading.read_table(f, cfg.input) for f in files) if t.num_rows],
                             promote_options="permissive")
    assert plan.total_rows == whole.num_rows == 13 + 5 + 2 * 9 + 4 + 3
    assert [f["rows"] for f in plan.files] == [13, 0, 0, 5, 9, 9, 4, 3]
    assert plan.problem_rows == sum(p is not None for p in whole.column("_problem").to_pylist())
    reader = UnitReader(plan, cfg)
    tables = [reader.read(u) for u in reversed(plan.units)]
    assert any(t.column("_problem").null_count == 0 for t in tables)  # units of bad rows only
    for t in tables:
        assert t.schema.field("_text").type == pa.string() and t.schema.field("_problem").type == pa.string()
        assert t.take([0]).num_rows == 1
    read = pa.concat_tables(tables, promote_options="permissive").sort_by("_row")
    assert read.column("_row").to_pylist() == list(range(plan.total_rows))
    assert read.column("_id").to_pylist() == whole.column("_id").to_pylist()
    assert read.column("_text").to_pylist() == whole.column("_text").to_pylist()

    def kind(problem):
        return None if problem is None else problem.split(":")[0]

    assert list(map(kind, read.column("_problem").to_pylist())) == list(map(kind, whole.column("_problem").to_pylist()))
    by_id = dict(zip(read.column("_id").to_pylist(), map(kind, read.column("_problem").to_pylist())))
    assert by_id["j0"] is None and by_id["j2"] is None and by_id["j8"] is None and by_id["j10"] is None
    assert [by_id[f"j{i}"] for i in range(3, 7)] == ["not_text"] * 4
    assert by_id.get("j9") is None and ("j9" in by_id) == (invalid_utf8 == "replace")  # failed: no id read
    assert {by_id[f"i{i}"] for i in range(5)} == {"not_text"} and {by_id[f"q{i}"] for i in range(3)} == {"not_text"}
    assert [by_id[f"c{i}"] for i in (0, 2, 3, 5, 6, 8)] == [None] * 6
    assert by_id["p1"] == (None if invalid_utf8 == "replace" else "invalid_utf8") and by_id["p0"] is None
    problems = read.column("_problem").to_pylist()
    assert sum(p is not None and p.startswith("bad_json: line 11 is nested") for p in problems) == 1
    assert sum(p is not None and p.startswith("bad_csv: line 3: a quoted field") for p in problems) == 2
    assert sum(p is not None and p.startswith("bad_json: line 2:") for p in problems) == 1  # the raw NUL
    assert sum(p is not None and p.startswith("invalid_utf8: line 14") for p in problems) == (invalid_utf8 == "fail")


@pytest.mark.parametrize("contents", [[b""], [b"\n\n\n"], [b" \n\t\n\r\n"], [b"\n", b"", b"  \n"]])
def test_a_corpus_of_blank_files_plans_no_units(tmp_path, contents):
    for i, content in enumerate(contents):
        (tmp_path / f"blank-{i}.jsonl").write_bytes(content)
    plan = make_plan(_cfg(tmp_path), 2)
    assert plan.total_rows == 0 and plan.units == [] and plan.problem_rows == 0
    assert "units: 0" in describe(plan, _cfg(tmp_path))


def test_a_huge_document_gives_the_tokenizer_its_beginning_only(tmp_path, monkeypatch):
    """Planning measures characters per token on a bounded sample: a document of tens of MB would
    cost the tokenizer gigabytes."""
    from shardinfer.planning import plan as plan_module

    seen = []

    def counter(_model):
        def count(texts):
            seen.extend(len(t) for t in texts)
            return [max(1, len(t) // 4) for t in texts]
        return count

    monkeypatch.setattr(plan_module, "token_counter", counter)
    with open(tmp_path / "big.jsonl", "w") as fh:
        fh.write(json.dumps({"text": "short one"}) + "\n")
        fh.write(json.dumps({"text": "word " * 1_000_000}) + "\n")  # 5 MB
        for i in range(2000):
            fh.write(json.dumps({"text": f"row {i} " + "x" * 300}) + "\n")
    plan = make_plan(_cfg(tmp_path), 1)
    assert plan.total_rows == 2002 and plan.estimate.startswith("tokenizer on a sample")
    assert seen and max(seen) <= 100_000 and sum(seen) <= plan_module._SAMPLE_CHARS
    assert plan.over_limit == 1 and plan.over_limit_ids == ["big.jsonl:1"]


def _edit_keeping_size_and_time(path, old: bytes, new: bytes) -> None:
    """An edit that `cp -p` or `rsync -t` would bring: same size, same modification time."""
    import os

    st = path.stat()
    data = path.read_bytes()
    assert len(old) == len(new) and data.count(old) >= 1  # Parquet also keeps it in the statistics
    path.write_bytes(data.replace(old, new))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_a_unit_read_after_its_input_was_edited_is_refused_naming_the_file_and_unit(tmp_path, fmt):
    import csv
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from shardinfer.errors import ConfigError
    from shardinfer.inputs.unit_reader import UnitReader

    records = [{"id": f"r{i}", "text": f"document {i:04d} " + "word " * 400} for i in range(3000)]
    path = tmp_path / f"docs.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif fmt == "csv":
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["id", "text"])
            writer.writeheader()
            writer.writerows(records)
    else:
        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=500, compression="none")
    cfg = config_from_dict({"input": {"path": str(path), "id_column": "id"},
                            "model": {"path": str(tmp_path / "m"), "max_model_len": 600},
                            "sampling": {"max_tokens": 50}, "run": {"unit_tokens": 60000}})
    plan = make_plan(cfg, 2, index_dir=tmp_path / "index")
    reader = UnitReader(plan, cfg, tmp_path / "index")
    assert reader.read(plan.units[0]).num_rows == plan.units[0].rows
    last = plan.units[-1]
    _edit_keeping_size_and_time(path, b"document 2999", b"document 9999")
    assert reader.read(plan.units[0]).num_rows == plan.units[0].rows  # a part far from the edit reads on
    with pytest.raises(ConfigError, match=rf"input file {path} \(read for unit {last.unit}\) changed since the run "
                                          rf"was planned: .* restore the file, or start a new run"):
        reader.read(last)
    _edit_keeping_size_and_time(path, b"document 9999", b"document 2999")
    assert reader.read(last).num_rows == last.rows
    with open(path, "ab") as fh:  # rows appended during the run
        fh.write(b"x" * 10)
    with pytest.raises(ConfigError, match="its size, modification time or version differ"):
        reader.read(plan.units[0])
    os.truncate(path, path.stat().st_size - 10)
