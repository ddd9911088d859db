"""Typed configuration tree, loaded from YAML and checked as it is built.

A leaf of shardinfer: it imports nothing of it but :mod:`shardinfer.errors`.

- :mod:`~shardinfer.config.schema`: the sections and their fields (help text, default, whether a field
  changes results), the config reference and :func:`results_settings`;
- :mod:`~shardinfer.config.load`: YAML with limits, overrides, the typed tree built from the raw
  mapping, and the earlier names of settings;
- :mod:`~shardinfer.config.values`: the value checks that need nothing but the config.

What needs the rest of shardinfer (the registered engines, prompt templates, request options, the
results columns) is checked by :func:`shardinfer.planning.validate.validate`; commands, launches and
run directories load configs through :mod:`shardinfer.planning.validate`, which applies both.
"""

from shardinfer.config.load import (
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    apply_override,
    config_from_dict,
    default_name,
    dump_config,
    load_config,
    load_yaml,
)
from shardinfer.config.schema import (
    OLD_ENGINE_ARGS,
    POOLING_TASKS,
    TASKS,
    Config,
    InputConfig,
    ModelConfig,
    OutputConfig,
    PoolingConfig,
    PromptConfig,
    RunConfig,
    SamplingConfig,
    SlurmConfig,
    StructuredConfig,
    config_to_dict,
    field_help,
    results_settings,
    text_settings,
)
from shardinfer.config.values import CONTROL, DTYPES, MAX_SEED, MAX_WORKERS, check_values

__all__ = [
    "CONTROL", "DTYPES", "MAX_SEED", "MAX_WORKERS", "MAX_YAML_DEPTH", "MAX_YAML_NODES", "OLD_ENGINE_ARGS", "POOLING_TASKS", "TASKS", "Config",
    "InputConfig", "ModelConfig", "OutputConfig", "PoolingConfig", "PromptConfig", "RunConfig", "SamplingConfig", "SlurmConfig",
    "StructuredConfig", "apply_override", "check_values", "config_from_dict", "config_to_dict", "default_name",
    "dump_config", "field_help", "load_config", "load_yaml", "results_settings", "text_settings",
]
