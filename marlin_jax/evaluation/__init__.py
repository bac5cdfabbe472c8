"""Downstream evaluation of MARLIN features: linear probing and fine-tuning.

``scores`` (accuracy / AUROC as MARLIN reports them), ``datasets`` (CelebV-HQ and generic label
files, window features, clips read through :mod:`marlin_jax.data.records`), ``training`` (the
shared supervised loop), ``probe`` (linear probe on features) and ``finetune`` (encoder + linear
head on raw clips). The entry point is ``python -m marlin_jax.evaluate --config=...``.
"""

from .datasets import (
    ClipDataset,
    DatasetError,
    FeatureSet,
    LabelSet,
    load_celebvhq,
    load_features,
    load_label_file,
)
from .scores import (
    LABEL_KINDS,
    LabelKind,
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
    label_array,
    read_training_state,
    restore_best,
    set_model_params,
)

__all__ = [
    "CheckpointMismatchError", "ClipDataset", "DatasetError", "FeatureSet", "FitOptions",
    "FitResult", "LABEL_KINDS", "LabelKind", "LabelSet", "Preempted", "binary_auroc",
    "classification_loss", "classification_metrics", "fit", "format_table", "label_array",
    "load_celebvhq", "load_features", "load_label_file", "multiclass_accuracy",
    "multiclass_auroc", "multilabel_auroc", "per_label_auroc", "read_training_state",
    "restore_best", "save_metrics", "set_model_params",
]
