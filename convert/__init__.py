"""Command-line conversion between PyTorch MARLIN checkpoints and marlin-jax checkpoints.

    python -m convert to-flax  --model marlin_vit_base_ytf --input marlin_vit_base_ytf.full.pt --output ckpt/
    python -m convert to-torch --model marlin_vit_base_ytf --input ckpt/ --output exported.full.pt

The library functions live in :mod:`marlin_jax.interop`; this package only parses arguments.
"""
