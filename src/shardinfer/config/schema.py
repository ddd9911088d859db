"""The configuration tree: one keyword-only dataclass per section, each field with a one-line help
text and whether it changes a run's results.

What changes a run's results is declared here, once: every field does, except those whose metadata
says ``results=False`` (the ``run``, ``slurm`` and ``output`` sections and ``name``: where, how wide
and how long to run). :func:`results_settings` is that part of a config; the run fingerprint, the
default run directory and the check before a run is continued all use it, so a resubmission with
more nodes continues the same run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union


def _f(default: Any = dataclasses.MISSING, help: str = "", *, results: bool = True, added: bool = False) -> Any:
    """A dataclass field with a help text and whether it changes results. Mutable defaults go
    through ``default_factory``. ``added``: a setting newer than some run directories, left out of
    :func:`results_settings` while it has its default, so those runs still compare equal."""
    metadata = {"help": help, "results": results, "added": added}
    if isinstance(default, type) and dataclasses.is_dataclass(default):  # a sub-section with its defaults
        return field(default_factory=default, metadata=metadata)
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=metadata)
    return field(default=default, metadata=metadata)


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
    pair_column: str | None = _f(
        None, help="task score: column holding the document scored against the row's text (the query); task "
                   "reward: column holding the response to the row's text (the prompt)", added=True
    )
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
                                  "more (SHARDINFER_PLUGINS)")
    tokenizer: str | None = _f(None, help="tokenizer directory; default: model path")
    dtype: str = _f("auto", help="auto, bfloat16, float16 (or half) or float32 (or float)")
    max_model_len: int | None = _f(None, help="context length; default: the model's")
    engine_args: dict[str, Any] = _f(
        {}, help="passed through to the engine that runs: vllm.LLM arguments for vllm (e.g. tensor_parallel_size, "
                 "quantization, kv_cache_dtype, gpu_memory_utilization), from_pretrained arguments for hf (e.g. "
                 "device_map, attn_implementation), a plugin engine's own; model.vllm_args and model.hf_args, "
                 "their earlier names, still load (with a warning)"
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
class PoolingConfig:
    normalize: bool | None = _f(None, help="task embed: L2-normalise embeddings; null: what the model's pooling does "
                                           "(sentence-transformers Normalize module, vLLM's default: on)")
    dimensions: int | None = _f(None, help="task embed: keep the first N dimensions (Matryoshka models), "
                                           "renormalised; null: all")
    embedding_dtype: Literal["float32", "float16"] = _f("float32", help="task embed: type of the embedding column")
    query: str | None = _f(None, help="task score: one query scored against every row's text (instead of "
                                      "input.pair_column)")
    activation: bool | None = _f(
        None, help="classify/score: apply the model's activation (softmax for classes, sigmoid for one logit); "
                   "null: on for classify and score, off for reward (the raw logit)"
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
    nodes_per_replica: int = _f(
        1, help="nodes one model replica spans (vLLM tensor x pipeline parallel over nodes); one worker per replica"
    )
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
        "srun", help="submit --launcher slurm-mpi: start the ranks with srun --mpi=pmix, or mpirun inside the job"
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


TASKS = ("generate", "embed", "classify", "score", "reward")
POOLING_TASKS = TASKS[1:]


@dataclass(kw_only=True)
class Config:
    task: Literal["generate", "embed", "classify", "score", "reward"] = _f(
        "generate", help="generate: text out per row; embed: an embedding per row; classify: a label and its "
                         "probabilities; score: a relevance score of (query, document) pairs (a cross-encoder); "
                         "reward: a reward model's score of (prompt, response)", added=True
    )
    input: InputConfig = _f(help="what to read")
    prompt: PromptConfig = _f(help="how rows become prompts")
    model: ModelConfig = _f(help="which model and engine")
    sampling: SamplingConfig = _f(help="generation parameters")
    pooling: PoolingConfig = _f(PoolingConfig, help="embed, classify, score and reward settings", added=True)
    run: RunConfig = _f(help="where and how wide to run", results=False)
    slurm: SlurmConfig = _f(help="cluster resources for shardinfer submit", results=False)
    output: OutputConfig = _f(help="extra result files written by the reduce", results=False)
    name: str = _f("run", help="run name: letters, digits, . _ - (default: the config file's stem)", results=False)


# Keys of earlier versions that held one engine's arguments, and that engine: now model.engine_args.
OLD_ENGINE_ARGS = {"vllm_args": "vllm", "hf_args": "hf"}


def default_of(f: dataclasses.Field) -> Any:
    """A field's default value (a fresh one for mutable defaults), or ``dataclasses.MISSING``."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def field_help(cls: type = Config, prefix: str = "", notes: dict[str, str] | None = None
               ) -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field: the config reference. ``notes`` adds text to the
    help of some keys (e.g. the engines registered now)."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(field_help(hints[f.name], key + ".", notes))
            continue
        default = default_of(f)
        help_text = f.metadata["help"] + (f" {notes[key]}" if notes and key in notes else "")
        rows.append((key, "required" if default is dataclasses.MISSING else repr(default), help_text))
    return rows


def text_settings(cls: type = Config, prefix: str = "") -> frozenset[str]:
    """Dotted keys of the settings that hold text (``str`` or ``str | None``)."""
    keys: set[str] = set()
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            keys |= text_settings(tp, f"{prefix}{name}.")  # type: ignore[arg-type]
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
        return deep_copy(node)
    return {f.name: _results_part(getattr(node, f.name)) for f in dataclasses.fields(node)
            if f.metadata.get("results", True)
            and not (f.metadata.get("added") and getattr(node, f.name) == default_of(f))}


def deep_copy(value: Any) -> Any:
    """A copy of plain data (mappings and lists of values)."""
    if isinstance(value, dict):
        return {k: deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [deep_copy(v) for v in value]
    return value
