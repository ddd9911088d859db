from pathlib import Path

import pytest
import yaml

from shardinfer.config import config_from_dict, field_help, load_config
from shardinfer.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

MINIMAL = {"input": {"path": "x.jsonl"}, "model": {"path": "m"}}


def build(**changes):
    raw = {k: dict(v) for k, v in MINIMAL.items()}
    for key, value in changes.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return config_from_dict(raw)


def test_demo_config_loads_with_its_typed_values():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.name == "demo"
    assert cfg.model.engine == "vllm"
    assert cfg.model.max_model_len == 2048
    assert cfg.run.workers == 2
    assert cfg.input.passthrough == [] and cfg.input.id_column is None
    assert "{text}" in cfg.prompt.user


def test_the_bundled_openai_batch_example_has_ten_good_requests_and_two_that_fail_alone():
    from shardinfer.openai_batch import parse_request
    from shardinfer.row_options import OptionError, base_options
    from shardinfer.row_requests import served_names

    cfg = load_config(REPO / "configs" / "openai-batch.yaml")
    assert cfg.input.format == "openai-batch" and served_names(cfg) == [".cache/tiny-qwen3", "tiny-qwen3"]
    codes = []
    for line in (REPO / cfg.input.path).read_text().splitlines():
        try:
            parse_request(line, base_options(cfg.sampling), served_names(cfg), {})
            codes.append("ok")
        except OptionError as exc:
            codes.append(exc.code)
    assert codes == ["ok"] * 10 + ["invalid_url", "model_not_found"]


def test_defaults_fill_missing_sections():
    cfg = config_from_dict(MINIMAL)
    assert cfg.sampling.max_tokens == 256 and cfg.sampling.temperature == 0.0
    assert cfg.prompt.mode == "chat" and cfg.prompt.too_long == "truncate"
    assert cfg.run.workers is None and cfg.input.format == "auto"


def test_unknown_key_names_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        build(sampling__max_token=3)
    msg = str(err.value)
    assert "'sampling.max_token'" in msg
    assert "Did you mean 'max_tokens'" in msg
    assert "temperature" in msg  # the valid keys are listed


def test_unknown_section_is_refused():
    with pytest.raises(ConfigError, match="unknown key 'sampler'.*Valid keys: input, prompt, model"):
        config_from_dict({**MINIMAL, "sampler": {}})


@pytest.mark.parametrize("key,value,expect", [
    ("sampling__max_tokens", "many", r"sampling.max_tokens: expected int, got 'many' \(str\)"),
    ("sampling__temperature", [1], r"sampling.temperature: expected float"),
    ("run__workers", True, r"run.workers: expected int, got True"),
    ("model__engine", "tgi", r"model.engine: 'tgi' is not a valid choice. Valid choices: vllm, hf"),
    ("input__format", "xml", r"Valid choices: auto, parquet, jsonl, csv"),
    ("prompt__too_long", "cut", r"Valid choices: truncate, fail"),
    ("model__vllm_args", 3, r"model.vllm_args: expected a mapping"),
    ("sampling__max_tokens", 0, r"sampling.max_tokens: must be at least 1"),
    ("sampling__top_p", 1.5, r"sampling.top_p: must be in \(0, 1\]"),
])
def test_wrong_values_name_key_value_and_fix(key, value, expect):
    with pytest.raises(ConfigError, match=expect):
        build(**{key: value})


def test_required_field_is_named():
    with pytest.raises(ConfigError, match="model.path is required"):
        config_from_dict({"input": {"path": "x"}, "model": {}})


def test_max_tokens_must_leave_room_for_the_prompt():
    with pytest.raises(ConfigError, match="no room is left for the prompt"):
        build(model__max_model_len=100, sampling__max_tokens=100)


def test_overrides_are_typed_like_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    cfg = load_config(path, ["run.workers=3", "sampling.temperature=0.7", "sampling.stop=[END, '###']",
                             "model.vllm_args.tensor_parallel_size=2", "prompt.system=Be brief."])
    assert cfg.run.workers == 3
    assert cfg.sampling.temperature == 0.7
    assert cfg.sampling.stop == ["END", "###"]
    assert cfg.model.vllm_args == {"tensor_parallel_size": 2}
    assert cfg.prompt.system == "Be brief."
    assert cfg.name == "c"


@pytest.mark.parametrize("override,expect", [
    ("run.wrkers=2", "unknown key 'run.wrkers'. Did you mean 'workers'"),
    ("run.workers=two", "run.workers: expected int, got 'two'"),
    ("workers", "must look like section.key=value"),
    ("sampling.max_tokens.x=1", "'max_tokens' is a value, not a section"),
])
def test_bad_overrides_fail_before_work(tmp_path, override, expect):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "sampling": {"max_tokens": 8}}))
    with pytest.raises(ConfigError, match=expect):
        load_config(path, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_every_field_is_documented():
    rows = field_help()
    assert len(rows) > 30
    assert all(text for _, _, text in rows)
    assert rows[[k for k, _, _ in rows].index("model.path")][:2] == ("model.path", "required")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    assert load_config(path).model.path


def test_readme_documents_every_config_key():
    readme = (REPO / "README.md").read_text()
    missing = [key for key, _, _ in field_help() if f"`{key}`" not in readme]
    assert missing == [], "README config reference is out of date: run `shardinfer config-reference`"


def test_pass_through_may_not_shadow_a_results_column():
    with pytest.raises(ConfigError, match="input.passthrough: 'status' is a results column already"):
        build(input__passthrough=["lang", "status"])
    with pytest.raises(ConfigError, match="the id column is the results' id"):
        build(input__passthrough=["id"], input__id_column="id")
