"""Video data for MARLIN: random-access sources (``ytf``, ``tfds_source``, ``videos``,
``synthetic_source``), the grain pipeline (:func:`make_dataset`), the synthetic dataset and the
``youtube_faces_marlin`` TFDS builder. Knows no model.
"""

from marlin_jax.data.pipeline import (
    ISSUE_KINDS,
    SOURCES,
    AccountingIterator,
    ErrorBudgetError,
    LoadClip,
    default_data_config,
    make_dataset,
    make_source,
)
from marlin_jax.data.records import (
    BadRecordError,
    VideoRecord,
    VideoSource,
    sample_frame_indices,
)

__all__ = [
    "ISSUE_KINDS",
    "SOURCES",
    "AccountingIterator",
    "BadRecordError",
    "ErrorBudgetError",
    "LoadClip",
    "VideoRecord",
    "VideoSource",
    "default_data_config",
    "make_dataset",
    "make_source",
    "sample_frame_indices",
]
