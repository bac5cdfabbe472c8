"""Classification scores (metrics) as MARLIN reports them (accuracy, AUROC), in NumPy.

The original evaluation (``evaluate.py`` + ``model/classifier.py`` of ControlNet/MARLIN) reports,
for a multilabel task such as CelebV-HQ appearance (40 attributes) or action (35 actions):

* ``acc``: element-wise accuracy of ``sigmoid(logit) > 0.5`` over every (sample, label) pair;
* ``auroc``: the binary AUROC of the *flattened* (sample, label) pairs (micro averaging).

Here we also give the per-label (macro) average, subset accuracy, and the multiclass variants
(argmax accuracy, one-vs-rest macro AUROC). Every function agrees with scikit-learn on the same
predictions (see ``tests/test_eval_metrics.py``); the AUROC itself is scikit-learn's
``roc_auc_score`` (imported on first use), wrapped with input checks and an explicit error for a
single class.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from scipy import special
from scipy.special import expit as sigmoid  # numerically stable logistic

# What a label holds (one 0/1 value, one class index, or several 0/1 values); named apart from
# a dataset's task ("appearance", "action") and the trainer's model bundle.
LabelKind = Literal["binary", "multiclass", "multilabel"]
LABEL_KINDS: tuple[str, ...] = ("binary", "multiclass", "multilabel")


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax over ``axis`` (float64)."""
    return special.softmax(np.asarray(x, dtype=np.float64), axis=axis)


