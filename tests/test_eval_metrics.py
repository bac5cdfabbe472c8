"""Evaluation metrics equal scikit-learn's on the same predictions."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import scipy.special
from sklearn.metrics import accuracy_score, roc_auc_score

from marlin_jax.evaluation import scores as M


def _binary(rng, n=200, ties=False):
    y = rng.random(n) < 0.4
    s = rng.normal(size=n) + 1.2 * y
    if ties:
        s = np.round(s, 1)  # many tied scores across both classes
    return s, y


@pytest.mark.parametrize("ties", [False, True])
def test_binary_auroc_matches_sklearn(ties):
    rng = np.random.default_rng(0)
    for _ in range(5):
        s, y = _binary(rng, ties=ties)
        assert M.binary_auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_binary_auroc_equals_the_mann_whitney_identity():
    """The former implementation (U / (n_pos n_neg) with mid-ranks) and scikit-learn's trapezoid
    agree to 1e-12, with ties, (N, 1) inputs and 0/1 integer labels."""
    from scipy.stats import rankdata

    rng = np.random.default_rng(6)
    for n, ties in itertools.product((2, 7, 300, 4000), (False, True)):
        s, y = _binary(rng, n=n, ties=ties)
        y[:2] = [True, False]
        ranks = rankdata(s)
        n_pos, n_neg = int(y.sum()), int((~y).sum())
        mwu = (ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
        assert M.binary_auroc(s, y) == pytest.approx(mwu, rel=0, abs=1e-12)
        assert M.binary_auroc(s[:, None], y.astype(int)[:, None]) == M.binary_auroc(s, y)


def test_binary_auroc_extremes_and_constant_scores():
    y = np.array([0, 0, 1, 1], bool)
    assert M.binary_auroc(np.array([0.1, 0.2, 0.3, 0.4]), y) == 1.0
    assert M.binary_auroc(np.array([0.4, 0.3, 0.2, 0.1]), y) == 0.0
    assert M.binary_auroc(np.zeros(4), y) == pytest.approx(roc_auc_score(y, np.zeros(4)))


def test_auroc_single_class_is_an_error_not_a_number():
    with pytest.raises(ValueError, match="undefined"):
        M.binary_auroc(np.arange(3.0), np.ones(3, bool))
    with pytest.raises(ValueError, match=r"undefined.*0 positive"):
        M.binary_auroc(np.arange(3.0), np.zeros(3, bool))
    with pytest.raises(ValueError, match=r"undefined.*0 positive, 0 negative"):
        M.binary_auroc(np.zeros(0), np.zeros(0, bool))
    out = M.classification_metrics(np.arange(3.0), np.ones(3, bool), "binary")
    assert math.isnan(out["auroc"]) and out["acc"] == pytest.approx(2 / 3)


def test_multilabel_auroc_and_accuracy_match_sklearn():
    rng = np.random.default_rng(1)
    y = rng.random((120, 7)) < 0.3
    logits = rng.normal(size=y.shape) + 1.5 * y
    probs = M.sigmoid(logits)
    pred = probs > 0.5
    out = M.classification_metrics(logits, y, "multilabel")
    assert out["auroc"] == pytest.approx(roc_auc_score(y, probs, average="micro"), abs=1e-12)
    assert out["auroc_macro"] == pytest.approx(roc_auc_score(y, probs, average="macro"), abs=1e-12)
    assert out["acc"] == pytest.approx(accuracy_score(y.ravel(), pred.ravel()))
    assert out["subset_acc"] == pytest.approx(accuracy_score(y, pred))
    assert out["auroc"] == pytest.approx(roc_auc_score(y.ravel(), probs.ravel()))
    assert out["n_labels_without_both_classes"] == 0


def test_per_label_auroc():
    rng = np.random.default_rng(5)
    y = rng.random((40, 3)) < 0.5
    s = rng.normal(size=y.shape) + y
    y[:, 2] = True
    out = M.per_label_auroc(s, y, ["a", "b", "c"])
    assert list(out) == ["a", "b", "c"] and math.isnan(out["c"])
    assert out["a"] == pytest.approx(roc_auc_score(y[:, 0], s[:, 0]))


def test_multilabel_macro_skips_single_class_labels():
    rng = np.random.default_rng(2)
    y = rng.random((50, 3)) < 0.5
    y[:, 1] = False  # label 1 never present: undefined for that label
    s = rng.normal(size=y.shape)
    expect = np.mean([roc_auc_score(y[:, j], s[:, j]) for j in (0, 2)])
    out = M.classification_metrics(s, y, "multilabel")
    assert out["auroc_macro"] == pytest.approx(expect) and out["n_labels_without_both_classes"] == 1
    y[:] = False  # no label with both classes: every AUROC is undefined, reported as NaN
    out = M.classification_metrics(s, y, "multilabel")
    assert math.isnan(out["auroc"]) and math.isnan(out["auroc_macro"])


def test_multiclass_matches_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, size=300)
    logits = rng.normal(size=(300, 5))
    logits[np.arange(300), y] += 1.0
    probs = scipy.special.softmax(logits, axis=-1)
    out = M.classification_metrics(logits, y, "multiclass")
    assert out["acc"] == pytest.approx(accuracy_score(y, logits.argmax(1)))
    assert out["auroc"] == pytest.approx(
        roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-12
    )


def test_binary_accuracy_and_threshold():
    rng = np.random.default_rng(4)
    s, y = _binary(rng)
    out = M.classification_metrics(s, y, "binary")
    assert out["acc"] == pytest.approx(accuracy_score(y, s > 0))
    assert out["auroc"] == pytest.approx(roc_auc_score(y, s))
    assert out["n"] == 200


def test_bad_shapes_and_task():
    with pytest.raises(ValueError, match="differ"):
        M.binary_auroc(np.zeros(3), np.zeros(4, bool))
    with pytest.raises(ValueError, match="NaN"):
        M.binary_auroc(np.array([0.0, np.nan]), np.array([0, 1], bool))
    with pytest.raises(ValueError, match="task"):
        M.classification_metrics(np.zeros(2), np.zeros(2), "regression")


def test_sigmoid_is_stable():
    x = np.array([-1000.0, 0.0, 1000.0])
    np.testing.assert_allclose(M.sigmoid(x), [0.0, 0.5, 1.0])


def test_table_and_json(tmp_path):
    res = {"val": {"acc": 0.5, "auroc": 0.75, "n": 10.0}, "test": {"acc": 1.0, "auroc": math.nan}}
    table = M.format_table(res)
    assert table.splitlines()[0].split() == ["split", "acc", "auroc", "n"]
    assert "0.7500" in table and "nan" in table
    M.save_metrics(tmp_path / "m.json", {"results": res})
    loaded = json.loads((tmp_path / "m.json").read_text())
    assert loaded["results"]["test"]["auroc"] is None
    assert loaded["results"]["val"]["auroc"] == 0.75
