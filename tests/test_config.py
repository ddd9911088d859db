import logging
import os
from pathlib import Path

import pytest
import yaml

import shardinfer.config.load
from conftest import run_cli, write_config, write_jsonl
from shardinfer.config import config_from_dict, field_help, load_config, results_settings
from shardinfer.engines import registry
from shardinfer.engines.registry import EngineSpec, engines
from shardinfer.errors import ConfigError
from shardinfer.planning.validate import checked_from_dict, load_checked
from shardinfer.requests.builder import served_names
from shardinfer.requests.openai_batch import parse_request
from shardinfer.requests.row_options import OptionError, base_options

REPO = Path(__file__).resolve().parents[1]

MINIMAL = {"input": {"path": "x.jsonl"}, "model": {"path": "m"}}


def build(**changes):
    raw = {k: dict(v) for k, v in MINIMAL.items()}
    for key, value in changes.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return checked_from_dict(raw)


def test_demo_config_loads_with_its_typed_values():
    cfg = load_checked(REPO / "configs" / "demo.yaml")
    assert cfg.name == "demo"
    assert cfg.model.engine == "vllm"
    assert cfg.model.max_model_len == 2048
    assert cfg.run.workers == 2
    assert cfg.input.passthrough == [] and cfg.input.id_column is None
    assert "{text}" in cfg.prompt.user


def test_the_bundled_openai_batch_example_has_ten_good_requests_and_two_that_fail_alone():
    cfg = load_checked(REPO / "configs" / "openai-batch.yaml")
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
    cfg = checked_from_dict(MINIMAL)
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
    with pytest.raises(ConfigError, match="unknown key 'sampler'.*Valid keys: task, input, prompt, model"):
        checked_from_dict({**MINIMAL, "sampler": {}})


@pytest.mark.parametrize("key,value,expect", [
    ("sampling__max_tokens", "many", r"sampling.max_tokens: expected int, got 'many' \(str\)"),
    ("sampling__temperature", [1], r"sampling.temperature: expected float"),
    ("run__workers", True, r"run.workers: expected int, got True"),
    ("model__engine", "tgi", r"model.engine: 'tgi' is not a valid choice. Valid choices: vllm, hf"),
    ("input__format", "xml", r"Valid choices: auto, parquet, jsonl, csv"),
    ("prompt__too_long", "cut", r"Valid choices: truncate, fail"),
    ("model__engine_args", 3, r"model.engine_args: expected a mapping"),
    ("model__vllm_args", 3, r"model.vllm_args: expected a mapping"),
    ("sampling__max_tokens", 0, r"sampling.max_tokens: must be at least 1"),
    ("sampling__top_p", 1.5, r"sampling.top_p: must be in \(0, 1\]"),
])
def test_wrong_values_name_key_value_and_fix(key, value, expect):
    with pytest.raises(ConfigError, match=expect):
        build(**{key: value})


def test_required_field_is_named():
    with pytest.raises(ConfigError, match="model.path is required"):
        checked_from_dict({"input": {"path": "x"}, "model": {}})


def test_max_tokens_must_leave_room_for_the_prompt():
    with pytest.raises(ConfigError, match="no room is left for the prompt"):
        build(model__max_model_len=100, sampling__max_tokens=100)


def test_overrides_are_typed_like_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    cfg = load_checked(path, ["run.workers=3", "sampling.temperature=0.7", "sampling.stop=[END, '###']",
                              "model.engine_args.tensor_parallel_size=2", "prompt.system=Be brief."])
    assert cfg.run.workers == 3
    assert cfg.sampling.temperature == 0.7
    assert cfg.sampling.stop == ["END", "###"]
    assert cfg.model.engine_args == {"tensor_parallel_size": 2}
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
        load_checked(path, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_checked(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_checked(bad)


def test_every_field_is_documented():
    rows = field_help()
    assert len(rows) > 30
    assert all(text for _, _, text in rows)
    assert rows[[k for k, _, _ in rows].index("model.path")][:2] == ("model.path", "required")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    assert load_checked(path).model.path


def test_readme_documents_every_config_key():
    readme = (REPO / "README.md").read_text()
    missing = [key for key, _, _ in field_help() if f"`{key}`" not in readme]
    assert missing == [], "README config reference is out of date: run `shardinfer config-reference`"


def test_pass_through_may_not_shadow_a_results_column():
    with pytest.raises(ConfigError, match="input.passthrough: 'status' is a results column already"):
        build(input__passthrough=["lang", "status"])
    with pytest.raises(ConfigError, match="the id column is the results' id"):
        build(input__passthrough=["id"], input__id_column="id")


def _write(tmp_path, text: str | bytes):
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


BASE_YAML = "input: {path: x.jsonl}\nmodel: {path: m}\n"


def test_a_config_file_that_is_not_utf8_is_refused_with_the_line(tmp_path):
    path = _write(tmp_path, BASE_YAML.encode() + b"prompt: {system: caf\xe9}\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text: byte 0xe9 on line 3.*Save the file as UTF-8"):
        load_checked(path)


def test_an_override_that_is_not_utf8_is_refused(tmp_path):
    path = _write(tmp_path, BASE_YAML)
    bad = b"prompt.system=caf\xe9".decode("utf-8", "surrogateescape")  # how Python passes such an argument
    for item in (bad, b"sampling.stop=[\xff]".decode("utf-8", "surrogateescape")):
        with pytest.raises(ConfigError, match="not UTF-8 text.*pass overrides as UTF-8"):
            load_checked(path, [item])


# a billion laughs: 10 values, each level 10 aliases to the one before, 10**10 values once expanded
ALIAS_BOMB = "{a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol], " + ", ".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]" for p, n in zip("abcdefgh", "bcdefghi")) + "}"


