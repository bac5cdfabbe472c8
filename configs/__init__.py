"""ml_collections configs: `python -m marlin_jax.main --config=configs/vit_base.py[:demo]`."""
