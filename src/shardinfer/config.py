"""Typed configuration tree, loaded from YAML and checked as it is built.

Every section is a keyword-only dataclass whose fields carry a one-line help text. Unknown keys and
values of the wrong type fail before any work starts, naming the key, the value and the valid
choices. ``key.sub=value`` overrides (values parsed as YAML) are applied to the raw tree first, so
they are checked exactly like the file.

What changes a run's results is declared here, once: every field does, except those whose metadata
says ``results=False`` (the ``run`` and ``slurm`` sections and ``name``: where, how wide and how
long to run). :func:`results_settings` is that part of a config; the run fingerprint, the default
run directory and the check before a run is continued all use it, so a resubmission with more nodes
continues the same run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from shardinfer.errors import ConfigError
from shardinfer.results import CONTRACT, RESERVED


def _f(default: Any = dataclasses.MISSING, help: str = "", *, results: bool = True,
       choices: Callable[[], list[str]] | None = None) -> Any:
    """A dataclass field with a help text, whether it changes results, and (for names looked up in a
    registry) its valid choices. Mutable defaults go through ``default_factory``."""
    metadata = {"help": help, "results": results, "choices": choices}
    if isinstance(default, type) and dataclasses.is_dataclass(default):  # a sub-section with its defaults
        return field(default_factory=default, metadata=metadata)
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=metadata)
    return field(default=default, metadata=metadata)


def _engine_choices() -> list[str]:
    from shardinfer.engines.registry import engine_names  # the engines import this module

    return engine_names()


@dataclass(kw_only=True)
class InputConfig:
    path: str = _f(help="corpus: a file, a directory (all matching files, sorted) or a glob")
    format: Literal["auto", "parquet", "jsonl", "csv", "arrow", "openai-batch", "hf-dataset"] = _f(
        "auto", help="file format; auto picks by suffix (.parquet, .jsonl/.json, .csv, .arrow; compressed .gz .zst "
                     ".bz2 .xz) and reads a datasets save_to_disk directory; openai-batch: an OpenAI Batch API / "
                     "vllm run-batch JSONL file of requests, run as it is; hf-dataset: input.path names a Hugging "
                     "Face dataset already in the local cache"
    )
    split: str | None = _f(None, help="split of a datasets directory (save_to_disk of a DatasetDict) or of an "
                                      "hf-dataset; needed when there are several")
    config: str | None = _f(None, help="configuration (subset) of an hf-dataset")
    text_column: str = _f("text", help="column holding the document text")
    messages_column: str | None = _f(
        None, help="column holding a chat as a list of {role, content} (or its JSON text); used instead of "
                   "text_column and prompt.user"
    )
    system_column: str | None = _f(None, help="column holding a per-row system message (chat mode); "
                                              "null values fall back to prompt.system")
    id_column: str | None = _f(None, help="column holding a unique row id; default '<file>:<row>'")
    passthrough: list[str] = _f([], help="input columns copied unchanged into the results")
    invalid_utf8: Literal["replace", "fail"] = _f(
        "replace", help="JSONL/CSV rows with invalid UTF-8: decode with U+FFFD (counted) or fail the row"
    )


@dataclass(kw_only=True)
class PromptConfig:
    mode: Literal["chat", "raw"] = _f(
        "chat", help="chat: apply the model's chat template; raw: the rendered user template as-is"
    )
    system: str | None = _f(None, help="system message (chat mode)")
    user: str = _f("{text}", help="user message template: {text} and any input column as {name}")
    chat_template_kwargs: dict[str, Any] = _f(
        {}, help="extra chat template variables, e.g. enable_thinking: false"
    )
    too_long: Literal["truncate", "fail"] = _f(
        "truncate",
        help="input over max_model_len - max_tokens: keep head and tail (status truncated) or fail the row",
    )


@dataclass(kw_only=True)
class ModelConfig:
    path: str = _f(help="model directory (Hugging Face layout) or name")
    engine: str = _f("vllm", help="engine: vllm (vllm.LLM in-process) or hf (transformers generate); plugins add "
                                  "more (SHARDINFER_PLUGINS)", choices=_engine_choices)
    tokenizer: str | None = _f(None, help="tokenizer directory; default: model path")
    dtype: str = _f("auto", help="auto, bfloat16, float16 (or half) or float32 (or float)")
    max_model_len: int | None = _f(None, help="context length; default: the model's")
    vllm_args: dict[str, Any] = _f(
        {}, help="passed through to vllm.LLM, e.g. tensor_parallel_size, quantization, kv_cache_dtype, "
                 "gpu_memory_utilization (used by engine vllm only)",
    )
    hf_args: dict[str, Any] = _f(
        {}, help="passed through to from_pretrained, e.g. device_map, attn_implementation (engine hf only)"
    )
    lora: dict[str, str] = _f(
        {}, help="LoRA adapters by name: {name: adapter directory (PEFT layout)}; a row picks one with "
                 "model.lora_column or, in an OpenAI batch file, its body's model"
    )
    lora_column: str | None = _f(None, help="column naming a row's adapter (a key of model.lora); null: the base model")
    served_name: str | None = _f(
        None, help="the model name OpenAI batch requests must give (body.model); default: model.path or its "
                   "last component"
    )
    hf_batch_tokens: int | None = _f(
        None, help="hf engine: token budget of one padded batch (prompt + max_tokens per row); default: what "
                   "80% of the free GPU memory holds (32768 on CPU); halved on out-of-memory"
    )


@dataclass(kw_only=True)
class StructuredConfig:
    json_schema: Any = _f(None, help="JSON schema every output must match (a mapping, or its JSON text)")
    regex: str | None = _f(None, help="regular expression every output must match")
    choice: list[str] | None = _f(None, help="the output is exactly one of these strings")
    grammar: str | None = _f(None, help="EBNF/GBNF grammar every output must follow")
    json_object: bool = _f(False, help="the output is some JSON object")


@dataclass(kw_only=True)
class SamplingConfig:
    max_tokens: int = _f(256, help="maximum output tokens per row")
    temperature: float = _f(0.0, help="0 = greedy")
    top_p: float = _f(1.0, help="nucleus sampling")
    top_k: int | None = _f(None, help="top-k sampling; null = off")
    seed: int | None = _f(0, help="sampling seed (same seed + config = same outputs)")
    stop: list[str] = _f([], help="stop strings")
    ignore_eos: bool = _f(False, help="keep generating after EOS up to max_tokens")
    n: int = _f(1, help="outputs per row; above 1 the results get an 'outputs' list column (output is the first)")
    logprobs: int | None = _f(
        None, help="log-probabilities of the chosen tokens plus this many top alternatives per token (0: chosen "
                   "only; null: off), in a 'logprobs' list column"
    )
    structured: StructuredConfig = _f(StructuredConfig, help="constrained decoding for every row (one of its keys)")
    per_row: dict[str, str] = _f(
        {}, help="options read from columns, per row: {option: column}, e.g. {max_tokens: budget, json_schema: "
                 "schema}; options: max_tokens, temperature, top_p, top_k, seed, stop, n, logprobs, "
                 "presence_penalty, frequency_penalty, json_schema, regex, choice, grammar"
    )


@dataclass(kw_only=True)
class RunConfig:
    directory: str | None = _f(None, help="run directory, on a POSIX filesystem (local or shared: the ledger needs "
                                          "atomic create and rename); default runs/<config name> (runs/<name>-<config "
                                          "hash> if that holds another config)")
    output: str | None = _f(None, help="where the reduce also writes the merged results (and the OpenAI batch output "
                                       "file): a directory or a URL such as s3://bucket/results/run-1")
    workers: int | None = _f(
        None, help="local worker processes; default one per model replica on visible GPUs, else 1"
    )
    unit_tokens: int | None = _f(
        None, help="target estimated tokens per work unit; default total / (8 x workers)"
    )
    max_unit_rows: int = _f(4096, help="upper bound on rows per work unit")
    env: dict[str, str] = _f({}, help="environment variables set in every worker")
    log_interval_s: float = _f(30.0, help="seconds between progress lines when not on a terminal")
    metrics_interval_s: float = _f(
        30.0, help="seconds between rewrites of a worker's metrics file (status, report) while it works"
    )
    lease_timeout_s: float = _f(
        300.0, help="a claimed unit whose worker sent no heartbeat for this long is taken over by another"
    )
    max_attempts: int = _f(3, help="tries (with backoff) of a unit the engine fails entirely before its rows fail")
    results_row_group_rows: int = _f(
        1_048_576, help="rows per row group of the merged results (files hold up to 8 row groups); the reduce "
                        "holds one row group in memory"
    )
    expected_tokens_per_s: float | None = _f(
        None, help="total tokens/s one worker (model replica) is expected to do: plan's GPU-hour and cost estimate "
                   "uses it; default: the project's table of measured figures by model size"
    )
    report_to: list[Literal["mlflow", "wandb"]] = _f(
        [], help="also push each worker's metrics to these trackers, set up their own way (MLFLOW_TRACKING_URI, "
                 "WANDB_PROJECT/WANDB_MODE); needs pip install 'shardinfer[monitor]'"
    )
    gpu_hour_price: float | None = _f(
        None, help="price of one GPU-hour (worker-hour on CPU); the report then gives the cost per million tokens"
    )


@dataclass(kw_only=True)
class SlurmConfig:
    shape: Literal["job", "array"] = _f(
        "job", help="job: one multi-node job, srun starts a worker per replica; array: one array task per worker"
    )
    nodes: int = _f(1, help="nodes (job shape); array shape: nodes' worth of workers")
    gpus_per_node: int = _f(0, help="GPUs per node; replicas per node = gpus_per_node / GPUs per replica")
    cpu_workers_per_node: int = _f(1, help="workers per node when gpus_per_node is 0")
    cpus_per_task: int = _f(8, help="CPUs per worker")
    mem_gb: int | None = _f(None, help="memory in GB per node (job shape) or per array task; null: the partition's default")
    time_min: int = _f(60, help="time limit of the worker job (or of each array task), minutes")
    partition: str | None = _f(None, help="partition (-p)")
    account: str | None = _f(None, help="account (-A)")
    qos: str | None = _f(None, help="quality of service (--qos)")
    constraint: str | None = _f(None, help="node features (-C)")
    array_parallelism: int | None = _f(None, help="array shape: at most this many tasks at once (%N)")
    extra_sbatch: list[str] = _f([], help="more sbatch options for the worker job, e.g. --exclusive")
    setup: list[str] = _f([], help="shell lines run before the workers and the reduce: module load, venv activation")
    python: str | None = _f(None, help="python on the nodes; default: the one running shardinfer submit")
    mpi_start: Literal["srun", "mpirun"] = _f(
        "srun", help="submit --launcher mpi: start the ranks with srun --mpi=pmix, or mpirun inside the job"
    )
    signal_grace_s: int = _f(
        300, help="SLURM sends USR2 this long before the time limit: workers commit their unit, the job requeues"
    )
    requeue: bool = _f(True, help="requeue the worker job after a USR2 drain (time limit, preemption notice)")
    reduce_time_min: int = _f(60, help="time limit of the reduce job, minutes")
    reduce_cpus: int = _f(2, help="CPUs of the reduce job")
    reduce_mem_gb: int | None = _f(None, help="memory of the reduce job in GB")


@dataclass(kw_only=True)
class OutputConfig:
    openai_batch: bool | None = _f(
        None, help="also write results/openai-batch-output.jsonl in the Batch API's output format (one line per "
                   "request, in input order); default: when input.format is openai-batch"
    )


@dataclass(kw_only=True)
class Config:
    input: InputConfig = _f(help="what to read")
    prompt: PromptConfig = _f(help="how rows become prompts")
    model: ModelConfig = _f(help="which model and engine")
    sampling: SamplingConfig = _f(help="generation parameters")
    run: RunConfig = _f(help="where and how wide to run", results=False)
    slurm: SlurmConfig = _f(help="cluster resources for shardinfer submit", results=False)
    output: OutputConfig = _f(help="extra result files written by the reduce", results=False)
    name: str = _f("run", help="run name: letters, digits, . _ - (default: the config file's stem)", results=False)


_DEFAULT_SECTIONS = ("prompt", "sampling", "run", "slurm", "output")
MAX_YAML_DEPTH = 100  # nesting levels of a config file or override value
MAX_YAML_NODES = 100_000  # values of a config file or override value, aliases expanded
MAX_WORKERS = 100_000
MAX_SEED = 2**32 - 1  # vLLM seeds numpy with the engine seed
DTYPES = ("auto", "bfloat16", "float16", "half", "float32", "float")  # what vLLM and torch both accept
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # characters no one-line value may hold


class _Refused(yaml.YAMLError):
    """A YAML document a config never needs: too deep, too large once aliases are expanded, or with a
    key given twice."""


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses documents nested deeper than :data:`MAX_YAML_DEPTH`, holding
    more than :data:`MAX_YAML_NODES` values once aliases are expanded (an alias bomb), aliases to a
    node that holds them (a recursive structure), and keys given twice in one mapping."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> values in it, aliases expanded

    def compose_node(self, parent: Any, index: Any) -> Any:
        mark = self.peek_event().start_mark
        if self.check_event(yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if id(node) not in self._sizes:
                raise _Refused(f"line {mark.line + 1}: an alias refers to a value that holds it (a recursive "
                               f"structure); write the value out instead")
            return node
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise _Refused(f"line {mark.line + 1}: nested more than {MAX_YAML_DEPTH} levels deep; a config needs a "
                           f"few levels: flatten it")
        node = super().compose_node(parent, index)
        self._depth -= 1
        self._sizes[id(node)] = size = 1 + sum(self._sizes[id(child)] for child in _children(node))
        if size > MAX_YAML_NODES:
            raise _Refused(f"line {mark.line + 1}: more than {MAX_YAML_NODES:,} values once its aliases (*name) are "
                           f"expanded; write the values out or use fewer aliases")
        return node

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # <<: *base, whose keys the mapping may override
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the constructor refuses it
                continue
            if first is not None:
                raise _Refused(f"line {line}: key {key!r} is given twice in one mapping (first on line {first}); "
                               f"keep one of them")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _children(node: Any) -> list[Any]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def load_yaml(text: str) -> Any:
    """A YAML value as a config holds it (raises ``yaml.YAMLError``; see :class:`_ConfigLoader`)."""
    loader = _ConfigLoader(text)
    try:
        return loader.get_single_data()
    except ValueError as exc:  # a value Python will not convert, e.g. an integer of 5,000 digits
        raise _Refused(f"a value cannot be read ({exc}); shorten it") from None
    finally:
        loader.dispose()


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}: not UTF-8 text: byte 0x{data[exc.start]:02x} on line {line} ({exc.reason}). "
                          f"Save the file as UTF-8, e.g. iconv -f latin1 -t utf-8 {path}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file, apply ``key.sub=value`` overrides and check the whole tree."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = load_yaml(_read_utf8(path)) or {}
    except _Refused as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    raw.setdefault("name", default_name(path))
    return config_from_dict(raw, overrides)


def default_name(path: Path) -> str:
    """The run name a config file gives when it sets none: its stem, as a simple name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).lstrip(".") or "run"


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Build a checked :class:`Config` from a plain mapping plus overrides."""
    raw = _deep_copy(raw)
    for item in overrides or []:
        apply_override(raw, item, text_keys=_text_keys())
    for section in _DEFAULT_SECTIONS:
        raw.setdefault(section, {})
    config = _build(Config, raw, "")
    _check_values(config)
    return config


def _check_values(config: Config) -> None:
    """Range checks that types alone cannot express."""
    positive = {
        "sampling.max_tokens": config.sampling.max_tokens,
        "run.max_attempts": config.run.max_attempts,
        "run.max_unit_rows": config.run.max_unit_rows,
        "run.results_row_group_rows": config.run.results_row_group_rows,
    }
    optional = {
        "run.workers": config.run.workers,
        "run.unit_tokens": config.run.unit_tokens,
        "model.max_model_len": config.model.max_model_len,
        "model.hf_batch_tokens": config.model.hf_batch_tokens,
        "slurm.array_parallelism": config.slurm.array_parallelism,
        "slurm.mem_gb": config.slurm.mem_gb,
    }
    positive.update({f"slurm.{k}": getattr(config.slurm, k) for k in (
        "nodes", "cpu_workers_per_node", "cpus_per_task", "time_min", "reduce_time_min", "reduce_cpus")})
    for key, value in {**positive, **{k: v for k, v in optional.items() if v is not None}}.items():
        if value < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")
    if config.slurm.gpus_per_node < 0:
        raise ConfigError(f"slurm.gpus_per_node: must be >= 0, got {config.slurm.gpus_per_node}")
    _check_limits(config)
    _check_names(config)
    _check_slurm_text(config)
    if config.run.directory and "://" in config.run.directory and not config.run.directory.startswith("file://"):
        raise ConfigError(f"run.directory: {config.run.directory} is not a POSIX filesystem path. The run directory "
                          f"(ledger, parts) needs atomic create and rename: keep it on a local or shared filesystem "
                          f"and set run.output to {config.run.directory} to have the results written there.")
    if config.run.expected_tokens_per_s is not None and config.run.expected_tokens_per_s <= 0:
        raise ConfigError(f"run.expected_tokens_per_s: must be above 0, got {config.run.expected_tokens_per_s}")
    if config.run.gpu_hour_price is not None and config.run.gpu_hour_price < 0:
        raise ConfigError(f"run.gpu_hour_price: must be >= 0, got {config.run.gpu_hour_price}")
    if config.sampling.temperature < 0:
        raise ConfigError(f"sampling.temperature: must be >= 0, got {config.sampling.temperature}")
    if not 0 < config.sampling.top_p <= 1:
        raise ConfigError(f"sampling.top_p: must be in (0, 1], got {config.sampling.top_p}")
    for name in config.input.passthrough:
        if name in RESERVED:
            raise ConfigError(
                f"input.passthrough: {name!r} is a results column already. Remove it"
                + (" (the id column is the results' id)" if name == config.input.id_column else "")
                + f"; results columns are: {', '.join(CONTRACT)}."
            )
    _check_requests(config)
    max_len = config.model.max_model_len
    if max_len is not None and config.sampling.max_tokens >= max_len:
        raise ConfigError(
            f"sampling.max_tokens ({config.sampling.max_tokens}) must be below model.max_model_len "
            f"({max_len}): no room is left for the prompt. Lower max_tokens or raise max_model_len."
        )


def _check_limits(config: Config) -> None:
    """Upper bounds, durations, and values the engines take only from a short list."""
    workers = config.run.workers
    if workers is not None and workers > MAX_WORKERS:
        raise ConfigError(f"run.workers: at most {MAX_WORKERS:,} local worker processes, got {workers:,}; lower it "
                          f"(one per model replica is usual)")
    for key in ("lease_timeout_s", "log_interval_s", "metrics_interval_s"):
        if (seconds := getattr(config.run, key)) <= 0:
            raise ConfigError(f"run.{key}: must be above 0 seconds, got {seconds}; leave it out for the default")
    if not 0 <= config.slurm.signal_grace_s <= 65535:  # SLURM's range for --signal=...@seconds
        raise ConfigError(f"slurm.signal_grace_s: must be 0 to 65535 seconds, got {config.slurm.signal_grace_s}")
    seed = config.sampling.seed
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"sampling.seed: must be 0 to {MAX_SEED} (2**32 - 1, what the engines' random generators "
                          f"take), got {seed}; pick a seed in that range, or null for none")
    if config.model.dtype not in DTYPES:
        raise ConfigError(f"model.dtype: {config.model.dtype!r} is not a dtype the engines load. Valid: "
                          f"{', '.join(DTYPES)}; for quantized weights set model.vllm_args.quantization (e.g. fp8)")


def _check_names(config: Config) -> None:
    """The run name becomes a directory under runs/ and a job name; input.path names something; paths are
    one line."""
    if not _NAME.fullmatch(config.name):
        raise ConfigError(f"name: {config.name!r} is not a simple name; use letters, digits, '.', '_' and '-' (not "
                          f"starting with '.'), e.g. name=summarize-v2. The default is the config file's name. To "
                          f"put the run elsewhere, set run.directory")
    if not config.input.path.strip():
        raise ConfigError("input.path: is empty; give the corpus: a file, a directory or a glob, e.g. "
                          "input.path=data/docs.jsonl")
    for key, value in (("run.directory", config.run.directory), ("run.output", config.run.output),
                       ("slurm.python", config.slurm.python)):
        if value is not None and CONTROL.search(value):
            raise ConfigError(f"{key}: {value!r} holds a control character (newline, tab, NUL...); remove it")


def _check_slurm_text(config: Config) -> None:
    """Values written into the batch scripts: one line each, and environment names the shell takes."""
    s = config.slurm
    sbatch = {"slurm.partition": s.partition, "slurm.account": s.account, "slurm.qos": s.qos,
              "slurm.constraint": s.constraint,
              **{f"slurm.extra_sbatch[{i}]": line for i, line in enumerate(s.extra_sbatch)}}
    for key, value in sbatch.items():
        if value is not None and CONTROL.search(value):
            raise ConfigError(f"{key}: {value!r} holds a control character (newline, tab, NUL...); an #SBATCH option "
                              f"is one line: give one option per entry, without line breaks")
    for i, line in enumerate(s.setup):
        if "\0" in line:
            raise ConfigError(f"slurm.setup[{i}]: {line!r} holds a NUL character; remove it")
    for name, value in config.run.env.items():
        if not _ENV_NAME.fullmatch(name):
            raise ConfigError(f"run.env: {name!r} is not an environment variable name; use letters, digits and "
                              f"'_', not starting with a digit, e.g. HF_HOME")
        if "\0" in value:
            raise ConfigError(f"run.env.{name}: {value!r} holds a NUL character, which no environment can hold; "
                              f"remove it")


def _check_requests(config: Config) -> None:
    """Request options, the input modes that go together, and what the engine can do."""
    from shardinfer.engines.registry import engines, get_engine
    from shardinfer.requests.row_options import OptionError, check_config

    try:
        options = check_config(config.sampling)
    except OptionError as exc:
        raise ConfigError(str(exc)) from exc
    i, per_row = config.input, config.sampling.per_row
    if i.format == "openai-batch":
        for key, value in (("input.messages_column", i.messages_column), ("input.system_column", i.system_column),
                           ("input.passthrough", i.passthrough), ("sampling.per_row", per_row),
                           ("model.lora_column", config.model.lora_column)):
            if value:
                raise ConfigError(f"{key}: an OpenAI batch file carries each request whole (messages, options, "
                                  f"model); remove {key} or set input.format to jsonl")
    if i.messages_column and config.prompt.user != "{text}":
        raise ConfigError("prompt.user: a template does not apply to input.messages_column (the chat is sent as "
                          "it is); remove prompt.user or use input.text_column")
    _check_template(config)
    if config.model.lora_column and not config.model.lora:
        raise ConfigError("model.lora_column: no adapters are named; set model.lora: {name: adapter directory}")
    spec = get_engine(config.model.engine)
    needs = {
        "structured output (sampling.structured, sampling.per_row)": ("structured_output", options.structured
                                                                      or set(per_row) & {"json_schema", "regex",
                                                                                         "choice", "grammar"}),
        "LoRA adapters (model.lora)": ("lora", config.model.lora),
        "n > 1 (sampling.n, sampling.per_row.n)": ("samples", options.n > 1 or "n" in per_row),
        "logprobs (sampling.logprobs, sampling.per_row.logprobs)": ("logprobs", options.logprobs is not None
                                                                    or "logprobs" in per_row),
        "penalties (sampling.per_row)": ("penalties", set(per_row) & {"presence_penalty", "frequency_penalty"}),
    }
    for what, (capability, wanted) in needs.items():
        if wanted and not getattr(spec.capabilities, capability):
            able = [name for name, s in engines().items() if getattr(s.capabilities, capability)]
            raise ConfigError(f"model.engine: {spec.name} does not support {what}. Use model.engine="
                              f"{' or '.join(able) or '(no registered engine)'}, or drop the setting.")


def _check_template(config: Config) -> None:
    """The user template: not empty where it is the prompt, and plain ``{column}`` fields only."""
    from shardinfer.requests.prompts import template_fields  # prompts imports this module

    template_fields(config.prompt.user)
    if not (config.input.messages_column or config.input.format == "openai-batch") and not config.prompt.user.strip():
        raise ConfigError("prompt.user: the template is empty, so every prompt would be empty; give a template "
                          "such as prompt.user='{text}' or 'Summarize: {text}'")


def apply_override(raw: dict[str, Any], item: str, text_keys: frozenset[str] = frozenset()) -> None:
    """Set ``a.b.c=value`` in a raw mapping; the value is parsed as YAML (``2`` is an int), except
    for the text settings (``text_keys``), whose value is taken as it is written: ``prompt.user={text}``
    is the template ``{text}`` (quotes around the whole value are removed; ``null`` unsets it)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. run.workers=2")
    _check_utf8(item)
    if key.strip() in text_keys:
        value: Any = _text_value(text)
    else:
        try:
            value = load_yaml(text) if text.strip() else ""
        except _Refused as exc:
            raise ConfigError(f"override {item!r}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}. If it is text, quote it: "
                              f"{key.strip()}='{text}'") from exc
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _text_value(text: str) -> str | None:
    if text.strip() in ("null", "~"):
        return None
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        try:
            return str(load_yaml(text))
        except yaml.YAMLError as exc:
            raise ConfigError(f"quoted text {text!r} is not one quoted value ({exc}); quote the whole value once, "
                              f"or leave the quotes out") from None
    return text


