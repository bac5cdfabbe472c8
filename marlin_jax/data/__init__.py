"""Video data for MARLIN: random-access sources (``ytf``, ``tfds_source``, ``videos``,
``synthetic_source``), the grain pipeline (:func:`make_dataset`), the synthetic dataset and the
``youtube_faces_marlin`` TFDS builder. Knows no model.
"""

from marlin_jax.data.pipeline import ErrorBudgetError, default_data_config, make_dataset, make_source
from marlin_jax.data.records import BadRecordError, VideoRecord

__all__ = [
    "BadRecordError",
    "ErrorBudgetError",
    "VideoRecord",
    "default_data_config",
    "make_dataset",
    "make_source",
]
