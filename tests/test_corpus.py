import csv
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardinfer.config import InputConfig
from shardinfer.errors import ConfigError
from shardinfer.inputs import csv as csv_reader
from shardinfer.inputs import jsonl, reading

RECORDS = [{"doc": f"text number {i}", "key": f"k{i}", "lang": "en" if i % 2 else "fr"} for i in range(5)]


def cfg(path, **kw):
    return InputConfig(path=str(path), text_column="doc", **kw)


def read(path, c, extra=()):
    """A whole file through the readers: (table, stats)."""
    stats = reading.ReadStats()
    path = Path(path)
    source = reading.InputFile(str(path), path.name, reading.file_format(path, c.format),
                              ".gz" if path.suffix == ".gz" else None)
    return reading.read_table(source, c, list(extra), stats), stats


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
    files = reading.resolve_files(c)
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
    files = reading.resolve_files(c)
    names = reading.source_names(files)
    assert names == ["b.jsonl", "c.jsonl.gz"]
    table, _ = read(files[1], c)
    assert reading.row_ids(table, names[1], 0).to_pylist() == [f"c.jsonl.gz:{i}" for i in range(5)]


def test_directory_names_are_relative_to_the_common_root(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    for sub in ("x", "y"):
        (tmp_path / sub / "p.jsonl").write_text(json.dumps({"doc": "t"}) + "\n")
    files = reading.resolve_files(cfg(tmp_path))
    assert reading.source_names(files) == ["x/p.jsonl", "y/p.jsonl"]


def test_no_matching_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="matches no input file"):
        reading.resolve_files(cfg(tmp_path / "missing" / "*.parquet"))


def test_unknown_suffix_asks_for_the_format(tmp_path):
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(ConfigError, match="Set input.format"):
        reading.resolve_files(cfg(tmp_path / "data.txt"))
    assert reading.resolve_files(cfg(tmp_path / "data.txt", format="jsonl"))


@pytest.mark.parametrize("suffix", ["parquet", "jsonl", "csv"])
def test_missing_text_column_is_a_config_error_naming_found_columns(tmp_path, suffix):
    write_all_formats(tmp_path)
    path = next(tmp_path.glob(f"*.{suffix}"))
    c = InputConfig(path=str(path), text_column="body")
    with pytest.raises(ConfigError) as err:
        reading.check_columns([path], c, [])
    assert "input.text_column: column 'body'" in str(err.value)
    assert "doc, key, lang" in str(err.value)


def test_template_column_missing_is_a_config_error(tmp_path):
    write_all_formats(tmp_path)
    path = tmp_path / "a.parquet"
    with pytest.raises(ConfigError, match="prompt.user: column 'title'"):
        reading.check_columns([path], cfg(path), [("prompt.user", "text"), ("prompt.user", "title")])


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
    assert reading.text_problem(value, "doc").startswith(reason)
    assert reading.text_problem("real text", "doc") is None
    column = pa.array([value, "real text"] if value is None or isinstance(value, str) else [value])
    _, problems, _ = reading.text_problems(column, "doc")  # the same rules on a whole column
    assert problems[0].as_py().startswith(reason) and problems[1:].to_pylist() in ([], [None])


def test_byte_order_marks_and_huge_csv_fields(tmp_path):
    big = "x" * 300_000  # over the csv module's default field limit
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfdoc,key\n" + f"{big},a\nsmall,b\n".encode())
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"doc": "first"}\n{"doc": "second"}\n')
    for name in ("bom.csv", "bom.jsonl"):
        path = tmp_path / name
        c = cfg(path)
        reading.check_columns([path], c, [])
        table, _ = read(path, c)
        assert col(table, "_problem") == [None, None], name
    assert col(read(tmp_path / "bom.csv", cfg(tmp_path / "bom.csv"))[0], "_text")[0] == big



def rows_read_alone(path, c, table):
    """Every row of a scanned text file read again alone from its byte range, as a worker reads a
    unit: (texts, problems)."""
    path = Path(path)
    f = reading.InputFile(str(path), path.name, reading.file_format(path, c.format))
    cols = reading.columns_for(c, [], with_extra=False)
    offsets, lines = col(table, "_offset"), col(table, "_line")
    ends = offsets[1:] + [path.stat().st_size]
    tables = [reading.read_range(f, cols, c.invalid_utf8, i, 1, offsets[i], ends[i], lines[i])
              for i in range(table.num_rows)]
    assert all(t.num_rows == 1 for t in tables)
    return [t.column("_text")[0].as_py() for t in tables], [t.column("_problem")[0].as_py() for t in tables]


def reason(problem):
    """A problem without its details in parentheses (a worker's byte range may end a broken record
    sooner than the whole file does)."""
    return None if problem is None else problem.split(" (")[0]


