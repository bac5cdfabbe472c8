"""marlin-jax checkpoint (directory, or any readable checkpoint) -> PyTorch state_dict `.pt`
that `marlin_pytorch.Marlin.from_file(name, path)` loads."""

from __future__ import annotations

import argparse

from convert.arguments import add_source_arguments
from marlin_jax.interop import load_checkpoint, resolve_checkpoint_config, save_torch_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    parser.add_argument("--output", required=True, help="the .pt file to write")
    parser.add_argument("--encoder_only", action="store_true", help="write the *.encoder.pt form")
    parser.add_argument("--with_discriminator", action="store_true",
                        help="keep discriminator.* (marlin-pytorch's loader refuses them in a .pt)")


def run(args: argparse.Namespace) -> int:
    config, name = resolve_checkpoint_config(args.model, args.input)
    model = load_checkpoint(args.input, config)
    path = save_torch_checkpoint(args.output, model, encoder_only=args.encoder_only,
                                 with_discriminator=args.with_discriminator)
    print(f"{args.input} -> {path} ({name}, {'encoder only' if args.encoder_only else 'full'})")
    return 0
