import csv
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardinfer import corpus
from shardinfer.config import InputConfig
from shardinfer.errors import ConfigError

RECORDS = [{"doc": f"text number {i}", "key": f"k{i}", "lang": "en" if i % 2 else "fr"} for i in range(5)]


def cfg(path, **kw):
    return InputConfig(path=str(path), text_column="doc", **kw)


def write_all_formats(tmp_path):
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "a.parquet")
    with open(tmp_path / "b.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in RECORDS)
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in RECORDS)
    with open(tmp_path / "d.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["doc", "key", "lang"])
        writer.writeheader()
        writer.writerows(RECORDS)


def test_every_format_reads_the_same_rows(tmp_path):
    write_all_formats(tmp_path)
    c = cfg(tmp_path, id_column="key", passthrough=["lang"])
    files = corpus.resolve_files(c)
    assert [f.name for f in files] == ["a.parquet", "b.jsonl", "c.jsonl.gz", "d.csv"]
    for f in files:
        rows = corpus.read_rows(f, f.name, c, ["lang"])
        assert rows.texts == [r["doc"] for r in RECORDS], f
        assert rows.ids == [r["key"] for r in RECORDS]
        assert rows.columns["lang"] == [r["lang"] for r in RECORDS]
        assert rows.problems == [None] * 5


def test_default_ids_are_stable_file_and_row(tmp_path):
    write_all_formats(tmp_path)
    c = cfg(tmp_path / "*.jsonl*")
    files = corpus.resolve_files(c)
    names = corpus.source_names(files)
    assert names == ["b.jsonl", "c.jsonl.gz"]
    rows = corpus.read_rows(files[1], names[1], c, [])
    assert rows.ids == [f"c.jsonl.gz:{i}" for i in range(5)]


def test_directory_names_are_relative_to_the_common_root(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    for sub in ("x", "y"):
        (tmp_path / sub / "p.jsonl").write_text(json.dumps({"doc": "t"}) + "\n")
    files = corpus.resolve_files(cfg(tmp_path))
    assert corpus.source_names(files) == ["x/p.jsonl", "y/p.jsonl"]


def test_no_matching_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="matches no input file"):
        corpus.resolve_files(cfg(tmp_path / "missing" / "*.parquet"))


def test_unknown_suffix_asks_for_the_format(tmp_path):
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(ConfigError, match="Set input.format"):
        corpus.resolve_files(cfg(tmp_path / "data.txt"))
    assert corpus.resolve_files(cfg(tmp_path / "data.txt", format="jsonl"))


@pytest.mark.parametrize("suffix", ["parquet", "jsonl", "csv"])
def test_missing_text_column_is_a_config_error_naming_found_columns(tmp_path, suffix):
    write_all_formats(tmp_path)
    path = next(tmp_path.glob(f"*.{suffix}"))
    c = InputConfig(path=str(path), text_column="body")
    with pytest.raises(ConfigError) as err:
        corpus.check_columns([path], c, [])
    assert "input.text_column: column 'body'" in str(err.value)
    assert "doc, key, lang" in str(err.value)


def test_template_column_missing_is_a_config_error(tmp_path):
    write_all_formats(tmp_path)
    path = tmp_path / "a.parquet"
    with pytest.raises(ConfigError, match="prompt.user: column 'title'"):
        corpus.check_columns([path], cfg(path), ["text", "title"])


def test_bad_jsonl_rows_are_kept_with_a_problem(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [
        b'{"doc": "fine"}',
        b'{"doc": "broken json',
        b'[1, 2]',
        b'',
        b'{"doc": "caf\xe9 latin-1"}',
        b'{"doc": null}',
        b'{"doc": 42}',
        b'{"other": "no doc"}',
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    rows = corpus.read_rows(path, "bad.jsonl", cfg(path), [])
    assert len(rows) == 7  # the blank line is not a row; every other line is
    assert rows.problems[0] is None
    assert rows.problems[1].startswith("bad_json: line 2")
    assert rows.problems[2].startswith("bad_json: line 3 is a JSON list")
    assert rows.problems[3] is None and rows.texts[3] == "caf\ufffd latin-1" and rows.replaced_utf8 == 1
    assert [corpus.text_problem(t, "doc") for t in rows.texts[4:]] == [
        "empty_text: 'doc' is null or missing", "not_text: 'doc' holds a int, not a string",
        "empty_text: 'doc' is null or missing"]


def test_invalid_utf8_can_fail_the_row_instead(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"doc": "ok"}\n{"doc": "caf\xe9"}\n')
    rows = corpus.read_rows(path, "bad.jsonl", cfg(path, invalid_utf8="fail"), [])
    assert rows.problems[0] is None
    assert rows.problems[1].startswith("invalid_utf8: line 2")


def test_bad_csv_rows_are_kept_with_a_problem(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"doc,key\nhello,a\ntoo,many,fields\ncaf\xe9,c\n\"multi\nline\",d\n")
    rows = corpus.read_rows(path, "bad.csv", cfg(path, id_column="key"), [])
    assert rows.texts[0] == "hello" and rows.problems[0] is None
    assert rows.problems[1].startswith("bad_csv: line 3 has 3 fields, the header has 2")
    assert rows.texts[2] == "caf\ufffd" and rows.replaced_utf8 == 1
    assert rows.texts[3] == "multi\nline" and rows.ids[3] == "d"


def test_missing_id_falls_back_and_fails_the_row(tmp_path):
    path = tmp_path / "ids.jsonl"
    path.write_text('{"doc": "a", "key": "x"}\n{"doc": "b"}\n{"doc": "c", "key": 7}\n')
    rows = corpus.read_rows(path, "ids.jsonl", cfg(path, id_column="key"), [])
    assert rows.ids == ["x", "ids.jsonl:1", "7"]
    assert rows.problems[1].startswith("missing_id: column 'key' is empty")


@pytest.mark.parametrize("value,reason", [(None, "empty_text"), ("", "empty_text"), ("  \n", "empty_text"),
                                          (3.5, "not_text"), (["a"], "not_text"), ({"a": 1}, "not_text")])
def test_text_problems(value, reason):
    assert corpus.text_problem(value, "doc").startswith(reason)
    assert corpus.text_problem("real text", "doc") is None


def test_byte_order_marks_and_huge_csv_fields(tmp_path):
    big = "x" * 300_000  # over the csv module's default field limit
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfdoc,key\n" + f"{big},a\nsmall,b\n".encode())
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"doc": "first"}\n{"doc": "second"}\n')
    for name in ("bom.csv", "bom.jsonl"):
        path = tmp_path / name
        c = cfg(path)
        corpus.check_columns([path], c, [])
        rows = corpus.read_rows(path, name, c, [])
        assert rows.problems == [None, None], name
    assert corpus.read_rows(tmp_path / "bom.csv", "bom.csv", cfg(tmp_path / "bom.csv"), []).texts[0] == big

