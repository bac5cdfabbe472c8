"""Feature analysis on MARLIN features: two-group statistics, plots and reports
(:mod:`.stats`, :mod:`.groups`, :mod:`.plots`, :mod:`.report`), and Grad-CAM heatmaps of
feature dimensions (:mod:`.heatmap`, CLIs :mod:`.visualize` and :mod:`.compare`).

Submodules are imported on use, so the statistics never import JAX and the heatmaps never
import scipy's statistics.
"""
