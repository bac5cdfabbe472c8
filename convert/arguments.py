"""Arguments shared by the `python -m convert` commands."""

from __future__ import annotations

import argparse

from marlin_jax.models import model_names


def add_source_arguments(parser: argparse.ArgumentParser,
                         input_help: str = "marlin-jax checkpoint directory (or trainer workdir), or any "
                                           "checkpoint `convert to-flax` reads") -> None:
    """``--model`` (optional: the input's own architecture by default) and ``--input``."""
    parser.add_argument("--model", default=None,
                        help=f"registered architecture: {', '.join(model_names())} (default: the one the "
                             "input's marlin_config.json or Hugging Face config.json names)")
    parser.add_argument("--input", required=True, help=input_help)
