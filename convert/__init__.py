"""Command-line conversion between PyTorch MARLIN checkpoints, marlin-jax checkpoints and the
Hugging Face port (`config.json` + `model.safetensors`).

    python -m convert to-flax  --model marlin_vit_base_ytf --input marlin_vit_base_ytf.full.pt --output ckpt/
    python -m convert to-torch --model marlin_vit_base_ytf --input ckpt/ --output exported.full.pt
    python -m convert to-hf    --input ckpt/ --output marlin_vit_base_ytf_hf/   # config.json + model.safetensors
    python -m convert to-flax  --input marlin_vit_base_ytf_hf/ --output ckpt/     # architecture from config.json

The library functions live in :mod:`marlin_jax.interop`; this package only parses arguments.
"""
