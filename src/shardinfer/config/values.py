"""Checks of a config's values that need nothing but the config: ranges, limits, names, and text
that ends up in batch scripts. Checks against the engines, the prompt templates and the results
columns are :mod:`shardinfer.planning.validate`'s."""

from __future__ import annotations

import re

from shardinfer.config.schema import Config
from shardinfer.errors import ConfigError

MAX_WORKERS = 100_000
MAX_SEED = 2**32 - 1  # vLLM seeds numpy with the engine seed
DTYPES = ("auto", "bfloat16", "float16", "half", "float32", "float")  # what vLLM and torch both accept
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # characters no one-line value may hold


def check_values(config: Config) -> None:
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
        "nodes", "nodes_per_replica", "cpu_workers_per_node", "cpus_per_task", "time_min", "reduce_time_min", "reduce_cpus")})
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
    _check_task(config)
    max_len = config.model.max_model_len
    if config.task == "generate" and max_len is not None and config.sampling.max_tokens >= max_len:
        raise ConfigError(
            f"sampling.max_tokens ({config.sampling.max_tokens}) must be below model.max_model_len "
            f"({max_len}): no room is left for the prompt. Lower max_tokens or raise max_model_len."
        )


def _check_task(config: Config) -> None:
    """The settings a task needs, and none of another task's."""
    task, pooling, inp = config.task, config.pooling, config.input
    if pooling.dimensions is not None and pooling.dimensions < 1:
        raise ConfigError(f"pooling.dimensions: must be at least 1, got {pooling.dimensions}")
    asked = {"pooling.query": pooling.query is not None, "input.pair_column": inp.pair_column is not None,
             "pooling.dimensions": pooling.dimensions is not None, "pooling.normalize": pooling.normalize is not None,
             "pooling.embedding_dtype": pooling.embedding_dtype != "float32",
             "pooling.activation": pooling.activation is not None}
    allowed = _TASK_KEYS.get(task, set())
    for key in sorted(k for k, on in asked.items() if on and k not in allowed):
        users = [t for t, keys in _TASK_KEYS.items() if key in keys]
        raise ConfigError(f"{key}: is a setting of task {' or '.join(users)}, not of task {task}; remove it or set "
                          f"task: {users[0]}")
    if task == "score":
        _check_score(config)
    if task == "reward" and inp.messages_column is None and inp.pair_column is None:
        raise ConfigError("task reward: say what is scored: input.pair_column (the response; the row's text is the "
                          "prompt) or input.messages_column (the whole conversation)")
    if task != "generate" and config.model.lora:
        raise ConfigError(f"model.lora: adapters are for task generate; task {task} runs the base model. Remove "
                          f"model.lora or merge the adapter into the model")


_TASK_KEYS = {"embed": {"pooling.dimensions", "pooling.normalize", "pooling.embedding_dtype"},
              "classify": {"pooling.activation"},
              "score": {"pooling.query", "input.pair_column", "pooling.activation"},
              "reward": {"input.pair_column", "pooling.activation"}}


def _check_score(config: Config) -> None:
    inp = config.input
    if (inp.pair_column is None) == (config.pooling.query is None) and inp.format != "openai-batch":
        raise ConfigError("task score: give the pairs one way: input.pair_column (each row's query is its text, the "
                          "column holds its document) or pooling.query (one query, each row's text a document)")
    if inp.messages_column is not None:
        raise ConfigError("input.messages_column: task score reads text pairs, not chats; use input.text_column "
                          "and input.pair_column")


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
                          f"{', '.join(DTYPES)}; for quantized weights set model.engine_args.quantization (e.g. fp8, vllm)")


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
