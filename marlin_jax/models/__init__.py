"""Flax NNX modules of MARLIN and the registry of named model configurations."""

from .config import (
    RELEASE_URL,
    MarlinConfig,
    config_from_mapping,
    config_from_yaml,
    get_config,
    model_names,
    register_model,
    register_model_from_config,
    register_model_from_yaml,
)
from .layers import patchify, sincos_table, unpatchify, video_to_float
from .marlin import (
    REMAT_POLICIES,
    MarlinDecoder,
    MarlinDiscriminator,
    MarlinEncoder,
    MarlinModel,
    is_stacked,
    split_by_mask,
    stack_layers,
    unstack_layers,
)

__all__ = [
    "REMAT_POLICIES", "RELEASE_URL", "MarlinConfig", "MarlinDecoder", "MarlinDiscriminator", "MarlinEncoder",
    "MarlinModel", "config_from_mapping", "config_from_yaml", "get_config", "is_stacked", "model_names", "patchify",
    "register_model", "register_model_from_config", "register_model_from_yaml", "sincos_table", "split_by_mask",
    "stack_layers", "unpatchify", "unstack_layers", "video_to_float",
]
