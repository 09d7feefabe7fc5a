"""Run configuration: one typed schema (``schema.py``), YAML inheritance and CLI overrides (``loader.py``)."""

from ipu_norm.config.loader import (
    ConfigError,
    config_from_dict,
    config_to_dict,
    deep_merge,
    dump_config,
    load_config,
    load_config_with_sources,
    load_yaml_tree,
    parse_override,
    validate_config,
)
from ipu_norm.config.schema import (
    Config,
    DataConfig,
    ExecutionConfig,
    FinetuneConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ExecutionConfig",
    "FinetuneConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "deep_merge",
    "dump_config",
    "load_config",
    "load_config_with_sources",
    "load_yaml_tree",
    "parse_override",
    "validate_config",
]
