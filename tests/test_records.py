"""Typed records at the format boundaries: OpenAI batch request and output lines, plan.json and the
workers' metrics. Bad records give errors naming the field; files of older versions still load; the
output file is byte for byte what it was."""

import json
import logging
import os

import pyarrow as pa
import pytest
from pydantic import ValidationError

from conftest import run_cli
from shardinfer.engines import Completion
from shardinfer.errors import RunError
from shardinfer.ledger.claims import Ledger
from shardinfer.ledger.rundir import RunDir
from shardinfer.ledger.runstate import load_plan, load_run
from shardinfer.planning.plan import Plan, Segment
from shardinfer.records import describe_errors, field_path
from shardinfer.reduce.merge import reduce_run
from shardinfer.requests.openai_batch import URLS, OutputFile, output_line, parse_request, request_line
from shardinfer.requests.prompts import Prompt
from shardinfer.requests.row_options import OptionError, RowOptions
from shardinfer.results import result_table
from shardinfer.telemetry import metrics as metrics_module
from shardinfer.telemetry.metrics import WorkerMetrics, load_metrics
from shardinfer.telemetry.status import run_status


def test_a_field_is_named_by_its_path_in_the_file():
    assert field_path(("units", 3, "segments", 0, "start")) == "units[3].segments[0].start"
    assert field_path(("rank",)) == "rank" and field_path(()) == "top level"


# ---- OpenAI batch request lines ---------------------------------------------------------------

CHAT_BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _refused(line: dict | str) -> OptionError:
    with pytest.raises(OptionError) as err:
        parse_request(line if isinstance(line, str) else json.dumps(line), RowOptions(max_tokens=16), ["m"], {})
    return err.value


@pytest.mark.parametrize("line,code,message", [
    ({"custom_id": "a", "method": "GET", "url": "/v1/chat/completions", "body": CHAT_BODY}, "invalid_method",
     "method 'GET' is not supported; use POST"),
    ({"custom_id": "a", "method": None, "url": "/v1/chat/completions", "body": CHAT_BODY}, "invalid_method",
     "method None is not supported; use POST"),
    ({"custom_id": "a", "url": "/v1/embeddings", "body": CHAT_BODY}, "invalid_url",
     "Model does not support endpoint: /v1/embeddings; this run has task generate: run the /v1/embeddings lines "
     "with task: embed (an embedding model)"),
    ({"custom_id": "a", "body": CHAT_BODY}, "invalid_url",
     f"url None is not supported; use {URLS}"),
    ({"custom_id": "a", "url": 3, "body": CHAT_BODY}, "invalid_url",
     f"url 3 is not supported; use {URLS}"),
    ({"custom_id": "a", "url": "/v1/completions"}, "invalid_request", "body: the request has no body object"),
    ({"custom_id": "a", "url": "/v1/completions", "body": ["x"]}, "invalid_request", "body: the request has no body object"),
    # the first wrong field names the error, in the order method, url, body
    ({"method": "PUT", "url": "/x", "body": None}, "invalid_method", "method 'PUT' is not supported; use POST"),
    ({"url": "/x", "body": None}, "invalid_url", f"url '/x' is not supported; use {URLS}"),
    ('{"custom_id": "a", "url": ', "invalid_json", "Expecting value at column 27"),
    ("[1, 2]", "invalid_json", "a JSON list, not a request object"),
])
def test_a_request_line_with_a_wrong_field_is_refused_with_the_batch_api_code(line, code, message):
    refused = _refused(line)
    assert (refused.code, str(refused)) == (code, message)


def test_a_request_line_takes_post_by_default_ignores_other_keys_and_any_custom_id():
    line = {"url": "/v1/chat/completions", "body": CHAT_BODY, "custom_id": 7, "metadata": {"x": 1}}
    assert request_line(json.dumps(line)) == {"url": "/v1/chat/completions", "body": CHAT_BODY, "custom_id": 7}
    request = parse_request(json.dumps(line), RowOptions(max_tokens=16), ["m"], {})
    assert (request.endpoint, request.model, request.messages) == ("/v1/chat/completions", "m", CHAT_BODY["messages"])


