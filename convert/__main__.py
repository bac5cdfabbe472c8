"""`python -m convert {to-flax,to-torch,to-hf} ...`: see `python -m convert --help`."""

from __future__ import annotations

import argparse
import sys

from convert import flax_to_pytorch, pytorch_to_flax, to_hf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert",
                                     description="Convert MARLIN weights between PyTorch, marlin-jax and the "
                                                 "Hugging Face port.")
    commands = parser.add_subparsers(dest="command", required=True)
    to_flax = commands.add_parser("to-flax", help=pytorch_to_flax.__doc__.splitlines()[0])
    pytorch_to_flax.add_arguments(to_flax)
    to_flax.set_defaults(run=pytorch_to_flax.run)
    to_torch = commands.add_parser("to-torch", help=flax_to_pytorch.__doc__.splitlines()[0])
    flax_to_pytorch.add_arguments(to_torch)
    to_torch.set_defaults(run=flax_to_pytorch.run)
    hf = commands.add_parser("to-hf", help=to_hf.__doc__.splitlines()[0])
    to_hf.add_arguments(hf)
    hf.set_defaults(run=to_hf.run)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as e:  # CheckpointError, StateDictMismatchError, unknown model, ...
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
