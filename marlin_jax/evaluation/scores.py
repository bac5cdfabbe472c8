"""Classification scores as MARLIN reports them, in NumPy.

For a multilabel task (CelebV-HQ appearance / action) the original reports ``acc``, the
element-wise accuracy of ``sigmoid(logit) > 0.5``, and ``auroc``, the AUROC of the flattened
(sample, label) pairs (micro). We add the macro average, subset accuracy and the multiclass
variants (argmax accuracy, one-vs-rest macro AUROC); all agree with scikit-learn.
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


def binary_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """``sklearn.metrics.roc_auc_score`` of scores ``(N,)`` against boolean labels ``(N,)``.

    Raises ValueError (containing "undefined") when only one class is present (never 0, 0.5 or
    NaN; :func:`classification_metrics` reports NaN), on mismatched sizes and non-finite scores.
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
        raise ValueError(f"AUROC is undefined with only one class present ({n_pos} positive, {n_neg} negative)")
    return float(roc_auc_score(labels, scores))


def _matrices(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 scores and bool labels, both ``(N, L)`` (ValueError otherwise)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(f"need matching (N, L) scores and labels, got {scores.shape} {labels.shape}")
    return scores, labels


def _macro_auroc(scores: np.ndarray, labels: np.ndarray, undefined: str) -> float:
    """Mean per-column AUROC over the columns with both classes (ValueError ``undefined`` if none)."""
    per_label = _per_label_auroc(scores, labels)
    if np.all(np.isnan(per_label)):
        raise ValueError(undefined)
    return float(np.nanmean(per_label))


def _per_label_auroc(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-column AUROC ``(L,)``; NaN where a column has a single class."""
    return np.array([binary_auroc(scores[:, j], labels[:, j]) if 0 < labels[:, j].sum() < len(labels)
                     else np.nan for j in range(scores.shape[1])], dtype=np.float64)


def per_label_auroc(logits: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """``{label name: AUROC}`` of each column of multilabel ``(N, L)`` logits (NaN where a label
    has a single class), for reports beyond the averaged number."""
    logits, labels = _matrices(logits, labels)
    if len(names) != logits.shape[1]:
        raise ValueError(f"{len(names)} names for {logits.shape[1]} labels")
    return dict(zip(names, _per_label_auroc(logits, labels).tolist(), strict=True))


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
        out["acc"] = _accuracy(probs > 0.5, y)
        out["auroc"] = _or_nan(binary_auroc, probs, y)
    elif task == "multilabel":
        probs, y = _matrices(sigmoid(logits), labels)
        out["acc"] = _accuracy(probs > 0.5, y)
        out["subset_acc"] = float(np.mean(np.all((probs > 0.5) == y, axis=1)))
        out["auroc"] = _or_nan(binary_auroc, probs.ravel(), y.ravel())  # micro, as MARLIN
        out["auroc_macro"] = _or_nan(_macro_auroc, probs, y,
                                     "macro AUROC is undefined: no label has both classes present")
        out["n_labels_without_both_classes"] = float(np.sum(np.isnan(_per_label_auroc(probs, y))))
    elif task == "multiclass":
        labels = labels.reshape(-1)
        if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
            raise ValueError(f"need (N, C) logits and (N,) labels, got {logits.shape} {labels.shape}")
        out["acc"] = _accuracy(np.argmax(logits, axis=1), labels)
        one_hot = labels[:, None] == np.arange(logits.shape[1])[None, :]
        out["auroc"] = _or_nan(_macro_auroc, special.softmax(logits, axis=-1), one_hot,
                               "multiclass AUROC is undefined: fewer than two classes present")
    else:
        raise ValueError(f"task must be one of {LABEL_KINDS}, got {task!r}")
    return out


def _accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of elements where ``predicted`` equals ``labels`` (same shape)."""
    if predicted.shape != labels.shape:
        raise ValueError(f"predictions {predicted.shape} and labels {labels.shape} differ in shape")
    if predicted.size == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float(np.mean(predicted == labels))


def _or_nan(fn, *args) -> float:
    try:
        return fn(*args)
    except ValueError as e:
        if "undefined" in str(e):
            return math.nan
        raise


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """A plain-text table, one row per split (e.g. ``{"val": {...}, "test": {...}}``)."""
    keys = list(dict.fromkeys(k for row in results.values() for k in row))
    header = ["split", *keys]
    rows = [header] + [[split] + [_fmt(k, row.get(k)) for k in keys] for split, row in results.items()]
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
    """Writes results as JSON (NaN and inf written as null, so the file stays valid JSON)."""
    text = json.dumps(results, default=lambda o: o.item() if isinstance(o, np.generic) else dict(o))
    clean = json.loads(text, parse_constant=lambda name: None)  # NaN, Infinity, -Infinity
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(clean, f, indent=2, sort_keys=True)
        f.write("\n")