def test_nul_bytes_in_jsonl_lines_fail_their_row_and_escaped_nul_is_text(tmp_path):
    path = tmp_path / "nul.jsonl"
    lines = [b'{"doc": "raw \x00 in a string"}', b'{"doc": "after"}\x00', b'\x00{"doc": "before"}', b'\x00\x00',
             b'{"doc": "escaped \\u0000 nul"}', b'{"doc": "fine"}']
    path.write_bytes(b"\n".join(lines) + b"\n")
    c = cfg(path)
    reading.check_columns([path], c, [])
    table, _ = read(path, c)
    problems = col(table, "_problem")
    assert [p.split(":")[0] for p in problems[:4]] == ["bad_json"] * 4
    assert [p.split(":")[1] for p in problems[:4]] == [" line 1", " line 2", " line 3", " line 4"]
    assert col(table, "_text")[4:] == ["escaped \x00 nul", "fine"] and problems[4:] == [None, None]
    alone_texts, alone_problems = rows_read_alone(path, c, table)
    assert alone_problems == problems and alone_texts == col(table, "_text")
    # a block Arrow's parser takes whole (only valid lines) keeps the escaped NUL as well
    (tmp_path / "ok.jsonl").write_bytes(b'{"doc": "a\\u0000b"}\n{"doc": "c"}\n')
    assert col(read(tmp_path / "ok.jsonl", cfg(tmp_path / "ok.jsonl"))[0], "_text") == ["a\x00b", "c"]


@pytest.mark.parametrize("values,kind", [
    (["1", "2"], "int"),  # Arrow parses the block: an int64 column
    (["1.5", "2"], "float"),
    (["true", "false"], "bool"),
    (["[1, 2]", "[3]"], "list"),
    (['{"a": 1}', '{"a": 2}'], "dict"),
    (['"text"', "1", "[1]", '{"a": 1}', "false", "2.5"], None),  # Arrow refuses the block: line by line
])
def test_text_of_another_type_is_not_text_row_by_row(tmp_path, values, kind):
    path = tmp_path / "types.jsonl"
    path.write_text("".join(f'{{"doc": {v}, "key": "k{i}"}}\n' for i, v in enumerate(values)))
    c = cfg(path, id_column="key")
    table, _ = read(path, c)
    problems = col(table, "_problem")
    expected = [None if v.startswith('"') else "not_text" for v in values]
    assert [p and p.split(":")[0] for p in problems] == expected
    if kind:
        assert all(f"holds a {kind}, not a string" in p for p in problems)
    assert col(table, "_id") == [f"k{i}" for i in range(len(values))]
    assert table.schema.field("_text").type == pa.string()
    assert [p and p.split(":")[0] for p in rows_read_alone(path, c, table)[1]] == expected


def test_text_that_looks_like_a_date_stays_text(tmp_path):
    """Arrow's JSON parser takes strings that look like dates for timestamps."""
    path = tmp_path / "dates.jsonl"
    path.write_text('{"doc": "2024-01-01", "key": "2024-05-06 07:08:09", "lang": "1999-12-31"}\n'
                    '{"doc": "2024-01-02T10:00:00", "key": "2024-05-07", "lang": "2000-01-01"}\n')
    table, _ = read(path, cfg(path, id_column="key"), ["lang"])
    assert col(table, "_problem") == [None, None]
    assert col(table, "_text") == ["2024-01-01", "2024-01-02T10:00:00"]
    assert col(table, "_id") == ["2024-05-06 07:08:09", "2024-05-07"]
    assert col(table, "lang") == ["1999-12-31", "2000-01-01"]


def test_lone_surrogate_escapes_are_replaced_or_fail_the_row(tmp_path):
    path = tmp_path / "surrogates.jsonl"
    path.write_bytes(b'{"doc": "half \\ud800 a pair", "key": "a\\udfff"}\n{"doc": "a pair \\ud83d\\ude00"}\n'
                     b'not json\n')
    table, stats = read(path, cfg(path, id_column="key"))
    assert col(table, "_text")[:2] == ["half \ufffd a pair", "a pair \U0001F600"]
    assert col(table, "_id")[0] == "a\ufffd" and stats.replaced_utf8 == 1
    table, _ = read(path, cfg(path, invalid_utf8="fail"))
    assert col(table, "_problem")[0].startswith("invalid_utf8: line 1")
    assert col(table, "_problem")[1] is None and col(table, "_problem")[2].startswith("bad_json: line 3")