@pytest.mark.parametrize("value,expect", [
    ("[" * 5000 + "]" * 5000, "nested more than 100 levels deep"),
    ("&a [*a]", "an alias refers to a value that holds it"),
    (ALIAS_BOMB, r"more than 100,000 values once its aliases \(\*name\) are expanded"),
    ("1" * 5000, "a value cannot be read"),
])
def test_hostile_yaml_is_refused_before_it_costs_memory_or_stack(tmp_path, value, expect):
    path = _write(tmp_path, BASE_YAML + f"x: {value}\n")
    with pytest.raises(ConfigError, match=expect):
        load_checked(path)
    with pytest.raises(ConfigError, match=expect):  # the same limits for an override's value
        load_checked(_write(tmp_path, BASE_YAML), [f"model.engine_args.x={value}"])


def test_a_few_aliases_and_merge_keys_still_load(tmp_path):
    path = _write(tmp_path, BASE_YAML + "sampling: {stop: &s [END, '###']}\nrun:\n  env: &e {A: '1'}\n"
                  "slurm: {setup: *s}\n")
    cfg = load_checked(path)
    assert cfg.sampling.stop == ["END", "###"] == cfg.slurm.setup and cfg.run.env == {"A": "1"}


@pytest.mark.parametrize("text,line,first", [
    ("input: {path: x.jsonl}\nmodel: {path: m}\nmodel: {path: other}\n", 3, 2),
    ("input: {path: x.jsonl}\nmodel:\n  path: m\n  dtype: float16\n  path: n\n", 5, 3),
    ("input: {path: x.jsonl, path: y.jsonl}\nmodel: {path: m}\n", 1, 1),
])
def test_a_key_given_twice_is_refused_with_its_lines(tmp_path, text, line, first):
    with pytest.raises(ConfigError, match=rf"line {line}: key '(model|path)' is given twice in one mapping "
                                          rf"\(first on line {first}\); keep one of them"):
        load_checked(_write(tmp_path, text))


@pytest.mark.parametrize("override,expect", [
    ("run.workers=1000000000", r"run.workers: at most 100,000 local worker processes, got 1,000,000,000"),
    ("sampling.temperature=.nan", r"sampling.temperature: must be a finite number, got nan"),
    ("sampling.temperature=.inf", r"sampling.temperature: must be a finite number, got inf"),
    ("sampling.top_p=-.inf", r"sampling.top_p: must be a finite number, got -inf"),
    ("run.gpu_hour_price=.nan", r"run.gpu_hour_price: must be a finite number"),
    ("run.expected_tokens_per_s=.inf", r"run.expected_tokens_per_s: must be a finite number"),
    ("run.lease_timeout_s=" + "9" * 400, r"run.lease_timeout_s: must be a finite number"),
    ("run.lease_timeout_s=-1", r"run.lease_timeout_s: must be above 0 seconds, got -1.0"),
    ("run.lease_timeout_s=0", r"run.lease_timeout_s: must be above 0 seconds"),
    ("run.metrics_interval_s=-5", r"run.metrics_interval_s: must be above 0 seconds"),
    ("run.log_interval_s=0", r"run.log_interval_s: must be above 0 seconds"),
    ("slurm.signal_grace_s=-1", r"slurm.signal_grace_s: must be 0 to 65535 seconds, got -1"),
    (f"sampling.seed={2**70}", rf"sampling.seed: must be 0 to {2**32 - 1} .* got {2**70}"),
    (f"sampling.seed={2**32}", r"sampling.seed: must be 0 to"),
    ("sampling.seed=-1", r"sampling.seed: must be 0 to"),
    ("model.dtype=float8", r"model.dtype: 'float8' is not a dtype the engines load. Valid: auto, bfloat16, "
                           r"float16, half, float32, float; .*model.engine_args.quantization"),
    ("name=../../x", r"name: '../../x' is not a simple name.*run.directory"),
    ("name=a/b", r"name: 'a/b' is not a simple name"),
    ("name=.hidden", r"name: '.hidden' is not a simple name"),
    ("name=", r"name: '' is not a simple name"),
    ("input.path=", r"input.path: is empty"),
    ("input.path=  ", r"input.path: is empty"),
    ("prompt.user=", r"prompt.user: the template is empty"),
    ("prompt.user=   ", r"prompt.user: the template is empty"),
    ("prompt.user={text:>99999999999}", r"prompt.user: placeholder \{text:>99999999999\} must be a plain column"),
    ("prompt.user={text!r}", r"prompt.user: placeholder \{text!r\} must be a plain column"),
    ("prompt.user=Title: {title!s:10}", r"placeholder \{title!s:10\}.*no format spec or !conversion"),
    ("prompt.user={text.upper}", r"placeholder \{text.upper\} must be a plain column"),
])
def test_values_that_would_fail_every_row_or_eat_memory_are_refused(tmp_path, override, expect):
    with pytest.raises(ConfigError, match=expect):
        load_checked(_write(tmp_path, BASE_YAML), [override])


