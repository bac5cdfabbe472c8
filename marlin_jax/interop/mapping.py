"""Names and layouts: MARLIN PyTorch state_dicts <-> marlin-jax model variables.

Keys are marlin-pytorch 0.3.4's (`encoder.blocks.0.attn.qkv.weight`, ...) plus the original
trainer's `discriminator.layers.{0,1}.linear.*`. Linear weights ``(out, in)`` <-> ``(in, out)``, the
qkv weight ``(3D, D)`` <-> ``(D, 3, H, hd)`` (per head, for tensor parallelism; the earlier
``(D, 3D)`` kernel reads too), Conv3d ``(D, C, pt, ph, pw)`` <-> ``(pt, ph, pw, C, D)``. VideoMAE
pretraining checkpoints (MCG-NJU names) are renamed into MARLIN names.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
from flax import nnx

from marlin_jax.models import MarlinConfig, MarlinModel

from .torch_format import cast_bounded


class StateDictMismatchError(ValueError):
    """A state_dict does not fit a model: missing, unexpected or mis-shaped keys (all listed)."""


_MLP_RENAMES = (
    (re.compile(r"\.mlp\.fc1\."), ".mlp.layers.0.linear."),
    (re.compile(r"\.mlp\.fc2\."), ".mlp.layers.1.linear."),
)
_RENAMES = (
    *_MLP_RENAMES,
    (re.compile(r"^discriminator\.layers\.(\d+)\."), r"discriminator.layers.\1.linear."),
    (re.compile(r"\.kernel$"), ".weight"),
    (re.compile(r"\.scale$"), ".weight"),
    (re.compile(r"\.pos_embedding$"), ".pos_embedding.emb"),
)


def torch_key(path: tuple) -> str:
    """marlin-jax variable path -> PyTorch state_dict key."""
    key = ".".join(str(p) for p in path)
    for pattern, repl in _RENAMES:
        key = pattern.sub(repl, key)
    return key


def to_torch_layout(path: tuple, value: np.ndarray) -> np.ndarray:
    """A marlin-jax variable -> its PyTorch layout. Kernels are ``(in, *out)`` (the per-head qkv
    kernel ``(D, 3, H, hd)``, or the ``(D, 3D)`` of checkpoints written before it) -> ``(out, in)``."""
    if path[-1] == "kernel":
        if value.ndim == 5:  # (pt, ph, pw, C, D) -> (D, C, pt, ph, pw)
            return value.transpose(4, 3, 0, 1, 2)
        return value.reshape(value.shape[0], -1).T
    return value


def _from_torch_layout(path: tuple, value: np.ndarray, shape: tuple | None = None) -> np.ndarray:
    """A PyTorch-layout tensor -> the marlin-jax layout; ``shape``: the variable's shape, which
    splits a Linear's output dimension (``(3D, D)`` qkv weight -> ``(D, 3, H, hd)``)."""
    if path[-1] == "kernel":
        if value.ndim == 5:  # (D, C, pt, ph, pw) -> (pt, ph, pw, C, D)
            return value.transpose(2, 3, 4, 1, 0)
        value = value.T
        if (shape is not None and value.ndim == 2 and len(shape) > 2 and shape[0] == value.shape[0]
                and int(np.prod(shape)) == value.size):
            return value.reshape(shape)
    return value


def model_variables(model: nnx.Module) -> list[tuple[tuple, nnx.Variable]]:
    """Every variable of the model (parameters and fixed tables) with its path, sorted."""
    return sorted(((p, v) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)),
                  key=lambda item: torch_key(item[0]))


def model_to_state_dict(model: nnx.Module) -> OrderedDict[str, np.ndarray]:
    """The model's weights as a PyTorch-layout state_dict of numpy arrays (marlin-pytorch names)."""
    return OrderedDict((torch_key(path), np.ascontiguousarray(to_torch_layout(path, np.asarray(var.get_value()))))
                       for path, var in model_variables(model))


