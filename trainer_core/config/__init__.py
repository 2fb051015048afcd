"""One typed config tree for a CV run: defaults <- YAML (``--config``) <- dotted overrides
(``train.lr=1e-4``).

Every field has a default and a one-line doc (``doc=`` metadata, shown by ``--help-config``). Unknown keys and values
of the wrong type fail loudly at merge time; cross-field problems are collected by :func:`validate` and reported
together.
"""

from trainer_core.config.merge import (
    apply_overrides,
    config_from_dict,
    field_docs,
    get_value,
    load_config,
    nest,
    parse_override,
    to_yaml,
)
from trainer_core.config.schema import (
    ClusterConfig,
    Config,
    ConfigError,
    DataConfig,
    LoraConfig,
    ModelConfig,
    TrackingConfig,
    TrainConfig,
)
from trainer_core.config.validate import (
    BLOCK_CAUSAL,
    PERSISTENT_REDUCTION_CAP,
    compile_options,
    inert_keys,
    inert_note,
    pad_multiple,
    validate,
)

__all__ = [
    "BLOCK_CAUSAL", "PERSISTENT_REDUCTION_CAP", "ClusterConfig", "Config", "ConfigError", "DataConfig", "LoraConfig",
    "ModelConfig", "TrackingConfig", "TrainConfig", "apply_overrides", "compile_options", "config_from_dict",
    "field_docs", "get_value", "inert_keys", "inert_note", "load_config", "nest", "pad_multiple", "parse_override",
    "to_yaml", "validate",
]
