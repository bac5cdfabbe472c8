"""Feature analysis on MARLIN features.

Two-group statistics of feature files (:mod:`.stats`, :mod:`.groups`, :mod:`.plots`, :mod:`.report`;
numpy/scipy, no JAX; CLI ``python -m marlin_jax.analysis``, imports flow ``__main__ -> report ->
stats``) and Grad-CAM heat maps of feature dimensions (:mod:`.heatmap`, JAX; CLIs
``python -m marlin_jax.analysis.visualize`` and ``python -m marlin_jax.analysis.compare``).
Submodules are imported on use, so the statistics never import JAX.
"""
