"""Feature analysis on MARLIN features: two-group statistics of feature files (numpy/scipy, no JAX;
``python -m marlin_jax.analysis``) and Grad-CAM heat maps of feature dimensions (:mod:`.heatmap`, JAX;
``python -m marlin_jax.analysis.visualize`` and ``.compare``). Submodules are imported on use, so the
statistics never import JAX."""
