"""Reading and writing model weights in every supported format.

- PyTorch: ``*.encoder.pt`` / ``*.full.pt`` state_dicts, the original trainer's Lightning
  ``*.ckpt`` (``state_dict`` incl. ``discriminator.*``), VideoMAE checkpoints (``{"model": ...}``).
- marlin-jax: a directory with ``params/`` (orbax, nested by variable path) and
  ``marlin_config.json``; or a trainer workdir, its ``checkpoints/`` or one ``checkpoints/<step>/``
  (the latest step's ``state`` item: generator + critic parameters, unstacked if ``scan_layers``).

Everything funnels through a flat PyTorch-layout state_dict ``{marlin-pytorch key: np.ndarray}``.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx, traverse_util

from marlin_jax.models import MarlinConfig, MarlinModel, sincos_table, unstack_layers
from marlin_jax.models.config import config_from_json_file

from .mapping import (
    is_videomae_state_dict,
    model_to_state_dict,
    to_torch_layout,
    torch_key,
    videomae_to_marlin,
)
from .torch_format import load_torch_file, save_torch_file

CONFIG_FILE = "marlin_config.json"
PARAMS_ITEM = "params"
# The trainer-checkpoint layout (declared here, below the trainer that writes it): ``<workdir>/
# checkpoints/<step>/`` holds TRAINER_STATE_ITEM, whose MODEL_PARAM_GROUPS subtrees are the
# model's parameters, and the data-iterator item TRAINER_DATA_ITER_ITEM.
TRAINER_STATE_ITEM = "state"
TRAINER_DATA_ITER_ITEM = "data_iter"
MODEL_PARAM_GROUPS = ("g_params", "d_params")


class CheckpointError(ValueError):
    """A checkpoint file or directory cannot be used; the message names it and the problem."""


def _flat_arrays(tree: Any, source: str) -> OrderedDict[str, np.ndarray]:
    if not isinstance(tree, dict):
        raise CheckpointError(f"{source}: expected a state_dict (a mapping of names to tensors), "
                              f"got {type(tree).__name__}")
    bad = [f"{key} ({type(value).__name__})" for key, value in tree.items() if not isinstance(value, np.ndarray)]
    if bad:
        raise CheckpointError(f"{source}: state_dict entries that are not tensors: {', '.join(bad[:20])}")
    return OrderedDict((str(key), value) for key, value in tree.items())


def read_torch_state_dict(path: str | os.PathLike, config: MarlinConfig | None = None) -> OrderedDict[str, np.ndarray]:
    """A PyTorch checkpoint (`.pt`, Lightning `.ckpt`, VideoMAE: renamed, needs ``config`` for
    the position tables) -> flat MARLIN-named, PyTorch-layout state_dict."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    obj = load_torch_file(path, allow_opaque=path.endswith(".ckpt"))
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and ("model" in obj or "module" in obj) and not any(
            isinstance(v, np.ndarray) for v in obj.values()):
        obj = obj.get("model", obj.get("module"))
    state_dict = _flat_arrays(obj, path)
    if is_videomae_state_dict(state_dict):
        if config is None:
            raise CheckpointError(f"{path}: a VideoMAE checkpoint needs the model config to convert")
        state_dict = videomae_to_marlin(state_dict, config)
    return state_dict


def _holds_weights(directory: Path) -> bool:
    return (directory / PARAMS_ITEM).is_dir() or (directory / TRAINER_STATE_ITEM).is_dir()


def _resolve_marlin_dir(directory: Path) -> Path:
    """The checkpoint itself, else the latest step in it or in its ``checkpoints/``."""
    if _holds_weights(directory):
        return directory
    for candidate in (directory, directory / "checkpoints"):
        steps = [p for p in candidate.iterdir() if p.is_dir() and p.name.isdigit() and _holds_weights(p)] \
            if candidate.is_dir() else []
        if steps:
            return max(steps, key=lambda p: int(p.name))
    raise CheckpointError(f"{directory}: not a marlin-jax checkpoint (no '{PARAMS_ITEM}/' or "
                          f"'{TRAINER_STATE_ITEM}/' item and no numbered step directories holding one)")


def _restore_model_params(item: Path) -> dict:
    """The generator + critic parameters of a trainer state, read without its optimiser moments
    (orbax partial restore: a third of the bytes)."""
    import jax
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(item)
    tree_meta = getattr(getattr(meta, "item_metadata", meta), "tree", None)
    if not isinstance(tree_meta, dict) or not all(isinstance(tree_meta.get(g), dict) for g in MODEL_PARAM_GROUPS):
        raise CheckpointError(f"{item}: not a marlin-jax training state (expected "
                              f"{' and '.join(MODEL_PARAM_GROUPS)})")
    wanted = {g: tree_meta[g] for g in MODEL_PARAM_GROUPS}
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), wanted)
    restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    tree = checkpointer.restore(item, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                                   partial_restore=True))
    return {k: v for group in MODEL_PARAM_GROUPS for k, v in tree[group].items()}


