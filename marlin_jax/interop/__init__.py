"""Interoperability with PyTorch MARLIN checkpoints and their Hugging Face port (torch-free, no
pickled code is ever run)."""

from .checkpoints import (
    CheckpointError,
    read_config_file,
    read_state_dict,
    read_torch_state_dict,
    save_marlin_checkpoint,
    save_torch_checkpoint,
    write_config_file,
)
from .hf import is_hf_checkpoint, load_checkpoint, read_weights, resolve_checkpoint_config, save_hf_checkpoint
from .mapping import (
    StateDictMismatchError,
    model_from_state_dict,
    model_to_state_dict,
    state_dict_to_model,
    videomae_to_marlin,
)

__all__ = [
    "CheckpointError", "StateDictMismatchError", "is_hf_checkpoint", "load_checkpoint", "model_from_state_dict",
    "model_to_state_dict", "read_config_file", "read_state_dict", "read_torch_state_dict", "read_weights",
    "resolve_checkpoint_config", "save_hf_checkpoint", "save_marlin_checkpoint", "save_torch_checkpoint",
    "state_dict_to_model", "videomae_to_marlin", "write_config_file",
]