def test_a_quote_left_open_in_csv_fails_its_line_alone(tmp_path):
    path = tmp_path / "quotes.csv"
    path.write_bytes(b'doc,key\n'
                     b'fine,a\n'
                     b'"multi\nline",b\n'
                     b'"open quote,c\n'  # never closed: it would swallow every line after it
                     b'next,d\n'
                     b'"closed" then text,e\n'  # a quote inside a quoted field must be doubled
                     b'"spans\n"x,f\n'  # closed on the next line, then text: not a record either
                     b'"doubled ""quotes""",g\n'
                     b'last,h\n'
                     b'"open at the end,i\n'
                     b'and more,j')
    c = cfg(path, id_column="key")
    table, _ = read(path, c)
    texts, problems, ids = col(table, "_text"), col(table, "_problem"), col(table, "_id")
    assert col(table, "_line") == [2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13]  # every line but the record's second
    assert ids == ["a", "b", "quotes.csv:2", "d", "quotes.csv:4", "quotes.csv:5", "quotes.csv:6", "g", "h",
                   "quotes.csv:9", "j"]
    assert texts[:2] == ["fine", "multi\nline"] and texts[3] == "next" and texts[7:9] == ['doubled "quotes"', "last"]
    open_quote = "a quoted field that starts on this line is not closed properly"
    assert problems[2].startswith(f"bad_csv: line 5: {open_quote}")  # closed by line 7's quote, then text
    assert problems[4] == "bad_csv: line 7: ',' expected after '\"'"
    assert problems[5].startswith(f"bad_csv: line 8: {open_quote}")
    assert problems[6].startswith(f"bad_csv: line 9: {open_quote}")  # '"x,f' opens a quote of its own
    assert problems[9] == f"bad_csv: line 12: {open_quote} (unexpected end of data); the lines after it are " \
                          "read as rows of their own"
    assert texts[10] == "and more" and problems[10] is None
    assert [p is None for p in problems] == [t is not None for t in texts]
    alone_texts, alone_problems = rows_read_alone(path, c, table)
    assert list(map(reason, alone_problems)) == list(map(reason, problems))
    assert [t for t, p in zip(alone_texts, alone_problems) if p is None] == [t for t, p in zip(texts, problems) if p is None]


def test_a_long_broken_csv_record_is_read_again_from_the_file(tmp_path, monkeypatch):
    """Past the CSV reader's _REPLAY_BYTES the lines after a broken record's first line are read again from the
    file (gzipped too), not from memory."""
    body = b'doc,key\nfine,a\n"open,b\n' + b"".join(b"row %d,k%d\n" % (i, i) for i in range(200))
    (tmp_path / "long.csv").write_bytes(body)
    with gzip.open(tmp_path / "long.csv.gz", "wb") as fh:
        fh.write(body)
    expected = None
    for replay in (1 << 20, 64):
        monkeypatch.setattr(csv_reader, "_REPLAY_BYTES", replay)
        for name in ("long.csv", "long.csv.gz"):
            table, stats = read(tmp_path / name, cfg(tmp_path / name, id_column="key"))
            got = (col(table, "_text"), list(map(reason, col(table, "_problem"))), col(table, "_offset"))
            assert table.num_rows == 202 and got[0][2:] == [f"row {i}" for i in range(200)]
            assert stats.bytes_read == len(body)
            expected = expected or got
            assert got == expected, (replay, name)
        c = cfg(tmp_path / "long.csv", id_column="key")
        table, _ = read(tmp_path / "long.csv", c)
        assert rows_read_alone(tmp_path / "long.csv", c, table)[0][2:5] == ["row 0", "row 1", "row 2"]
        f = reading.InputFile(str(tmp_path / "long.csv"), "long.csv", "csv")  # a worker's unit of all rows
        unit = reading.read_range(f, reading.columns_for(c, []), "replace", 0, 202, 8, len(body), 2)
        assert unit.column("_text").to_pylist() == col(table, "_text")


@pytest.mark.parametrize("binary", [pa.binary(), pa.large_binary()])
def test_parquet_binary_text_is_decoded_as_utf8(tmp_path, binary):
    path = tmp_path / "bin.parquet"
    docs = [b"plain", "caf\u00e9".encode(), b"caf\xe9 latin-1", None, b"  "]
    pq.write_table(pa.table({"doc": pa.array(docs, binary), "key": pa.array([b"a", b"b", b"\xff", b"d", b"e"])}), path)
    table, stats = read(path, cfg(path, id_column="key"))
    assert col(table, "_text")[:3] == ["plain", "caf\u00e9", "caf\ufffd latin-1"] and stats.replaced_utf8 == 1
    problems = col(table, "_problem")
    assert problems[:3] == [None, None, None] and problems[3].startswith("empty_text") and problems[4].startswith("empty_text")
    assert col(table, "_id")[2] == "\ufffd"
    assert table.schema.field("_text").type == pa.string()
    table, _ = read(path, cfg(path, invalid_utf8="fail"))
    assert col(table, "_problem")[2] == "invalid_utf8: row 2, column 'doc', byte 3: invalid continuation byte"
    assert col(table, "_problem")[:2] == [None, None]
    # the worker's read of a range names the row in the file
    f = reading.InputFile(str(path), path.name, "parquet")
    cols = reading.columns_for(cfg(path, invalid_utf8="fail"), [], with_extra=False)
    part = reading.read_range(f, cols, "fail", 1, 2, None, None, None)
    assert part.column("_problem").to_pylist() == [None, "invalid_utf8: row 2, column 'doc', byte 3: invalid continuation byte"]