@pytest.mark.parametrize("override", ["model.dtype=half", "model.dtype=bfloat16", "model.dtype=float",
                                      f"sampling.seed={2**32 - 1}", "sampling.seed=null", "run.workers=100000",
                                      "name=summarize-v2.1_b", "prompt.user=Q: {text} {{literal}}",
                                      "slurm.signal_grace_s=0"])
def test_the_edges_of_those_ranges_are_accepted(tmp_path, override):
    load_checked(_write(tmp_path, BASE_YAML), [override])


def test_an_empty_template_is_fine_where_the_template_is_not_used(tmp_path):
    cfg = load_checked(_write(tmp_path, BASE_YAML), ["input.format=openai-batch", "prompt.user= "])
    assert cfg.prompt.user == " "


@pytest.mark.parametrize("name,value,expect", [
    ("temperature", float("nan"), "must be a finite number, got nan"),
    ("top_p", float("inf"), "must be a finite number, got inf"),
    ("presence_penalty", 10**400, "must be a finite number"),
    ("seed", 2**63, "must be at least"),
])
def test_a_rows_own_option_is_checked_like_the_config(name, value, expect):
    options = base_options(checked_from_dict(MINIMAL).sampling)
    with pytest.raises(OptionError, match=f"column 'x': {expect}"):
        options.set(name, value, "column 'x'")
    assert options.set("seed", -(2**63), "column 'x'").seed == -(2**63)  # vLLM's OpenAI server takes int64 seeds


def test_a_config_file_name_that_is_not_a_simple_name_gives_a_simple_run_name(tmp_path):
    path = tmp_path / "my run (v2).yaml"
    path.write_text(f"input: {{path: {tmp_path}/c.jsonl}}\nmodel: {{path: m}}\n")
    assert load_checked(path).name == "my-run-v2-"


def test_the_config_package_checks_structure_and_values_and_the_validation_what_needs_the_rest():
    """shardinfer.config knows no engine, template or results column; planning.validate checks those."""
    leaf = config_from_dict(MINIMAL, ["model.engine=tgi", "input.passthrough=[status]", "prompt.user={text!r}"])
    assert leaf.model.engine == "tgi"
    with pytest.raises(ConfigError, match="model.engine: 'tgi' is not a valid choice. Valid choices: vllm, hf"):
        checked_from_dict(MINIMAL, ["model.engine=tgi"])
    with pytest.raises(ConfigError, match="sampling.max_tokens: must be at least 1"):  # values: the leaf's
        config_from_dict(MINIMAL, ["sampling.max_tokens=0"])
    with pytest.raises(ConfigError, match="unknown key 'model.vllm_arg'"):
        load_config(REPO / "configs" / "demo.yaml", ["model.vllm_arg.x=1"])
    assert load_checked(REPO / "configs" / "demo.yaml") == load_config(REPO / "configs" / "demo.yaml")


@pytest.fixture
def warnings_again(monkeypatch, caplog):
    """The warning about an earlier key is given once a process: forget it was given."""
    monkeypatch.setattr(shardinfer.config.load, "_WARNED", set())
    caplog.set_level(logging.WARNING, logger="shardinfer")
    return caplog