def test_a_request_body_keeps_its_own_error_codes():
    base = {"custom_id": "a", "url": "/v1/chat/completions"}
    assert _refused({**base, "body": {"messages": CHAT_BODY["messages"]}}).code == "invalid_request"
    assert _refused({**base, "body": {**CHAT_BODY, "model": "other"}}).code == "model_not_found"
    assert _refused({**base, "body": {**CHAT_BODY, "logit_bias_typo": 1}}).code == "unsupported_parameter"
    assert _refused({**base, "body": {**CHAT_BODY, "messages": [{"role": "robot", "content": "x"}]}}).code == \
        "invalid_messages"
    completion = {**base, "url": "/v1/completions", "body": {"model": "m", "prompt": ["a", "b"]}}
    assert _refused(completion).code == "invalid_prompt"


def test_a_lone_surrogate_the_reader_accepts_is_accepted_here_too():
    line = '{"url": "/v1/completions", "body": {"model": "m", "prompt": "a\\ud800b"}}'
    assert parse_request(line, RowOptions(max_tokens=16), ["m"], {}).prompt == "a\ud800b"


# ---- OpenAI batch output lines ----------------------------------------------------------------

_LOGPROBS = [{"token": "é", "logprob": -0.25, "top": [{"token": "é", "logprob": -0.25}, {"token": '"', "logprob": -1.5}]},
             {"token": " ok", "logprob": -0.5, "top": None}]
ROWS = [
    {"id": "c1", "status": "ok", "output": 'héllo "x"', "outputs": ['héllo "x"', "yo\n"], "finish_reasons": ["stop", "length"],
     "prompt_tokens": 7, "output_tokens": 5, "finish_reason": "stop", "endpoint": "/v1/chat/completions",
     "model": "tiny-qwen3", "logprobs": [_LOGPROBS, _LOGPROBS], "error": None},
    {"id": "c2", "status": "ok", "output": "é ok", "outputs": None, "finish_reasons": None, "prompt_tokens": 3,
     "output_tokens": 2, "finish_reason": "length", "endpoint": "/v1/completions", "model": "ad", "logprobs": [_LOGPROBS],
     "error": None},
    {"id": "c3", "status": "failed",
     "error": "invalid_url: url '/v1/embeddings' is not supported; use /v1/chat/completions or /v1/completions"},
    {"id": "c4", "status": "failed", "error": None},
]
# As written before the lines were typed (json.dumps, default separators, characters as they are).
_TOP = '[{"token": "é", "logprob": -0.25, "bytes": [195, 169]}, {"token": "\\"", "logprob": -1.5, "bytes": [34]}]'
_CHAT_LOGPROBS = ('{"content": [{"token": "é", "logprob": -0.25, "bytes": [195, 169], "top_logprobs": ' + _TOP + '}, '
                  '{"token": " ok", "logprob": -0.5, "bytes": [32, 111, 107], "top_logprobs": []}]}')
EXPECTED = [
    '{"id": "batch_req_run-0", "custom_id": "c1", "response": {"status_code": 200, "request_id": "req_run-0", "body": '
    '{"id": "chatcmpl-run-0", "object": "chat.completion", "created": 1700000000, "model": "tiny-qwen3", "choices": '
    '[{"index": 0, "message": {"role": "assistant", "content": "héllo \\"x\\""}, "logprobs": ' + _CHAT_LOGPROBS + ', '
    '"finish_reason": "stop"}, {"index": 1, "message": {"role": "assistant", "content": "yo\\n"}, "logprobs": '
    + _CHAT_LOGPROBS + ', "finish_reason": "length"}], "usage": {"prompt_tokens": 7, "completion_tokens": 5, '
    '"total_tokens": 12}}}, "error": null}',
    '{"id": "batch_req_run-1", "custom_id": "c2", "response": {"status_code": 200, "request_id": "req_run-1", "body": '
    '{"id": "cmpl-run-1", "object": "text_completion", "created": 1700000000, "model": "ad", "choices": [{"index": 0, '
    '"text": "é ok", "logprobs": {"tokens": ["é", " ok"], "token_logprobs": [-0.25, -0.5], "top_logprobs": '
    '[{"é": -0.25, "\\"": -1.5}, {}], "text_offset": [0, 1]}, "finish_reason": "length"}], "usage": '
    '{"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}}, "error": null}',
    '{"id": "batch_req_run-2", "custom_id": "c3", "response": null, "error": {"code": "invalid_url", "message": '
    '"url \'/v1/embeddings\' is not supported; use /v1/chat/completions or /v1/completions"}}',
    '{"id": "batch_req_run-3", "custom_id": "c4", "response": null, "error": {"code": "failed", "message": "unknown"}}',
]


