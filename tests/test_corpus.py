import csv
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardinfer import corpus
from shardinfer.config import InputConfig
from shardinfer.errors import ConfigError

RECORDS = [{"doc": f"text number {i}", "key": f"k{i}", "lang": "en" if i % 2 else "fr"} for i in range(5)]


def cfg(path, **kw):
    return InputConfig(path=str(path), text_column="doc", **kw)


def read(path, c, extra=()):
    """A whole file through the readers: (table, stats)."""
    stats = corpus.ReadStats()
    path = Path(path)
    source = corpus.InputFile(str(path), path.name, corpus.file_format(path, c.format),
                              ".gz" if path.suffix == ".gz" else None)
    return corpus.read_table(source, c, list(extra), stats), stats


def col(table, name):
    return table.column(name).to_pylist()


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
    assert [Path(f).name for f in files] == ["a.parquet", "b.jsonl", "c.jsonl.gz", "d.csv"]
    for f in files:
        table, _ = read(f, c, ["lang"])
        assert col(table, "_text") == [r["doc"] for r in RECORDS], f
        assert col(table, "_id") == [r["key"] for r in RECORDS]
        assert col(table, "lang") == [r["lang"] for r in RECORDS]
        assert col(table, "_problem") == [None] * 5


def test_default_ids_are_stable_file_and_row(tmp_path):
    write_all_formats(tmp_path)
    c = cfg(tmp_path / "*.jsonl*")
    files = corpus.resolve_files(c)
    names = corpus.source_names(files)
    assert names == ["b.jsonl", "c.jsonl.gz"]
    table, _ = read(files[1], c)
    assert corpus.row_ids(table, names[1], 0).to_pylist() == [f"c.jsonl.gz:{i}" for i in range(5)]


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
        corpus.check_columns([path], cfg(path), [("prompt.user", "text"), ("prompt.user", "title")])


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
    table, stats = read(path, cfg(path))
    problems, texts = col(table, "_problem"), col(table, "_text")
    assert table.num_rows == 7  # the blank line is not a row; every other line is
    assert problems[0] is None
    assert problems[1].startswith("bad_json: line 2")
    assert problems[2].startswith("bad_json: line 3 is a JSON list")
    assert problems[3] is None and texts[3] == "caf\ufffd latin-1" and stats.replaced_utf8 == 1
    assert problems[4:] == ["empty_text: 'doc' is null or missing", "not_text: 'doc' holds a int, not a string",
                            "empty_text: 'doc' is null or missing"]
    assert col(table, "_line") == [1, 2, 3, 5, 6, 7, 8]


def test_invalid_utf8_can_fail_the_row_instead(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"doc": "ok"}\n{"doc": "caf\xe9"}\n')
    table, _ = read(path, cfg(path, invalid_utf8="fail"))
    assert col(table, "_problem")[0] is None
    assert col(table, "_problem")[1].startswith("invalid_utf8: line 2")


def test_bad_csv_rows_are_kept_with_a_problem(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"doc,key\nhello,a\ntoo,many,fields\ncaf\xe9,c\n\"multi\nline\",d\n")
    table, stats = read(path, cfg(path, id_column="key"))
    texts, problems = col(table, "_text"), col(table, "_problem")
    assert texts[0] == "hello" and problems[0] is None
    assert problems[1].startswith("bad_csv: line 3 has 3 fields, the header has 2")
    assert texts[2] == "caf\ufffd" and stats.replaced_utf8 == 1
    assert texts[3] == "multi\nline" and col(table, "_id")[3] == "d"


def test_missing_id_falls_back_and_fails_the_row(tmp_path):
    path = tmp_path / "ids.jsonl"
    path.write_text('{"doc": "a", "key": "x"}\n{"doc": "b"}\n{"doc": "c", "key": 7}\n')
    table, _ = read(path, cfg(path, id_column="key"))
    assert col(table, "_id") == ["x", "ids.jsonl:1", "7"]
    assert col(table, "_problem")[1].startswith("missing_id: column 'key' is empty")


@pytest.mark.parametrize("value,reason", [(None, "empty_text"), ("", "empty_text"), ("  \n", "empty_text"),
                                          (3.5, "not_text"), (["a"], "not_text"), ({"a": 1}, "not_text")])
def test_text_problems(value, reason):
    assert corpus.text_problem(value, "doc").startswith(reason)
    assert corpus.text_problem("real text", "doc") is None
    column = pa.array([value, "real text"] if value is None or isinstance(value, str) else [value])
    _, problems, _ = corpus.text_problems(column, "doc")  # the same rules on a whole column
    assert problems[0].as_py().startswith(reason) and problems[1:].to_pylist() in ([], [None])


def test_byte_order_marks_and_huge_csv_fields(tmp_path):
    big = "x" * 300_000  # over the csv module's default field limit
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfdoc,key\n" + f"{big},a\nsmall,b\n".encode())
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"doc": "first"}\n{"doc": "second"}\n')
    for name in ("bom.csv", "bom.jsonl"):
        path = tmp_path / name
        c = cfg(path)
        corpus.check_columns([path], c, [])
        table, _ = read(path, c)
        assert col(table, "_problem") == [None, None], name
    assert col(read(tmp_path / "bom.csv", cfg(tmp_path / "bom.csv"))[0], "_text")[0] == big

