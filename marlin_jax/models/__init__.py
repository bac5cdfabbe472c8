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
from .layers import (
    Attention,
    Block,
    FixedEmbedding,
    Mlp,
    PatchEmbedding3d,
    patchify,
    sincos_table,
    unpatchify,
    video_to_float,
)
from .marlin import (
    LAYERS_KEY,
    REMAT_POLICIES,
    MarlinDecoder,
    MarlinDiscriminator,
    MarlinEncoder,
    MarlinModel,
    is_stacked,
    remat_policy_fn,
    split_by_mask,
    stack_layers,
    unstack_layers,
)

__all__ = [
    "LAYERS_KEY", "REMAT_POLICIES", "RELEASE_URL", "Attention", "Block", "FixedEmbedding", "MarlinConfig",
    "MarlinDecoder", "MarlinDiscriminator", "MarlinEncoder", "MarlinModel", "Mlp", "PatchEmbedding3d",
    "config_from_mapping", "config_from_yaml", "get_config", "is_stacked", "model_names", "patchify",
    "register_model", "register_model_from_config", "register_model_from_yaml", "remat_policy_fn",
    "sincos_table", "split_by_mask", "stack_layers", "unpatchify", "unstack_layers",
    "video_to_float",
]