def _check_utf8(item: str) -> None:
    """Command-line arguments that are not UTF-8 reach Python as lone surrogates."""
    try:
        item.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"override {item!r}: not UTF-8 text (at character {exc.start + 1}); pass overrides as "
                          f"UTF-8 text") from None


def _text_keys(cls: type | None = None, prefix: str = "") -> frozenset[str]:
    """Dotted keys of the settings that hold text (``str`` or ``str | None``)."""
    cls = cls or Config
    keys: set[str] = set()
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            keys |= _text_keys(tp, f"{prefix}{name}.")  # type: ignore[arg-type]
        elif tp is str or (typing.get_origin(tp) in (Union, types.UnionType) and set(typing.get_args(tp)) == {str, type(None)}):
            keys.add(prefix + name)
    return frozenset(keys)


def config_to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def results_settings(config: Config) -> dict[str, Any]:
    """The settings that decide a run's outputs: the config less every ``results=False`` field."""
    return _results_part(config)


def _results_part(node: Any) -> Any:
    if not dataclasses.is_dataclass(node) or isinstance(node, type):
        return _deep_copy(node)
    return {f.name: _results_part(getattr(node, f.name)) for f in dataclasses.fields(node)
            if f.metadata.get("results", True)}


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True)


def field_help(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field: the config reference."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(field_help(hints[f.name], key + "."))
            continue
        default = _default_of(f)
        help_text = f.metadata["help"]
        if f.metadata.get("choices"):
            help_text += f" (registered: {', '.join(f.metadata['choices']())})"
        rows.append((key, "required" if default is dataclasses.MISSING else repr(default), help_text))
    return rows


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(raw, fields, where)
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name not in raw:
            if _default_of(f) is dataclasses.MISSING:
                raise ConfigError(f"{key} is required: {f.metadata['help']}")
            continue
        kwargs[name] = _coerce(hints[name], raw[name], key)
        _check_choice(f, kwargs[name], key)
    return cls(**kwargs)


def _check_choice(f: dataclasses.Field, value: Any, key: str) -> None:
    choices = f.metadata.get("choices")
    if choices is not None and value not in (valid := choices()):
        raise ConfigError(f"{key}: {value!r} is not a valid choice. Valid choices: {', '.join(valid)}")


def _reject_unknown(raw: dict, fields: dict, where: str) -> None:
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            full = f"{where}.{key}" if where else str(key)
            raise ConfigError(f"unknown key {full!r}.{hint} Valid keys{' of ' + where if where else ''}: "
                              f"{', '.join(fields)}")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, key)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not a valid choice. Valid choices: {', '.join(map(str, args))}")
        return value
    if origin is list:
        return _coerce_list(args[0], value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r} ({type(value).__name__})")
        return {str(k): (str(v) if args[1] is str else v) for k, v in value.items()}
    return _coerce_scalar(tp, value, key)


def _coerce_list(item_type: Any, value: Any, key: str) -> list:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list, got {value!r} ({type(value).__name__}){_mapping_hint(value)}")
    return [_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]


def _coerce_scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return _finite(value, key)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r} ({type(value).__name__}){_mapping_hint(value)}")


def _finite(value: int | float, key: str) -> float:
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}; give an ordinary number such as 0.5")
    return number


def _mapping_hint(value: Any) -> str:
    """``{END}`` in YAML is a mapping with a null value: the user most likely meant text."""
    if isinstance(value, dict) and value and all(v is None for v in value.values()):
        text = "{" + ", ".join(map(str, value)) + "}"
        return f". {text} was read as a mapping: quote it to mean text ('{text}')"
    return ""