def test_output_lines_are_the_same_bytes_as_before():
    for i, (row, expected) in enumerate(zip(ROWS, EXPECTED)):
        assert json.dumps(output_line(row, f"run-{i}", 1700000000), ensure_ascii=False) == expected


def test_the_output_file_is_the_same_bytes_as_before(tmp_path):
    out = OutputFile(tmp_path / "out.jsonl", "run")
    out.created = 1700000000
    out.add(pa.Table.from_pylist(ROWS[:2]))
    out.add(pa.Table.from_pylist(ROWS[2:]))
    assert out.close() == 4
    assert (tmp_path / "out.jsonl").read_text(encoding="utf-8") == "".join(line + "\n" for line in EXPECTED)
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_an_output_line_is_checked():
    with pytest.raises(ValidationError, match="custom_id"):
        output_line({**ROWS[2], "id": None}, "k", 0)
    with pytest.raises(ValidationError, match="custom_id"):
        output_line({**ROWS[1], "id": 5}, "k", 0)  # a number is not taken for an id
    assert output_line(ROWS[3], "k", 0)["error"] == {"code": "failed", "message": "unknown"}


# ---- plan.json --------------------------------------------------------------------------------


def _saved(run_dir: RunDir) -> dict:
    return json.loads(run_dir.plan_json.read_text())


def _damage(run_dir: RunDir, data) -> str:
    run_dir.plan_json.write_text(json.dumps(data))
    with pytest.raises(RunError) as err:
        load_run(run_dir)
    return str(err.value)


def test_every_kind_of_segment_keeps_its_compact_form():
    segments = [Segment(0, 1, 5), Segment(1, 0, 9, begin=0, stop=90, line=1), Segment(2, 3, 4, row_group=1, group_offset=3)]
    assert [s.to_json() for s in segments] == [[0, 1, 5], [1, 0, 9, 0, 90, 1], [2, 3, 4, "rg", 1, 3]]
    assert [Segment.from_json(s.to_json()) for s in segments] == segments
    with pytest.raises(ValidationError, match="start"):
        Segment.from_json([0, "one", 5])


def test_a_plan_of_an_older_version_still_loads(planned):
    run_dir, plan = planned
    old = _saved(run_dir)
    for newer in ("notes", "prompt_tokens", "output_tokens", "replaced_utf8", "problem_rows"):
        del old[newer]  # not written by the first versions
    for unit in old["units"]:
        unit["segments"] = [s[:3] for s in unit["segments"]]  # plans made before positions
    for info in old["files"]:
        info.pop("chunk_crcs", None)
    old["a_field_of_a_later_version"] = {"x": 1}
    run_dir.plan_json.write_text(json.dumps(old))
    loaded = load_plan(run_dir)
    assert [(u.unit, u.first_row, u.rows, u.cost) for u in loaded.units] == \
        [(u.unit, u.first_row, u.rows, u.cost) for u in plan.units]
    assert all(s.begin is None and s.rows == u.rows for u in loaded.units for s in u.segments)
    assert (loaded.notes, loaded.prompt_tokens, loaded.duplicates) == ([], 0, plan.duplicates)