def state_dict_to_model(model: nnx.Module, state_dict: Mapping[str, np.ndarray], *,
                        strict: bool = True, source: str = "state_dict") -> None:
    """Loads a PyTorch-layout state_dict into ``model`` in place. Missing, mis-shaped and (with
    ``strict``) unexpected keys raise one StateDictMismatchError listing all (naming ``source``)."""
    expected = {torch_key(p): (p, v) for p, v in model_variables(model)}
    want = {key: tuple(var.get_value().shape) for key, (_, var) in expected.items()}
    values = {key: _from_torch_layout(path, np.asarray(state_dict[key]), want[key])
              for key, (path, _) in expected.items() if key in state_dict}
    mismatched = [f"{key}: checkpoint {np.shape(state_dict[key])} -> {value.shape}, model expects {want[key]}"
                  for key, value in values.items() if value.shape != want[key]]
    problems = [f"{what} keys ({len(keys)}): {sep.join(keys)}" for what, keys, sep in (
        ("missing", sorted(set(expected) - set(state_dict)), ", "),
        ("unexpected", sorted(set(state_dict) - set(expected)) if strict else [], ", "),
        ("mis-shaped", mismatched, "; ")) if keys]
    if problems:
        raise StateDictMismatchError(f"{source} does not fit the model:\n  " + "\n  ".join(problems))
    for key, (_, var) in expected.items():
        var.set_value(np.asarray(values[key], dtype=var.get_value().dtype))


def model_from_state_dict(config: MarlinConfig, state_dict: Mapping[str, np.ndarray], *,
                          source: str = "state_dict", **model_kwargs) -> MarlinModel:
    """Builds the model a state_dict describes (encoder-only, full, with or without the
    discriminator) and loads it strictly."""
    has_decoder = any(k.startswith("decoder.") for k in state_dict)
    has_disc = any(k.startswith("discriminator.") for k in state_dict)
    model = MarlinModel(config, rngs=nnx.Rngs(0), with_decoder=has_decoder,
                        with_discriminator=has_disc, **model_kwargs)
    state_dict_to_model(model, state_dict, source=source)
    return model


_VIDEOMAE_RENAMES = (
    (re.compile(r"^encoder\.patch_embed\.proj\."), "encoder.patch_embedding.projection."),
    *_MLP_RENAMES,
    (re.compile(r"^encoder_to_decoder\."), "enc_dec_proj."),
    (re.compile(r"^mask_token$"), "decoder.mask_token"),
)
_VIDEOMAE_DROP = re.compile(r"^(encoder\.head\.|encoder\.fc_norm\.|encoder\.pos_embed$|decoder\.pos_embed$|pos_embed$)")


def is_videomae_state_dict(state_dict: Mapping[str, np.ndarray]) -> bool:
    return any(k.startswith("encoder.patch_embed.") or k == "encoder_to_decoder.weight" for k in state_dict)


def videomae_to_marlin(state_dict: Mapping[str, np.ndarray], config: MarlinConfig) -> OrderedDict[str, np.ndarray]:
    """Renames a VideoMAE pretraining state_dict (MCG-NJU/VideoMAE) to MARLIN keys: the sin-cos
    tables are added, the identity head dropped, values cast to float32 with `cast_bounded` (so
    the memory bound of `load_torch_file` holds)."""
    from marlin_jax.models import sincos_table

    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for key, value in state_dict.items():
        if _VIDEOMAE_DROP.match(key):
            continue
        for pattern, repl in _VIDEOMAE_RENAMES:
            key = pattern.sub(repl, key)
        out[key] = cast_bounded(value, np.float32)  # an expanded view stays a view
    out["encoder.pos_embedding.emb"] = sincos_table(config.num_tokens, config.encoder_embed_dim)[None]
    if any(k.startswith("decoder.") for k in out):
        out["decoder.pos_embedding.emb"] = sincos_table(config.num_tokens, config.decoder_embed_dim)[None]
    return out
