"""Two-group statistics over feature dimensions (pure numpy/scipy).

Everything is vectorised over the ``D`` feature dimensions: Mann-Whitney U and Wilcoxon are
vectorised ``scipy.stats`` calls (features split so each gets the method a per-feature call
would), Benjamini-Hochberg is ``scipy.stats.false_discovery_control``, and one kernel matrix
gives every permutation of the MMD test. Arrays are ``(n_samples, D)``: rows are clips or
videos, columns are features.

The command line lives in :mod:`marlin_jax.analysis.__main__` (``python -m marlin_jax.analysis``);
``python -m marlin_jax.analysis.stats`` still runs it. This module imports nothing of the
report, so report -> stats is the only direction.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from scipy import stats as sstats

__all__ = [
    "EFFECT_BANDS",
    "GroupComparison",
    "MMDResult",
    "benjamini_hochberg",
    "cohens_d",
    "cohens_dz",
    "compare_groups",
    "compare_paired",
    "effect_size_band_counts",
    "mann_whitney_u",
    "median_heuristic_bandwidth",
    "mmd2_unbiased",
    "mmd_permutation_test",
    "rbf_kernel",
    "wilcoxon_signed_rank",
]

# Cohen's conventional bands on |d| (the bins): > 0.8, (0.5, 0.8], <= 0.5.
EFFECT_BANDS: tuple[tuple[str, float, float], ...] = (
    ("large (|d| > 0.8)", 0.8, np.inf),
    ("medium (0.5 < |d| <= 0.8)", 0.5, 0.8),
    ("small (|d| <= 0.5)", -np.inf, 0.5),
)


def _as_samples(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"{name} must be (n_samples, D) or (n_samples,), got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} has no samples")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_samples(a, "group a"), _as_samples(b, "group b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"groups have different feature sizes: {a.shape[1]} vs {b.shape[1]}")
    return a, b


# ----------------------------------------------------------------------------- Mann-Whitney U
_MWU_BLOCK_VALUES = 1 << 22  # values per block of features (bounds scipy's ranking temporaries)


def mann_whitney_u(
    a: np.ndarray,
    b: np.ndarray,
    *,
    use_continuity: bool = True,
    method: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided Mann-Whitney U test of every feature: ``(U_a (D,), p (D,))``.

    ``a`` is ``(n1, D)``, ``b`` is ``(n2, D)``. ``U_a`` is the statistic of the first sample
    (as scipy). ``method="auto"`` picks, per feature, the exact null distribution when one
    sample has at most 8 values and that feature has no ties, and otherwise the normal
    approximation with tie correction and (optionally) continuity correction; this equals
    ``scipy.stats.mannwhitneyu(a[:, j], b[:, j])`` for every ``j``.

    scipy's vectorised ``method="auto"`` looks for ties across the whole array, so the features
    are split into an exact and an asymptotic set first and each set is one vectorised
    ``scipy.stats.mannwhitneyu(..., axis=0)`` call. A constant feature (one tie group) has zero
    variance: p = 1 with the continuity correction, NaN without (as scipy). An explicit
    ``method="exact"`` ignores ties and, as scipy, reads the no-ties null at ``floor(U)``.
    """
    if method not in ("auto", "exact", "asymptotic"):
        raise ValueError(f"method must be 'auto', 'exact' or 'asymptotic', got {method!r}")
    a, b = _check_pair(a, b)
    # features in blocks of about 4M values, so many clips never need many GB of temporaries
    step = max(1, _MWU_BLOCK_VALUES // (a.shape[0] + b.shape[0]))
    blocks = [
        _mwu_block(a[:, j : j + step], b[:, j : j + step], use_continuity, method)
        for j in range(0, a.shape[1], step)
    ]
    return np.concatenate([u for u, _ in blocks]), np.concatenate([p for _, p in blocks])


def _mwu_block(
    a: np.ndarray, b: np.ndarray, use_continuity: bool, method: str
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`mann_whitney_u` of ``(n1, d)`` and ``(n2, d)``: at most two scipy calls."""
    n1, n2, d = a.shape[0], b.shape[0], a.shape[1]
    if method == "auto":  # scipy's per-call rule, applied per feature
        if min(n1, n2) <= 8:
            s = np.sort(np.concatenate([a, b], axis=0), axis=0)
            exact = ~np.any(s[1:] == s[:-1], axis=0)
        else:
            exact = np.zeros(d, dtype=bool)
    else:
        exact = np.full(d, method == "exact")
    u, p = np.empty(d), np.empty(d)
    for subset, sub_method in ((exact, "exact"), (~exact, "asymptotic")):
        if not subset.any():
            continue
        res = sstats.mannwhitneyu(
            a[:, subset], b[:, subset], use_continuity=use_continuity, method=sub_method, axis=0
        )
        u[subset], p[subset] = res.statistic, res.pvalue
    return u, p


def wilcoxon_signed_rank(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided Wilcoxon signed-rank test of paired samples ``a[i]`` vs ``b[i]`` for every
    feature: ``(W (D,), p (D,))``, equal to ``scipy.stats.wilcoxon(a[:, j], b[:, j])`` for each
    ``j`` (zero differences dropped). A feature whose differences are all zero gets W = 0, p = 1.

    scipy's ``method="auto"`` depends on ties and zero differences, which it looks for across
    the whole array in a vectorised call; the features with and without them are therefore
    tested in two separate (vectorised) calls so each gets the method a per-feature call would.
    """
    a, b = _check_pair(a, b)
    if a.shape != b.shape:
        raise ValueError(f"paired samples need equal shapes, got {a.shape} and {b.shape}")
    diff = a - b
    absd = np.sort(np.abs(diff), axis=0)
    tied = np.any((absd[1:] == absd[:-1]) & (absd[1:] != 0), axis=0) | np.any(diff == 0, axis=0)
    none = np.all(diff == 0, axis=0)
    w, p = np.zeros(a.shape[1]), np.ones(a.shape[1])
    for subset in (~tied, tied & ~none):
        if not subset.any():
            continue
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            res = sstats.wilcoxon(a[:, subset], b[:, subset], axis=0)
        w[subset], p[subset] = res.statistic, res.pvalue
    return w, p


def cohens_dz(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Paired effect size ``d_z = mean(a - b) / sd(a - b)`` (unbiased sd) per feature: ``(D,)``.
    Zero sd gives 0 for a zero mean difference, else +-inf."""
    a, b = _check_pair(a, b)
    if a.shape != b.shape or a.shape[0] < 2:
        raise ValueError(f"d_z needs >= 2 pairs of equal shapes, got {a.shape} and {b.shape}")
    diff = a - b
    mean, sd = diff.mean(0), diff.std(0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = mean / sd
    zero = sd == 0
    d[zero] = np.where(mean[zero] == 0, 0.0, np.copysign(np.inf, mean[zero]))
    return d


# ----------------------------------------------------------------------------- FDR
def benjamini_hochberg(p: np.ndarray, method: str = "bh") -> np.ndarray:
    """FDR-adjusted p-values (q-values) of a 1-D array, Benjamini-Hochberg (``"bh"``) or
    Benjamini-Yekutieli (``"by"``): ``scipy.stats.false_discovery_control(p, method=method)``
    after checking the input (an empty array gives an empty array).

    Rejecting ``q <= alpha`` controls the false discovery rate at ``alpha`` (``"bh"``: for
    independent or positively dependent tests; ``"by"``: under any dependence).
    """
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"p-values must be 1-D, got shape {p.shape}")
    if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("p-values must be numbers in [0, 1]")
    if method not in ("bh", "by"):
        raise ValueError(f"method must be 'bh' or 'by', got {method!r}")
    if p.size == 0:
        return p.copy()
    return np.asarray(sstats.false_discovery_control(p, method=method), dtype=np.float64)


# ----------------------------------------------------------------------------- effect size
def cohens_d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cohen's d of every feature, ``(mean_a - mean_b) / pooled SD``: ``(D,)``.

    Pooled SD = ``sqrt(((n1-1) s1^2 + (n2-1) s2^2) / (n1 + n2 - 2))`` with unbiased variances.
    A feature with zero pooled SD gets d = 0 if the means are equal, else +-inf.
    """
    a, b = _check_pair(a, b)
    n1, n2 = a.shape[0], b.shape[0]
    if n1 + n2 < 3:
        raise ValueError(f"Cohen's d needs at least 3 samples in total, got {n1} + {n2}")
    diff = a.mean(0) - b.mean(0)
    ss = a.var(0, ddof=0) * n1 + b.var(0, ddof=0) * n2  # sums of squared deviations
    sd = np.sqrt(ss / (n1 + n2 - 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        d = diff / sd
    zero = sd == 0
    d[zero] = np.where(diff[zero] == 0, 0.0, np.copysign(np.inf, diff[zero]))
    return d


def effect_size_band_counts(d: np.ndarray, mask: np.ndarray | None = None) -> dict[str, int]:
    """How many features (optionally only where ``mask``) fall in each |d| band of
    :data:`EFFECT_BANDS`."""
    ad = np.abs(np.asarray(d, dtype=np.float64))
    if mask is not None:
        ad = ad[np.asarray(mask, dtype=bool)]
    return {name: int(np.sum((ad > lo) & (ad <= hi))) for name, lo, hi in EFFECT_BANDS}


# ----------------------------------------------------------------------------- MMD
def _sq_dists(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d2 = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return np.maximum(d2, 0.0)


def median_heuristic_bandwidth(z: np.ndarray) -> float:
    """Median of the pairwise Euclidean distances ``||z_i - z_j||`` over ``i < j``.

    Falls back to 1.0 when all points coincide (the kernel is then constant anyway)."""
    z = _as_samples(z, "samples")
    if z.shape[0] < 2:
        raise ValueError("the median heuristic needs at least 2 samples")
    iu = np.triu_indices(z.shape[0], k=1)
    med = float(np.median(np.sqrt(_sq_dists(z, z)[iu])))
    return med if med > 0 else 1.0


def rbf_kernel(x: np.ndarray, y: np.ndarray, bandwidth: float) -> np.ndarray:
    """Gaussian kernel ``exp(-||x_i - y_j||^2 / (2 bandwidth^2))``: ``(n_x, n_y)``."""
    return np.exp(-_sq_dists(x, y) / (2.0 * bandwidth**2))


def _mmd2_from_sums(s_aa, s_bb, s_ab, n1: int, n2: int):
    return s_aa / (n1 * (n1 - 1)) + s_bb / (n2 * (n2 - 1)) - 2.0 * s_ab / (n1 * n2)


def mmd2_unbiased(a: np.ndarray, b: np.ndarray, bandwidth: float) -> float:
    """Unbiased estimate of the squared MMD with an RBF kernel (Gretton et al. 2012, eq. 3):
    within-group sums exclude the diagonal."""
    a, b = _check_pair(a, b)
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("the unbiased MMD needs at least 2 samples per group")
    kaa, kbb, kab = rbf_kernel(a, a, bandwidth), rbf_kernel(b, b, bandwidth), rbf_kernel(a, b, bandwidth)
    s_aa = kaa.sum() - np.trace(kaa)
    s_bb = kbb.sum() - np.trace(kbb)
    return float(_mmd2_from_sums(s_aa, s_bb, kab.sum(), a.shape[0], b.shape[0]))


@dataclasses.dataclass(frozen=True)
class MMDResult:
    """Kernel two-sample test result: unbiased MMD^2, permutation p-value and settings."""

    mmd2: float
    p_value: float
    bandwidth: float
    n_permutations: int
    n_a: int
    n_b: int


def mmd_permutation_test(
    a: np.ndarray,
    b: np.ndarray,
    *,
    n_permutations: int = 1000,
    bandwidth: float | None = None,
    seed: int = 0,
    chunk: int = 256,
) -> MMDResult:
    """RBF-kernel MMD two-sample test with a permutation p-value.

    The bandwidth defaults to the median heuristic on the pooled samples. Permutation ``k`` uses
    the ``k``-th ``rng.permutation(n1 + n2)`` of ``np.random.default_rng(seed)``; its first
    ``n1`` indices form group a. The p-value is ``(1 + #{MMD^2_perm >= MMD^2_obs}) /
    (1 + n_permutations)`` (valid: never 0). All permutations reuse one pooled kernel matrix:
    with the off-diagonal kernel ``K0`` and group indicator ``z``, the within/between sums are
    ``z'K0z``, ``(1-z)'K0(1-z)`` and ``z'K0(1-z)``, so ``chunk`` permutations cost one matmul.
    """
    a, b = _check_pair(a, b)
    n1, n2 = a.shape[0], b.shape[0]
    if n1 < 2 or n2 < 2:
        raise ValueError(f"the MMD test needs at least 2 samples per group, got {n1} and {n2}")
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    z = np.concatenate([a, b], axis=0)
    n = n1 + n2
    bw = median_heuristic_bandwidth(z) if bandwidth is None else float(bandwidth)
    k0 = rbf_kernel(z, z, bw)
    np.fill_diagonal(k0, 0.0)
    row = k0.sum(1)
    total = row.sum()

    def stats_for(ind: np.ndarray) -> np.ndarray:  # ind: (P, n) 0/1 rows, 1 = group a
        s_aa = np.einsum("pi,pi->p", ind @ k0, ind)
        z_row = ind @ row
        s_ab = z_row - s_aa
        s_bb = total - 2.0 * z_row + s_aa
        return _mmd2_from_sums(s_aa, s_bb, s_ab, n1, n2)

    observed = float(stats_for(np.r_[np.ones(n1), np.zeros(n2)][None])[0])
    rng = np.random.default_rng(seed)
    exceed = 0
    for start in range(0, n_permutations, chunk):
        p = min(chunk, n_permutations - start)
        ind = np.zeros((p, n))
        for r in range(p):
            ind[r, rng.permutation(n)[:n1]] = 1.0
        # tolerance: permutations equal to the observed split must count as ">="
        exceed += int(np.sum(stats_for(ind) >= observed - 1e-12 * max(1.0, abs(observed))))
    p_value = (1 + exceed) / (1 + n_permutations)
    return MMDResult(observed, p_value, bw, n_permutations, n1, n2)


# ----------------------------------------------------------------------------- all together
@dataclasses.dataclass
class GroupComparison:
    """Per-feature statistics of group a vs group b, plus the multivariate MMD test.

    Arrays are ``(D,)``; ``top`` holds feature indices ordered by q-value, then by |d|.
    """

    group_a: str
    group_b: str
    n_a: int
    n_b: int
    u: np.ndarray
    p: np.ndarray
    q: np.ndarray
    d: np.ndarray
    mean_a: np.ndarray
    mean_b: np.ndarray
    alpha: float
    top: np.ndarray
    mmd: MMDResult | None
    test: str = "mann_whitney_u"  # or "wilcoxon_signed_rank" (paired; d is then Cohen's d_z)

    @property
    def num_features(self) -> int:
        return int(self.p.size)

    @property
    def significant_raw(self) -> np.ndarray:
        return self.p < self.alpha

    @property
    def significant_fdr(self) -> np.ndarray:
        return self.q < self.alpha

    def summary(self) -> dict:
        """JSON-ready counts: significant before/after FDR, by |d| band, and the MMD test."""
        out = {
            "group_a": self.group_a,
            "group_b": self.group_b,
            "n_a": self.n_a,
            "n_b": self.n_b,
            "num_features": self.num_features,
            "alpha": self.alpha,
            "test": self.test,
            "significant_uncorrected": int(self.significant_raw.sum()),
            "significant_fdr_bh": int(self.significant_fdr.sum()),
            "effect_size_bands_all": effect_size_band_counts(self.d),
            "effect_size_bands_significant_fdr": effect_size_band_counts(
                self.d, self.significant_fdr
            ),
            "top_features": [int(i) for i in self.top],
        }
        if self.mmd is not None:
            out["mmd"] = dataclasses.asdict(self.mmd)
        return out

    def table(self) -> dict[str, np.ndarray]:
        """Per-feature columns (for a CSV), in feature order."""
        return {
            "feature": np.arange(self.num_features),
            "mean_" + self.group_a: self.mean_a,
            "mean_" + self.group_b: self.mean_b,
            "cohens_dz" if self.test == "wilcoxon_signed_rank" else "cohens_d": self.d,
            self.test: self.u,
            "p_value": self.p,
            "q_value_bh": self.q,
            "significant_uncorrected": self.significant_raw,
            "significant_fdr": self.significant_fdr,
        }


def compare_groups(
    a: np.ndarray,
    b: np.ndarray,
    *,
    names: tuple[str, str] = ("a", "b"),
    alpha: float = 0.05,
    top_k: int = 20,
    mmd_permutations: int = 1000,
    mmd_max_samples: int | None = 2000,
    seed: int = 0,
) -> GroupComparison:
    """Runs every per-feature test and the MMD test on ``a (n1, D)`` vs ``b (n2, D)``.

    Top features: the ``top_k`` smallest q-values, ties broken by larger |d|. The MMD test uses
    at most ``mmd_max_samples`` rows in total (a seeded random subset, kept in proportion to the
    group sizes) so its ``(n, n)`` kernel stays in memory; ``mmd_permutations=0`` skips it.
    """
    a, b = _check_pair(a, b)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    u, p = mann_whitney_u(a, b)
    q = benjamini_hochberg(p)
    d = cohens_d(a, b)
    top = _top(q, d, top_k)
    mmd = None
    if mmd_permutations > 0 and a.shape[0] >= 2 and b.shape[0] >= 2:
        ma, mb = a, b
        n = a.shape[0] + b.shape[0]
        if mmd_max_samples is not None and n > mmd_max_samples:
            rng = np.random.default_rng(seed + 1)
            ka = max(2, round(mmd_max_samples * a.shape[0] / n))
            kb = max(2, mmd_max_samples - ka)
            ma = a[np.sort(rng.choice(a.shape[0], min(ka, a.shape[0]), replace=False))]
            mb = b[np.sort(rng.choice(b.shape[0], min(kb, b.shape[0]), replace=False))]
        mmd = mmd_permutation_test(ma, mb, n_permutations=mmd_permutations, seed=seed)
    return GroupComparison(
        group_a=names[0],
        group_b=names[1],
        n_a=a.shape[0],
        n_b=b.shape[0],
        u=u,
        p=p,
        q=q,
        d=d,
        mean_a=a.mean(0),
        mean_b=b.mean(0),
        alpha=alpha,
        top=top,
        mmd=mmd,
    )


def _top(q: np.ndarray, d: np.ndarray, k: int) -> np.ndarray:
    """Feature indices by ascending q, ties by descending |d| (infinite |d| first)."""
    return np.lexsort((-np.abs(np.nan_to_num(d, posinf=1e300, neginf=1e300)), q))[:k]


def compare_paired(
    a: np.ndarray,
    b: np.ndarray,
    *,
    names: tuple[str, str] = ("a", "b"),
    alpha: float = 0.05,
    top_k: int = 20,
) -> GroupComparison:
    """Paired comparison of ``a[i]`` vs ``b[i]`` (``(n, D)`` each; e.g. one subject's pre and
    post video): Wilcoxon signed-rank + Benjamini-Hochberg, Cohen's d_z. No MMD test."""
    a, b = _check_pair(a, b)
    w, p = wilcoxon_signed_rank(a, b)
    q = benjamini_hochberg(p)
    d = cohens_dz(a, b)
    return GroupComparison(
        group_a=names[0], group_b=names[1], n_a=a.shape[0], n_b=b.shape[0], u=w, p=p, q=q, d=d,
        mean_a=a.mean(0), mean_b=b.mean(0), alpha=alpha, top=_top(q, d, top_k), mmd=None,
        test="wilcoxon_signed_rank",
    )


if __name__ == "__main__":
    # The older entry point `python -m marlin_jax.analysis.stats` runs the package's CLI
    # (`python -m marlin_jax.analysis`); runpy keeps even this script path free of an import of
    # the CLI, so stats never depends on report.
    import runpy

    runpy.run_module("marlin_jax.analysis", run_name="__main__", alter_sys=True)
