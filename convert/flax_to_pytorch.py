"""marlin-jax checkpoint (directory, or any readable checkpoint) -> PyTorch state_dict `.pt`
that `marlin_pytorch.Marlin.from_file(name, path)` loads."""

from __future__ import annotations

import argparse
import sys

from marlin_jax.interop import load_model, save_torch_checkpoint
from marlin_jax.models import get_config, model_names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=f"registered architecture: {', '.join(model_names())}")
    parser.add_argument("--input", required=True, help="marlin-jax checkpoint directory (or trainer workdir)")
    parser.add_argument("--output", required=True, help="the .pt file to write")
    parser.add_argument("--encoder_only", action="store_true", help="write the *.encoder.pt form")
    parser.add_argument("--with_discriminator", action="store_true",
                        help="keep discriminator.* (marlin-pytorch's loader refuses them in a .pt)")


def run(args: argparse.Namespace) -> int:
    model = load_model(args.input, get_config(args.model))
    path = save_torch_checkpoint(args.output, model, encoder_only=args.encoder_only,
                                 with_discriminator=args.with_discriminator)
    print(f"{args.input} -> {path} ({args.model}, {'encoder only' if args.encoder_only else 'full'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