def read_marlin_state_dict(directory: str | os.PathLike,
                           config: MarlinConfig | None = None) -> OrderedDict[str, np.ndarray]:
    """A marlin-jax checkpoint directory -> flat PyTorch-layout state_dict. A trainer state lacks
    the fixed position tables: they come from ``config`` (default: its ``marlin_config.json``)."""
    import orbax.checkpoint as ocp

    root = _resolve_marlin_dir(Path(directory))
    item = root / (PARAMS_ITEM if (root / PARAMS_ITEM).is_dir() else TRAINER_STATE_ITEM)
    restore = ocp.StandardCheckpointer().restore if item.name == PARAMS_ITEM else _restore_model_params
    try:
        tree = restore(item.absolute())
    except CheckpointError:
        raise
    except Exception as e:  # orbax raises many types for unreadable trees
        raise CheckpointError(f"{item}: cannot restore orbax checkpoint ({e})") from e
    try:
        tree = unstack_layers(tree)  # scan_layers states -> the per-layer layout (else unchanged)
    except ValueError as e:
        raise CheckpointError(f"{item}: {e}") from e

    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for path, value in traverse_util.flatten_dict(tree).items():
        path = tuple(int(k) if isinstance(k, str) and k.isdigit() else k for k in path)
        out[torch_key(path)] = np.ascontiguousarray(to_torch_layout(path, np.asarray(value)))
    if item.name == TRAINER_STATE_ITEM:
        config = config or read_config_file(root)
        if config is None:
            raise CheckpointError(f"{root}: a training state without {CONFIG_FILE} in its workdir; pass the "
                                  "model config to rebuild the position tables")
        for part, dim in (("encoder", config.encoder_embed_dim), ("decoder", config.decoder_embed_dim)):
            key = f"{part}.pos_embedding.emb"
            if key not in out and any(k.startswith(f"{part}.") for k in out):
                out[key] = sincos_table(config.num_tokens, dim)[None].astype(np.float32)
    return out


def read_config_file(directory: str | os.PathLike) -> MarlinConfig | None:
    """The MarlinConfig saved beside a marlin-jax checkpoint, if any (searched upwards 2 levels)."""
    d = Path(directory)
    for candidate in (d, d.parent, d.parent.parent):
        f = candidate / CONFIG_FILE
        if f.is_file():
            try:
                return config_from_json_file(f)
            except ValueError as e:  # names the file: damaged JSON, invalid values
                raise CheckpointError(str(e)) from None
    return None


def read_state_dict(path: str | os.PathLike, config: MarlinConfig | None = None) -> OrderedDict[str, np.ndarray]:
    """Any supported checkpoint (see module doc) -> flat PyTorch-layout MARLIN state_dict."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint file or directory")
    if p.is_dir():
        return read_marlin_state_dict(p, config)
    if p.suffix not in (".pt", ".pth", ".ckpt", ".bin"):
        raise CheckpointError(f"{p}: unsupported checkpoint type '{p.suffix}' (expected .pt, .pth, .ckpt "
                              f"or a marlin-jax checkpoint directory)")
    return read_torch_state_dict(p, config)


def save_marlin_checkpoint(directory: str | os.PathLike, model: MarlinModel, *, overwrite: bool = False) -> Path:
    """Writes ``directory/params`` (orbax) and ``directory/marlin_config.json``."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if (directory / PARAMS_ITEM).exists() and not overwrite:
        raise CheckpointError(f"{directory}: already holds a checkpoint (pass overwrite=True)")
    directory.mkdir(parents=True, exist_ok=True)
    tree = _string_keys(nnx.to_pure_dict(nnx.state(model, nnx.Variable)))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / PARAMS_ITEM, tree, force=overwrite)
    checkpointer.wait_until_finished()
    write_config_file(directory, model.config)
    return directory


def write_config_file(directory: str | os.PathLike, config: MarlinConfig) -> Path:
    """Writes ``directory/marlin_config.json``, which :func:`read_config_file` reads back."""
    path = Path(directory) / CONFIG_FILE
    path.write_text(json.dumps(config.to_dict(), indent=2))
    return path


def _string_keys(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    return np.asarray(tree)


def save_torch_checkpoint(path: str | os.PathLike, model: MarlinModel, *, encoder_only: bool = False,
                          with_discriminator: bool = True) -> Path:
    """Exports the model as a PyTorch state_dict `.pt` that `marlin_pytorch.Marlin.from_file` loads
    (``encoder_only`` gives the `*.encoder.pt` form). The discriminator is kept unless
    ``with_discriminator=False`` (marlin-pytorch's loader only accepts `.pt` without it)."""
    state_dict = model_to_state_dict(model)
    if encoder_only:
        state_dict = OrderedDict((k, v) for k, v in state_dict.items() if k.startswith("encoder."))
    elif not with_discriminator:
        state_dict = OrderedDict((k, v) for k, v in state_dict.items() if not k.startswith("discriminator."))
    save_torch_file(path, state_dict)
    return Path(path)
