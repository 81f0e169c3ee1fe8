"""Recipe schema (pydantic), YAML loading and dotted overrides.

Owns: :class:`Recipe` and its sections, :func:`load_recipe`, :class:`ConfigError`.
Must not import any other ``dynamo_rl`` module. (The Kubernetes infra schema lives in
``dynamo_rl.k8s.schema``.)
"""

from dynamo_rl.config.loader import ConfigError, apply_overrides, load_recipe, load_yaml
from dynamo_rl.config.schema import (
    CheckpointConfig,
    ClusterConfig,
    DynamoConfig,
    GenerationConfig,
    GRPOConfig,
    LoggingConfig,
    OptimizerConfig,
    PolicyConfig,
    Recipe,
    RefitConfig,
    SamplingConfig,
    TaskConfig,
    WarmStartConfig,
)

__all__ = [
    "CheckpointConfig", "ClusterConfig", "ConfigError", "DynamoConfig", "GRPOConfig", "GenerationConfig",
    "LoggingConfig", "OptimizerConfig", "PolicyConfig", "Recipe", "RefitConfig",
    "SamplingConfig", "TaskConfig", "WarmStartConfig", "apply_overrides", "load_recipe", "load_yaml",
]