def test_a_saved_plan_loads_as_it_was(planned):
    run_dir, plan = planned
    assert load_plan(run_dir) == plan
    with_dups = Plan.from_json({**plan.to_json(), "duplicates": [[5, 1], [9, 2]]})
    assert with_dups.duplicates == {5: 1, 9: 2} and Plan.from_json(with_dups.to_json()) == with_dups


def test_a_damaged_plan_names_the_field(planned):
    run_dir, _ = planned
    good = _saved(run_dir)
    unit = good["units"][1]
    cases = [
        ({**good, "units": [good["units"][0], {**unit, "rows": "many"}, *good["units"][2:]]},
         "units[1].rows: input should be a valid integer"),
        ({**good, "units": [good["units"][0], {k: v for k, v in unit.items() if k != "cost"}, *good["units"][2:]]},
         "units[1].cost: missing"),
        ({**good, "units": [{**good["units"][0], "segments": [[0, 1]]}, *good["units"][1:]]},
         "units[0].segments[0]: expected [file, start, end], optionally followed by 3 positions (found [0, 1])"),
        ({**good, "units": [{**good["units"][0], "segments": [[0, 0, 3, "x", 1, 1]]}, *good["units"][1:]]},
         "units[0].segments[0].begin: input should be a valid integer"),
        ({**good, "total_rows": None}, "total_rows: input should be a valid integer (found None)"),
        ({**good, "duplicates": [[3, "first"]]}, "duplicates[3]: input should be a valid integer"),
        ({**good, "duplicates": [[[3], 1]]}, "duplicates: input should be a valid dictionary"),
        ({**good, "files": [{"path": good["files"][0]["path"], "rows": 40}]}, "files[0].source: missing"),
        ({**good, "units": good["units"][1:]}, "units[0].unit: 1, not its place in the list"),
        ({**good, "units": [{**good["units"][0], "rows": good["units"][0]["rows"] + 1}, *good["units"][1:]]},
         f"units[0].rows: {good['units'][0]['rows'] + 1}, but its segments hold {good['units'][0]['rows']}"),
        ({**good, "units": [{**good["units"][0], "segments": [[1, 0, 3]]}, *good["units"][1:]]},
         "units[0].segments[0]: rows 0-3 of file 1, which is not among the 1 file(s)"),
        ([good], "top level: input should be a dictionary"),
    ]
    for data, problem in cases:
        message = _damage(run_dir, data)
        assert message.startswith(f"plan.json cannot be read as a plan (damaged, foreign, or of another shardinfer "
                                  f"version): {problem}"), message
        assert message.endswith("start the run anew in another directory (run.directory=NEW_DIR)")


def test_a_foreign_file_as_plan_names_what_a_plan_needs(planned):
    run_dir, _ = planned
    message = _damage(run_dir, {"name": "a package.json", "version": "1.0"})
    assert ": files: missing; total_rows: missing; units: missing (and 4 more). Restore the file" in message
    message = _damage(run_dir, WorkerMetrics(rank=0, world=1, launch=0).to_json())
    assert ": files: missing; total_rows: missing; units: input should be a valid list (found 0)" in message


