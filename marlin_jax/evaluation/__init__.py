"""Downstream evaluation of MARLIN features: linear probing and fine-tuning.

``scores`` (accuracy / AUROC as MARLIN reports them), ``datasets`` (CelebV-HQ and generic label
files, window features, clips read through :mod:`marlin_jax.data.records`), ``training`` (the
shared supervised loop), ``probe`` (linear probe on features) and ``finetune`` (encoder + linear
head on raw clips). The entry point is ``python -m marlin_jax.evaluate --config=...``.
"""
