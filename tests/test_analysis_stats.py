"""Statistics of marlin_jax.analysis.stats against scipy and direct reference implementations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.stats as ss
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.spatial.distance import pdist

from marlin_jax.analysis.stats import (
    cohens_d,
    cohens_dz,
    compare_groups,
    compare_paired,
    effect_size_band_counts,
    mann_whitney_u,
    mmd_permutation_test,
    wilcoxon_signed_rank,
)


def _scipy_mwu(a, b, **kw):
    res = [ss.mannwhitneyu(a[:, j], b[:, j], **kw) for j in range(a.shape[1])]
    return np.array([r.statistic for r in res]), np.array([r.pvalue for r in res])


@pytest.mark.parametrize(
    "n1,n2", [(1, 1), (1, 6), (3, 3), (5, 7), (8, 30), (9, 9), (40, 3), (25, 31)]
)
def test_mann_whitney_equals_scipy_with_and_without_ties(n1, n2):
    rng = np.random.default_rng(n1 * 100 + n2)
    a = rng.normal(size=(n1, 40))
    b = rng.normal(size=(n2, 40)) + 0.4
    # first half of the features: heavy ties (few distinct values), so both the exact branch
    # (no ties, a small sample) and the tie-corrected normal branch are exercised
    a[:, :20], b[:, :20] = np.round(a[:, :20]), np.round(b[:, :20])
    u, p = mann_whitney_u(a, b)
    u_ref, p_ref = _scipy_mwu(a, b)
    np.testing.assert_allclose(u, u_ref, rtol=0, atol=1e-9)
    np.testing.assert_allclose(p, p_ref, rtol=1e-10, atol=1e-300)


@settings(max_examples=60, deadline=None)
@given(
    a=hnp.arrays(np.int8, st.tuples(st.integers(1, 12), st.just(3)), elements=st.integers(-3, 3)),
    b=hnp.arrays(np.int8, st.tuples(st.integers(1, 12), st.just(3)), elements=st.integers(-3, 3)),
)
def test_mann_whitney_property_small_integer_samples(a, b):
    """Tiny samples of few distinct values: every tie pattern, both methods of 'auto'."""
    a, b = a.astype(float), b.astype(float)
    u, p = mann_whitney_u(a, b)
    u_ref, p_ref = _scipy_mwu(a, b)
    np.testing.assert_allclose(u, u_ref, atol=1e-9)
    np.testing.assert_allclose(p, p_ref, rtol=1e-10)


def test_mann_whitney_in_feature_blocks_equals_one_block(monkeypatch):
    import marlin_jax.analysis.stats as stats_mod

    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(20, 50)), np.round(rng.normal(size=(15, 50)), 1)
    whole = mann_whitney_u(a, b)
    monkeypatch.setattr(stats_mod, "_MWU_BLOCK_VALUES", 35 * 7)  # blocks of 7 features
    blocked = mann_whitney_u(a, b)
    np.testing.assert_array_equal(whole[0], blocked[0])
    np.testing.assert_array_equal(whole[1], blocked[1])


def test_mann_whitney_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        mann_whitney_u(np.array([[np.nan]]), np.ones((3, 1)))
    with pytest.raises(ValueError, match="different feature sizes"):
        mann_whitney_u(np.ones((3, 2)), np.ones((3, 4)))


def test_cohens_d_pooled_sd():
    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 2.0, size=(13, 6)), rng.normal(0.0, 1.0, size=(21, 6))
    pooled = np.sqrt((12 * a.var(0, ddof=1) + 20 * b.var(0, ddof=1)) / 32)
    np.testing.assert_allclose(cohens_d(a, b), (a.mean(0) - b.mean(0)) / pooled, rtol=1e-12)
    # constant features: equal means -> 0, different means -> signed infinity
    const = cohens_d(np.array([[1.0, 2.0]] * 3), np.array([[1.0, 1.0]] * 4))
    assert const[0] == 0.0 and const[1] == np.inf


def test_effect_size_bands_edges():
    d = np.array([0.5, -0.5, 0.8, 0.81, -0.9, 0.2, 0.51, -np.inf])
    assert effect_size_band_counts(d) == {
        "large (|d| > 0.8)": 3,
        "medium (0.5 < |d| <= 0.8)": 2,
        "small (|d| <= 0.5)": 3,
    }
    mask = np.array([1, 0, 0, 1, 0, 0, 0, 0], bool)
    assert sum(effect_size_band_counts(d, mask).values()) == 2


# ----------------------------------------------------------------------------- MMD reference
def _ref_mmd2(x, y, sigma):
    """Unbiased MMD^2 written out term by term (Gretton et al. 2012, eq. 3)."""

    def k(u, v):
        return np.exp(-np.sum((u - v) ** 2) / (2 * sigma**2))

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_mmd_equals_direct_reference():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 5)), rng.normal(size=(9, 5)) + 0.8
    z = np.concatenate([x, y])
    sigma = np.median(pdist(z))  # the median heuristic

    n_perm = 60
    res = mmd_permutation_test(x, y, n_permutations=n_perm, seed=5)
    observed = _ref_mmd2(x, y, sigma)
    perm_rng = np.random.default_rng(5)  # the documented permutation stream
    exceed = 0
    for _ in range(n_perm):
        idx = perm_rng.permutation(len(z))
        exceed += _ref_mmd2(z[idx[: len(x)]], z[idx[len(x) :]], sigma) >= observed - 1e-12
    assert res.mmd2 == pytest.approx(observed, rel=1e-10)
    assert res.bandwidth == pytest.approx(sigma)
    assert res.p_value == pytest.approx((1 + exceed) / (1 + n_perm))


def test_mmd_detects_shift_and_is_calibrated_under_null():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 16)), rng.normal(size=(40, 16))
    y[:, :3] += 1.0
    assert mmd_permutation_test(x, y, n_permutations=200).p_value < 0.01
    # under H0 the permutation p-value is (super-)uniform: about 5% of tests below 0.05
    null_p = [
        mmd_permutation_test(
            rng.normal(size=(15, 8)), rng.normal(size=(15, 8)), n_permutations=99, seed=s
        ).p_value
        for s in range(60)
    ]
    assert np.mean(np.array(null_p) <= 0.05) <= 0.15
    assert 0.3 < np.mean(null_p) < 0.7


# ----------------------------------------------------------------------------- planted effects
def test_planted_effects_found_and_fdr_controlled():
    """Many independent replicates at once (stacked as features): every planted dimension is
    found, and the false discovery proportion among nulls averages at most alpha."""
    rng = np.random.default_rng(0)
    reps, dim, planted, n = 200, 100, 10, 40
    a = rng.normal(size=(n, reps * dim))
    b = rng.normal(size=(n, reps * dim))
    is_planted = np.zeros((reps, dim), bool)
    is_planted[:, :planted] = True
    b[:, is_planted.ravel()] += 1.5
    _, p = mann_whitney_u(a, b)
    p = p.reshape(reps, dim)
    q = np.stack([ss.false_discovery_control(row) for row in p])
    found = q < 0.05
    assert found[is_planted].mean() > 0.99  # power
    fdp = (found & ~is_planted).sum(1) / np.maximum(found.sum(1), 1)
    # BH: E[FDP] <= alpha * m0 / m = 0.045; allow 3 standard errors of the replicate mean
    assert fdp.mean() <= 0.045 + 3 * fdp.std() / np.sqrt(reps)
    # and without correction the nulls would be flagged far more often
    assert (p[~is_planted] < 0.05).mean() > 0.04


def test_global_null_fdr_equals_familywise_rate():
    rng = np.random.default_rng(1)
    reps, dim = 300, 50
    _, p = mann_whitney_u(rng.normal(size=(30, reps * dim)), rng.normal(size=(30, reps * dim)))
    any_found = [np.any(ss.false_discovery_control(row) < 0.05) for row in p.reshape(reps, dim)]
    assert np.mean(any_found) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / reps)


def test_compare_groups_summary_and_top():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(50, 64)), rng.normal(size=(45, 64))
    planted = [3, 17, 40]
    a[:, planted] += np.array([2.0, -1.5, 1.0])
    res = compare_groups(a, b, names=("pre", "post"), top_k=5, mmd_permutations=200)
    assert set(planted) <= set(res.top[:3].tolist())
    s = res.summary()
    assert s["significant_fdr_bh"] == int(np.sum(res.q < 0.05)) >= 3
    assert s["significant_uncorrected"] >= s["significant_fdr_bh"]
    assert sum(s["effect_size_bands_all"].values()) == 64
    assert s["mmd"]["p_value"] < 0.05
    # q ascending along top, |d| descending within equal q
    for i, j in itertools.pairwise(res.top):
        assert res.q[i] < res.q[j] or (res.q[i] == res.q[j] and abs(res.d[i]) >= abs(res.d[j]))


@pytest.mark.parametrize("n", [9, 20])
def test_wilcoxon_signed_rank_equals_scipy_per_feature(n):
    """Per feature as scipy: exact without ties/zeros, permutation (n <= 13) or normal
    approximation (n > 13) with them -- whatever the other features hold."""
    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, 12))
    b = a + rng.normal(0.3, 1.0, size=(n, 12))
    a[:, :3], b[:, :3] = np.round(a[:, :3]), np.round(b[:, :3])  # ties and zero differences
    a[:, 3], b[:, 3] = 1.0, 1.0  # no difference at all
    w, p = wilcoxon_signed_rank(a, b)
    assert (w[3], p[3]) == (0.0, 1.0)
    for j in [0, 1, 2, *range(4, 12)]:
        ref = ss.wilcoxon(a[:, j], b[:, j])
        assert w[j] == pytest.approx(ref.statistic) and p[j] == pytest.approx(ref.pvalue, rel=1e-10)
    diff = (a - b)[:, 4:]
    np.testing.assert_allclose(cohens_dz(a, b)[4:], diff.mean(0) / diff.std(0, ddof=1))
    assert cohens_dz(a, b)[3] == 0.0


def test_paired_test_finds_a_within_subject_shift_the_unpaired_test_misses():
    """Subjects differ a lot (sd 2) and move a little (0.8) from pre to post in planted dims:
    the paired test sees the shift, the independent-samples test is swamped by subjects."""
    rng = np.random.default_rng(5)
    subjects = rng.normal(0, 2.0, size=(20, 40))
    pre = subjects + 0.2 * rng.normal(size=(20, 40))
    post = subjects + 0.2 * rng.normal(size=(20, 40))
    post[:, :4] += 0.8
    paired = compare_paired(post, pre, names=("post", "pre"), top_k=4)
    unpaired = compare_groups(post, pre, names=("post", "pre"), mmd_permutations=0)
    assert set(paired.top.tolist()) == {0, 1, 2, 3}
    assert np.all(paired.q[:4] < 0.05) and paired.significant_fdr.sum() <= 5
    assert unpaired.significant_fdr.sum() == 0
    assert paired.summary()["test"] == "wilcoxon_signed_rank" and "cohens_dz" in paired.table()


# ----------------------------------------------------------------------------- scipy calls
@pytest.mark.parametrize("n1,n2", [(1, 2), (4, 6), (8, 12), (12, 9)])
def test_mann_whitney_equals_per_feature_scipy_with_ties_and_constant_features(monkeypatch, n1, n2):
    """Vectorised calls split by method give what one scipy call per feature gives: tied,
    untied, constant (zero variance: p = 1) and one-group-constant features, in blocks so small
    that some hold only one kind."""
    import marlin_jax.analysis.stats as stats_mod

    rng = np.random.default_rng(n1 * 10 + n2)
    a, b = rng.normal(size=(n1, 30)), rng.normal(size=(n2, 30)) + 0.5
    a[:, :10], b[:, :10] = np.round(a[:, :10]), np.round(b[:, :10])  # ties
    a[:, 10:13], b[:, 10:13] = 2.0, 2.0  # constant
    a[:, 13] = -1.0  # one group constant
    monkeypatch.setattr(stats_mod, "_MWU_BLOCK_VALUES", 4 * (n1 + n2))  # blocks of 4 features
    u, p = mann_whitney_u(a, b)
    u_ref, p_ref = _scipy_mwu(a, b)
    np.testing.assert_array_equal(u, u_ref)
    np.testing.assert_allclose(p, p_ref, rtol=1e-12, atol=0)
    assert np.all(p[10:13] == 1.0)
    a[0, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        mann_whitney_u(a, b)


def test_q_values_are_scipy_benjamini_hochberg():
    """Both comparisons report scipy's Benjamini-Hochberg q-values of their p-values, and a
    bad alpha is refused."""
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(12, 30)), rng.normal(size=(12, 30))
    b[:, :5] += 1.0
    for res in (compare_groups(a, b, mmd_permutations=0), compare_paired(a, b)):
        np.testing.assert_array_equal(res.q, ss.false_discovery_control(res.p))
        np.testing.assert_array_equal(res.significant_fdr, res.q < 0.05)
    with pytest.raises(ValueError, match="alpha"):
        compare_groups(a, b, alpha=1.5, mmd_permutations=0)