def test_status_of_a_run_with_a_damaged_plan_is_an_error_without_a_traceback(planned):
    run_dir, _ = planned
    run_dir.plan_json.write_text(json.dumps({**_saved(run_dir), "units": 3}))
    proc = run_cli(["status", str(run_dir.path)], dict(os.environ), timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "shardinfer: plan.json cannot be read as a plan" in proc.stderr
    assert "units: input should be a valid list (found 3)" in proc.stderr and "Traceback" not in proc.stderr


# ---- worker metrics ---------------------------------------------------------------------------


def test_a_metrics_record_is_checked_field_by_field():
    with pytest.raises(ValidationError) as err:
        WorkerMetrics.from_json({"rank": "first", "world": 2, "started_at": "yesterday", "fs_ops": {"stat": 1.5}})
    assert describe_errors(err.value) == (
        "rank: input should be a valid integer, unable to parse string as an integer (found 'first'); "
        "launch: missing; started_at: input should be a valid number, unable to parse string as a number "
        "(found 'yesterday') (and 1 more)")
    m = WorkerMetrics.from_json({"rank": 1, "world": 2, "launch": 0, "started_at": 5, "versions": {"vllm": "0.1"}})
    assert m.started_at == 5.0 and isinstance(m.started_at, float) and m.versions == {"vllm": "0.1"}


def _commit(run_dir, unit):
    n = unit.rows
    rows = pa.table({"_row": pa.array(range(unit.first_row, unit.first_row + n), pa.int64()),
                     "_id": pa.array([f"d{i}" for i in range(n)], pa.string())})
    ledger = Ledger(run_dir)
    assert ledger.claim(unit.unit)
    ledger.commit(unit.unit, result_table(rows, [None] * n, [Prompt([1, 2, 3]) for _ in range(n)],
                                          [Completion([4, 5], "out", "length") for _ in range(n)], []), {"attempt": 1})


DAMAGED_METRICS = {"launch-0-worker-00001.json": b"{\"rank\": 1, \"world\"",  # cut short
                   "launch-0-worker-00002.json": json.dumps({"rank": 2, "world": 3, "launch": "zero"}).encode(),
                   "launch-0-worker-00003.json": b"[1, 2]",
                   "launch-0-worker-00004.json": b"\xff\xfe{}"}


def test_damaged_metrics_are_left_out_of_status_and_report_with_a_warning(planned, caplog, monkeypatch):
    run_dir, plan = planned
    monkeypatch.setattr(metrics_module, "_warned", set())
    good = WorkerMetrics(rank=0, world=3, launch=0, rows=plan.total_rows, finished_at=None)
    good.save(run_dir)
    for name, data in DAMAGED_METRICS.items():
        (run_dir.metrics / name).write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="shardinfer.telemetry.metrics"):
        status = run_status(run_dir)
        assert [w.rank for w in status.workers] == [0]
        warnings = [r.getMessage() for r in caplog.records if r.name == "shardinfer.telemetry.metrics"]
        assert len(warnings) == 4 and all("left out of the status and report" in w for w in warnings)
        assert "launch-0-worker-00001.json are damaged (not JSON: " in warnings[0]
        assert "launch: input should be a valid integer" in warnings[1]
        assert "top level: input should be a dictionary or an instance of WorkerMetrics" in warnings[2]
        caplog.clear()
        assert [m.rank for m in load_metrics(run_dir)] == [0]
        assert not caplog.records  # each damaged file is warned about once
    for unit in plan.units:
        _commit(run_dir, unit)
    report = reduce_run(run_dir)
    assert report["rows"]["ok"] == plan.total_rows and [w["rank"] for w in report["workers"]] == [0]


@pytest.mark.engine
def test_a_chat_output_line_is_what_vllm_run_batch_writes():
    """vLLM's own output line model takes a chat line and gives it back field for field."""
    try:
        from vllm.entrypoints.launchers.run_batch import BatchRequestOutput
    except ImportError:
        run_batch = pytest.importorskip("vllm.entrypoints.openai.run_batch")
        BatchRequestOutput = run_batch.BatchRequestOutput  # earlier vLLM versions
    line = json.loads(EXPECTED[0])
    parsed = BatchRequestOutput.model_validate(line)
    assert type(parsed.response.body).__name__ == "ChatCompletionResponse"
    assert json.loads(parsed.model_dump_json(exclude_unset=True)) == line


def test_a_truncated_plan_json_is_a_clear_error(tmp_path):
    from shardinfer.errors import RunError
    from shardinfer.ledger.rundir import RunDir
    from shardinfer.ledger.runstate import load_plan

    (tmp_path / "plan.json").write_text('{"files": [{"path"')
    with pytest.raises(RunError, match=r"plan.json is not JSON .*the run's plan is damaged"):
        load_plan(RunDir(tmp_path))
