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
)
from .marlin import (
    MarlinDecoder,
    MarlinDiscriminator,
    MarlinEncoder,
    MarlinModel,
    split_by_mask,
)

__all__ = [
    "RELEASE_URL", "Attention", "Block", "FixedEmbedding", "MarlinConfig", "MarlinDecoder", "MarlinDiscriminator",
    "MarlinEncoder", "MarlinModel", "Mlp", "PatchEmbedding3d", "config_from_mapping",
    "config_from_yaml", "get_config", "model_names", "patchify", "register_model",
    "register_model_from_config", "register_model_from_yaml", "sincos_table", "split_by_mask",
    "unpatchify",
]
