"""PyTorch MARLIN checkpoint (.pt / Lightning .ckpt / VideoMAE) or Hugging Face folder -> marlin-jax
checkpoint directory."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from flax import nnx, serialization, traverse_util

from convert.arguments import add_source_arguments
from marlin_jax.interop import model_from_state_dict, read_weights, resolve_checkpoint_config, save_marlin_checkpoint
from marlin_jax.interop.hf import weights_source


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser, "*.encoder.pt, *.full.pt, Lightning *.ckpt, VideoMAE .pth, or a Hugging Face "
                                 "folder (config.json + model.safetensors) / model.safetensors")
    parser.add_argument("--output", required=True, help="marlin-jax checkpoint directory to create (orbax)")
    parser.add_argument("--npz", help="also write the variables to this .npz (keys: variable paths with '/')")
    parser.add_argument("--msgpack", help="also write the variables to this flax msgpack file")
    parser.add_argument("--no_discriminator", action="store_true", help="drop discriminator.* weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def run(args: argparse.Namespace) -> int:
    config, name = resolve_checkpoint_config(args.model, args.input)
    state_dict = read_weights(args.input, config)
    if args.no_discriminator:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("discriminator.")}
    model = model_from_state_dict(config, state_dict, source=weights_source(args.input))
    out = save_marlin_checkpoint(args.output, model, overwrite=args.overwrite)
    tree = nnx.to_pure_dict(nnx.state(model, nnx.Variable))
    if args.npz:
        flat = {"/".join(map(str, path)): np.asarray(v) for path, v in traverse_util.flatten_dict(tree).items()}
        np.savez(args.npz, **flat)
    if args.msgpack:
        Path(args.msgpack).write_bytes(serialization.msgpack_serialize(_numpy_tree(tree)))
    parts = sorted({k.split(".")[0] for k in state_dict})
    print(f"{args.input} -> {out} ({name}; {len(state_dict)} tensors; parts: {', '.join(parts)})")
    return 0


def _numpy_tree(tree):
    return {str(k): _numpy_tree(v) if isinstance(v, dict) else np.asarray(v) for k, v in tree.items()}