def test_parquet_text_of_another_type_is_not_text(tmp_path):
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"doc": pa.array([1, None, 3], pa.int64()),
                             "tags": pa.array([["a"], ["b"], []])}), path)
    table, _ = read(path, cfg(path))
    assert col(table, "_problem") == ["not_text: 'doc' holds a int, not a string", "empty_text: 'doc' is null or missing",
                                      "not_text: 'doc' holds a int, not a string"]
    assert table.schema.field("_text").type == pa.string()
    table, _ = read(path, InputConfig(path=str(path), text_column="tags"))
    assert all(p.startswith("not_text: 'tags' holds a list") for p in col(table, "_problem"))


@pytest.mark.parametrize("content", [b"", b"\n", b"\n\n\n", b"  \n\t\n \r\n", b"\n" * 100_000])
def test_jsonl_of_blank_lines_has_no_rows(tmp_path, content):
    path = tmp_path / "blank.jsonl"
    path.write_bytes(content)
    c = cfg(path)
    reading.check_columns([path], c, [])
    table, _ = read(path, c)
    assert table.num_rows == 0 and table.schema.field("_text").type == pa.string()
    path.write_bytes(content + b'{"doc": "after the blanks"}\n')
    table, _ = read(path, c)
    assert col(table, "_text") == ["after the blanks"] and col(table, "_line") == [content.count(b"\n") + 1]


@pytest.mark.parametrize("line", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"doc": "x", "meta": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"doc": "x", "meta": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b"}",
    b'{"doc": "x", "meta": ' + b"[" * 100_000,  # never closed
    b'{"doc": "x", "meta": ' + b"[" * 2_000 + b"]" * 2_000 + b"}",  # deeper than Python's parser goes
])
def test_deeply_nested_json_fails_its_line(tmp_path, line):
    path = tmp_path / "deep.jsonl"
    path.write_bytes(b'{"doc": "first"}\n' + line + b'\n{"doc": "[[[[ in a string is text", "meta": [[1]]}\n')
    c = cfg(path)
    reading.check_columns([path], c, [])
    table, _ = read(path, c)
    problems = col(table, "_problem")
    assert problems[0] is None and problems[2] is None
    assert problems[1].startswith("bad_json: line 2 is nested")
    assert col(table, "_text")[2] == "[[[[ in a string is text"
    assert rows_read_alone(path, c, table)[1] == problems


def test_json_nesting_depth_skips_brackets_in_strings():
    import numpy as np

    def depth(text):
        return jsonl._json_depth(np.frombuffer(text.encode(), np.uint8))

    assert depth('{"a": [1, {"b": [[]]}]}') == 5
    assert depth('{"a": "[[[[{{{{", "b": ["]]]]"]}') == 2
    assert depth('{"a": "\\"[[[", "b": "\\\\", "c": [[["\\\\\\"]]]]}') == 4
    assert depth('"no brackets"') == 0


def test_openai_batch_line_nested_too_deep_is_invalid_json(tmp_path):
    path = tmp_path / "batch.jsonl"
    path.write_bytes(b'{"custom_id": "a", "body": ' + b"[" * 100_000 + b"]" * 100_000 + b'}\n'
                     b'{"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n')
    c = InputConfig(path=str(path), format="openai-batch")
    table, _ = read(path, c)
    assert col(table, "_problem")[0] == "invalid_json: line 1 is nested too deep"
    assert col(table, "_problem")[1] is None and col(table, "_id")[1] == "b"


def test_a_csv_field_of_invalid_utf8_fails_its_row_alone_when_asked(tmp_path):
    from shardinfer.config import InputConfig
    from shardinfer.inputs import reading

    path = tmp_path / "bad.csv"
    path.write_bytes(b"text,n\nfine,1\nbad \xff\xfe bytes,2\nalso fine,3\n")
    f = reading.input_files(InputConfig(path=str(path)))[0]
    table = reading.read_table(f, InputConfig(path=str(path), invalid_utf8="fail"), extra=["n"])
    problems = table.column("_problem").to_pylist()
    assert problems[0] is None and problems[2] is None
    assert problems[1].startswith("invalid_utf8: line 3, column 'text'")
