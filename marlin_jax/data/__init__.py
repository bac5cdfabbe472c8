"""Video data for MARLIN: random-access sources, the grain pipeline, the synthetic dataset and the
``youtube_faces_marlin`` TFDS builder. Knows no model.

Sources (grain ``RandomAccessDataSource`` of :class:`VideoRecord`):
  ``ytf.YtfSource``            original MARLIN YouTube-Faces layout (JPEG crops + npy parsing)
  ``tfds_source.TfdsSource``   ArrayRecord shards of the ``youtube_faces_marlin`` builder
  ``videos.VideoFileSource``   plain video files with optional parsing maps / labels
  ``synthetic_source.SyntheticSource``  procedurally rendered faces (the embedded default)
Pipeline: :func:`default_data_config`, :func:`make_dataset`.
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