def binary_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of scores ``(N,)`` against boolean labels ``(N,)``:
    ``sklearn.metrics.roc_auc_score(labels, scores)`` (trapezoidal area; tied scores count half).

    Raises ValueError (message containing "undefined") when only one class is present, since the
    AUROC is then undefined (never silently 0, 0.5 or NaN; :func:`classification_metrics`
    reports NaN). Also raises on mismatched sizes and on NaN/inf scores.
    """
    from sklearn.metrics import roc_auc_score  # lazily: importing sklearn takes about a second

    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in size")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or inf")
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"AUROC is undefined with only one class present ({n_pos} positive, {n_neg} negative)"
        )
    return float(roc_auc_score(labels, scores))


def multilabel_auroc(
    scores: np.ndarray, labels: np.ndarray, average: Literal["micro", "macro"] = "micro"
) -> float:
    """AUROC of ``(N, L)`` scores against ``(N, L)`` boolean labels.

    ``micro`` (MARLIN's number) is the binary AUROC of all flattened pairs; ``macro`` is the
    mean of per-label AUROCs over the labels having both classes present (labels with one class
    are left out; :func:`classification_metrics` reports how many were).
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(
            f"need matching (N, L) scores and labels, got {scores.shape} {labels.shape}"
        )
    if average == "micro":
        return binary_auroc(scores.ravel(), labels.ravel())
    if average == "macro":
        per_label = _per_label_auroc(scores, labels)
        valid = per_label[~np.isnan(per_label)]
        if valid.size == 0:
            raise ValueError("macro AUROC is undefined: no label has both classes present")
        return float(valid.mean())
    raise ValueError(f"average must be 'micro' or 'macro', got {average!r}")


def _per_label_auroc(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-column AUROC ``(L,)``; NaN where a column has a single class."""
    out = np.full(scores.shape[1], np.nan)
    for j in range(scores.shape[1]):
        if 0 < labels[:, j].sum() < labels.shape[0]:
            out[j] = binary_auroc(scores[:, j], labels[:, j])
    return out


def per_label_auroc(logits: np.ndarray, labels: np.ndarray,
                    names: Sequence[str] | None = None) -> dict[str, float]:
    """``{label name: AUROC}`` of each column of multilabel ``(N, L)`` logits (NaN where a label
    has a single class), for reports beyond the averaged number."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if logits.ndim != 2 or logits.shape != labels.shape:
        raise ValueError(f"need matching (N, L) logits and labels, got {logits.shape} "
                         f"{labels.shape}")
    names = list(names) if names is not None else [str(j) for j in range(logits.shape[1])]
    if len(names) != logits.shape[1]:
        raise ValueError(f"{len(names)} names for {logits.shape[1]} labels")
    return dict(zip(names, _per_label_auroc(logits, labels).tolist(), strict=True))


def binary_accuracy(probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> float:
    """Fraction of elements where ``probs > threshold`` equals the boolean label (any shape;
    for ``(N, L)`` multilabel input this is MARLIN's element-wise accuracy)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if probs.shape != labels.shape:
        raise ValueError(f"probs {probs.shape} and labels {labels.shape} differ in shape")
    if probs.size == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float(np.mean((probs > threshold) == labels))


def subset_accuracy(probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> float:
    """Fraction of ``(N, L)`` rows whose every label is predicted right (exact match)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if probs.ndim != 2 or probs.shape != labels.shape:
        raise ValueError(f"need matching (N, L) probs and labels, got {probs.shape} {labels.shape}")
    return float(np.mean(np.all((probs > threshold) == labels, axis=1)))


def multiclass_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``(N, C)`` logits (or probabilities) against integer labels ``(N,)``."""
    logits = np.asarray(logits)
    labels = np.asarray(labels).reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"need (N, C) logits and (N,) labels, got {logits.shape} {labels.shape}")
    if labels.size == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def multiclass_auroc(probs: np.ndarray, labels: np.ndarray) -> float:
    """One-vs-rest AUROC averaged over classes (macro), of ``(N, C)`` probabilities against
    integer labels ``(N,)``; classes absent from ``labels`` are left out of the average."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"need (N, C) probs and (N,) labels, got {probs.shape} {labels.shape}")
    one_hot = labels[:, None] == np.arange(probs.shape[1])[None, :]
    per_class = _per_label_auroc(probs, one_hot)
    valid = per_class[~np.isnan(per_class)]
    if valid.size == 0:
        raise ValueError("multiclass AUROC is undefined: fewer than two classes present")
    return float(valid.mean())


def classification_metrics(logits: np.ndarray, labels: np.ndarray, task: LabelKind) -> dict[str, float]:
    """All metrics of a task from raw logits.

    Args:
      logits: ``(N,)`` or ``(N, 1)`` (binary), ``(N, L)`` (multilabel), ``(N, C)`` (multiclass).
      labels: bool ``(N,)`` / bool ``(N, L)`` / int ``(N,)``.
      task: "binary", "multiclass" or "multilabel".

    Returns:
      binary: ``acc``, ``auroc``. multilabel: ``acc`` (element-wise), ``auroc`` (micro, as
      MARLIN), ``auroc_macro``, ``subset_acc``, ``n_labels_without_both_classes``.
      multiclass: ``acc``, ``auroc`` (one-vs-rest macro). Every entry also has ``n``.
      An undefined AUROC (single class) is reported as NaN, never as a number.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    out: dict[str, float] = {"n": float(labels.shape[0])}
    if task == "binary":
        scores = logits.reshape(-1)
        probs = sigmoid(scores)
        y = labels.reshape(-1).astype(bool)
        out["acc"] = binary_accuracy(probs, y)
        out["auroc"] = _or_nan(binary_auroc, probs, y)
    elif task == "multilabel":
        probs = sigmoid(logits)
        y = labels.astype(bool)
        out["acc"] = binary_accuracy(probs, y)
        out["subset_acc"] = subset_accuracy(probs, y)
        out["auroc"] = _or_nan(multilabel_auroc, probs, y, "micro")
        out["auroc_macro"] = _or_nan(multilabel_auroc, probs, y, "macro")
        out["n_labels_without_both_classes"] = float(
            np.sum(np.isnan(_per_label_auroc(probs, y)))
        )
    elif task == "multiclass":
        probs = softmax(logits, axis=-1)
        out["acc"] = multiclass_accuracy(logits, labels)
        out["auroc"] = _or_nan(multiclass_auroc, probs, labels)
    else:
        raise ValueError(f"task must be one of {LABEL_KINDS}, got {task!r}")
    return out


def _or_nan(fn, *args) -> float:
    try:
        return fn(*args)
    except ValueError as e:
        if "undefined" in str(e):
            return math.nan
        raise


def format_table(
    results: Mapping[str, Mapping[str, float]], keys: Sequence[str] | None = None
) -> str:
    """A plain-text table, one row per split (e.g. ``{"val": {...}, "test": {...}}``)."""
    if keys is None:
        keys = []
        for row in results.values():
            keys += [k for k in row if k not in keys]
    header = ["split", *keys]
    rows = [header]
    for split, row in results.items():
        rows.append([split] + [_fmt(k, row.get(k)) for k in keys])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(key: str, v: float | None) -> str:
    if v is None:
        return "-"
    if (key == "n" or key.startswith("n_")) and float(v).is_integer():
        return str(int(v))  # counts
    return f"{v:.4f}"


def save_metrics(path: str | os.PathLike, results: Mapping[str, object]) -> None:
    """Writes results as JSON (NaN written as null, so the file stays valid JSON)."""

    def clean(x):
        if isinstance(x, Mapping):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        if isinstance(x, np.generic):
            x = x.item()
        if isinstance(x, float) and not math.isfinite(x):
            return None
        return x

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(clean(results), f, indent=2, sort_keys=True)
        f.write("\n")
