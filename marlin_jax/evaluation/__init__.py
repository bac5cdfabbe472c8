"""Downstream evaluation of MARLIN features: ``scores``, label ``datasets``, the shared
supervised loop (``training``), linear ``probe`` and ``finetune``. Entry point:
``python -m marlin_jax.evaluate --config=...``."""
