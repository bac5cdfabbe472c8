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
from .hf import (
    checkpoint_config,
    download_hf_checkpoint,
    is_hf_checkpoint,
    load_checkpoint,
    read_hf_config,
    read_hf_state_dict,
    read_weights,
    resolve_checkpoint_config,
    save_hf_checkpoint,
)
from .mapping import (
    StateDictMismatchError,
    is_videomae_state_dict,
    model_from_state_dict,
    model_to_state_dict,
    state_dict_to_model,
    torch_key,
    videomae_to_marlin,
)

__all__ = [
    "CheckpointError", "StateDictMismatchError", "checkpoint_config", "download_hf_checkpoint",
    "is_hf_checkpoint", "is_videomae_state_dict", "load_checkpoint", "read_hf_config",
    "read_hf_state_dict", "read_weights", "resolve_checkpoint_config", "save_hf_checkpoint",
    "model_from_state_dict", "model_to_state_dict", "read_config_file", "read_state_dict",
    "read_torch_state_dict", "save_marlin_checkpoint", "save_torch_checkpoint", "state_dict_to_model",
    "write_config_file",
    "torch_key", "videomae_to_marlin",
]
