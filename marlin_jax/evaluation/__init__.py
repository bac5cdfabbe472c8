"""Downstream evaluation of MARLIN features: linear probing and fine-tuning.

``metrics`` (accuracy / AUROC as MARLIN reports them), ``datasets`` (CelebV-HQ and generic label
files, window features, clip sampling), ``training`` (the shared supervised loop), ``probe``
(linear probe on features) and ``finetune`` (encoder + linear head on raw clips). The entry point
is ``python -m marlin_jax.evaluate --config=...``.
"""

from .datasets import (
    ClipDataset,
    DatasetError,
    FeatureSet,
    LabelSet,
    load_celebvhq,
    load_features,
    load_label_file,
    sample_clip_indices,
)
from .metrics import (
    binary_auroc,
    classification_metrics,
    format_table,
    multiclass_accuracy,
    multiclass_auroc,
    multilabel_auroc,
    per_label_auroc,
    save_metrics,
)
from .training import (
    CheckpointMismatchError,
    FitOptions,
    FitResult,
    Preempted,
    classification_loss,
    fit,
    read_training_state,
    restore_best,
)

__all__ = [
    "CheckpointMismatchError", "ClipDataset", "DatasetError", "FeatureSet", "FitOptions", "FitResult", "LabelSet",
    "binary_auroc", "classification_loss", "classification_metrics", "fit", "format_table",
    "load_celebvhq", "load_features", "load_label_file", "multiclass_accuracy",
    "multiclass_auroc", "multilabel_auroc", "per_label_auroc", "Preempted", "read_training_state",
    "restore_best",
    "sample_clip_indices", "save_metrics",
]