def test_engine_args_go_to_any_engine_and_change_the_results_settings():
    vllm = build(model__engine_args={"tensor_parallel_size": 2})
    hf = build(model__engine="hf", model__engine_args={"device_map": "auto"})
    assert vllm.model.engine_args == {"tensor_parallel_size": 2} and hf.model.engine_args == {"device_map": "auto"}
    assert engines()["hf"].args(hf.model) == {"device_map": "auto"}
    assert results_settings(vllm)["model"]["engine_args"] == {"tensor_parallel_size": 2}
    assert results_settings(vllm) != results_settings(build())
    assert [k for k, _, _ in field_help() if k.startswith("model.") and k.endswith("_args")] == ["model.engine_args"]


def test_the_earlier_engine_argument_keys_still_load_with_one_warning(warnings_again):
    for _ in range(2):
        cfg = build(model__vllm_args={"tensor_parallel_size": 2})
        assert cfg.model.engine_args == {"tensor_parallel_size": 2}
    lines = [r.getMessage() for r in warnings_again.records]
    assert lines == ["model.vllm_args is deprecated: use model.engine_args (the arguments of whichever engine runs); "
                     "its values are used as model.engine_args"]
    assert build(model__engine="hf", model__hf_args={"device_map": "cpu"}).model.engine_args == {"device_map": "cpu"}
    # the same run: a run.json of an earlier version reads back to the settings of the new key
    assert results_settings(cfg) == results_settings(build(model__engine_args={"tensor_parallel_size": 2}))
    # given with the same arguments under both names: fine
    assert build(model__vllm_args={"a": 1}, model__engine_args={"a": 1}).model.engine_args == {"a": 1}


def test_an_earlier_key_of_another_engine_is_ignored_and_one_that_disagrees_is_refused(warnings_again):
    cfg = build(model__hf_args={"device_map": "cpu"}, model__engine_args={"enforce_eager": True})
    assert cfg.model.engine_args == {"enforce_eager": True}  # engine vllm: hf_args were never its arguments
    assert "model.hf_args is deprecated and ignored: it holds hf's arguments and model.engine is 'vllm'" in \
        warnings_again.text
    with pytest.raises(ConfigError, match=r"model.vllm_args and model.engine_args are both given, with different "
                                          r"values; .*keep only model.engine_args"):
        build(model__vllm_args={"a": 1}, model__engine_args={"a": 2})


def test_empty_earlier_keys_of_a_saved_run_load_without_a_word(warnings_again):
    saved = {**MINIMAL, "model": {"path": "m", "engine_args": {"x": 1}, "vllm_args": {}, "hf_args": {}}}
    assert checked_from_dict(saved).model.engine_args == {"x": 1}
    assert warnings_again.records == []


def test_an_engine_that_takes_no_arguments_refuses_them(monkeypatch):
    spec = EngineSpec(name="plain", description="", create=lambda cfg, n: None, modules=(), extra="",
                      replica_gpus=lambda model, node_gpus: 1, takes_args=False)
    engines()  # the built-in ones first
    monkeypatch.setitem(registry._REGISTRY._items, "plain", spec)
    assert checked_from_dict(MINIMAL, ["model.engine=plain"]).model.engine == "plain"
    with pytest.raises(ConfigError, match="model.engine_args: engine plain takes no arguments, got x; remove"):
        checked_from_dict(MINIMAL, ["model.engine=plain", "model.engine_args.x=1"])


def test_the_cli_reads_the_earlier_key_says_so_and_checks_its_arguments(tmp_path, tiny_model, engine_env):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "hello"}])
    config = write_config(tmp_path / "c.yaml", corpus=corpus, model_dir=tiny_model, run_dir=tmp_path / "run")
    raw = yaml.safe_load(config.read_text())
    raw["model"]["vllm_args"] = {**raw["model"].pop("engine_args"), "tensor_paralel_size": 1}
    config.write_text(yaml.safe_dump(raw))
    proc = run_cli(["plan", str(config)], engine_env)
    assert proc.returncode == 2
    out = proc.stdout + proc.stderr
    assert "model.vllm_args is deprecated: use model.engine_args" in proc.stderr
    assert "[fail] model.engine_args" in out and "tensor_paralel_size (did you mean tensor_parallel_size" in out


def test_the_config_reference_documents_engine_args_and_the_registered_engines():
    reference = run_cli(["config-reference"], {**os.environ}).stdout
    assert "| `model.engine_args` | `{}` | passed through to the engine that runs" in reference
    assert "(registered: vllm, hf)" in reference and "model.vllm_args" in reference  # named as an earlier name
    readme = (REPO / "README.md").read_text()
    assert reference.strip() in readme, "README config reference is out of date: python tests/refresh_readme.py"
