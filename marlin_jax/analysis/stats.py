"""Two-group statistics over feature dimensions (pure numpy/scipy).

Arrays are ``(n_samples, D)``: rows are clips or videos, columns are features. Every test is
vectorised over the ``D`` features; one kernel matrix gives every permutation of the MMD test.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from scipy import stats as sstats
from scipy.spatial.distance import cdist, pdist

__all__ = [
    "EFFECT_BANDS",
    "GroupComparison",
    "MMDResult",
    "cohens_d",
    "cohens_dz",
    "compare_groups",
    "compare_paired",
    "effect_size_band_counts",
    "mann_whitney_u",
    "mmd_permutation_test",
    "rank_features",
    "wilcoxon_signed_rank",
]

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


def _check_pair(a: np.ndarray, b: np.ndarray, paired: bool = False) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_samples(a, "group a"), _as_samples(b, "group b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"groups have different feature sizes: {a.shape[1]} vs {b.shape[1]}")
    if paired and a.shape != b.shape:
        raise ValueError(f"paired samples need equal shapes, got {a.shape} and {b.shape}")
    return a, b


_MWU_BLOCK_VALUES = 1 << 22  # values per block of features (bounds scipy's ranking temporaries)


def mann_whitney_u(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided Mann-Whitney U test of every feature of ``a (n1, D)`` vs ``b (n2, D)``:
    ``(U_a (D,), p (D,))``, equal to ``scipy.stats.mannwhitneyu(a[:, j], b[:, j])`` for each ``j``.

    scipy's vectorised ``method="auto"`` looks for ties across the whole array, so each block of
    features is split into the features a per-feature call would test exactly (one sample of at
    most 8 values, no ties) and the rest, one vectorised call each.
    """
    a, b = _check_pair(a, b)
    step = max(1, _MWU_BLOCK_VALUES // (a.shape[0] + b.shape[0]))
    u, p = np.empty(a.shape[1]), np.empty(a.shape[1])
    for j in range(0, a.shape[1], step):
        ab, bb = a[:, j : j + step], b[:, j : j + step]
        s = np.sort(np.concatenate([ab, bb], axis=0), axis=0)
        exact = ~np.any(s[1:] == s[:-1], axis=0) & (min(len(ab), len(bb)) <= 8)
        for subset, method in ((exact, "exact"), (~exact, "asymptotic")):
            if subset.any():
                res = sstats.mannwhitneyu(ab[:, subset], bb[:, subset], method=method, axis=0)
                u[j : j + step][subset], p[j : j + step][subset] = res.statistic, res.pvalue
    return u, p


def wilcoxon_signed_rank(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided Wilcoxon signed-rank test of paired rows ``a[i]`` vs ``b[i]`` per feature:
    ``(W (D,), p (D,))``, equal to ``scipy.stats.wilcoxon(a[:, j], b[:, j])`` for each ``j``.
    A feature whose differences are all zero gets W = 0, p = 1.

    scipy's ``method="auto"`` looks for ties and zeros across the whole array, so features with
    and without them are tested in two separate vectorised calls.
    """
    a, b = _check_pair(a, b, paired=True)
    diff = a - b
    absd = np.sort(np.abs(diff), axis=0)
    tied = np.any((absd[1:] == absd[:-1]) & (absd[1:] != 0), axis=0) | np.any(diff == 0, axis=0)
    none = np.all(diff == 0, axis=0)
    w, p = np.zeros(a.shape[1]), np.ones(a.shape[1])
    for subset in (~tied, tied & ~none):
        if subset.any():
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore", RuntimeWarning)
                res = sstats.wilcoxon(a[:, subset], b[:, subset], axis=0)
            w[subset], p[subset] = res.statistic, res.pvalue
    return w, p


def _effect(diff: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """``diff / sd``; zero sd gives 0 for a zero difference, else +-inf."""
    return np.divide(diff, sd, out=np.where(diff == 0, 0.0, np.copysign(np.inf, diff)), where=sd != 0)


def cohens_dz(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Paired effect size ``d_z = mean(a - b) / sd(a - b)`` (unbiased sd) per feature: ``(D,)``."""
    a, b = _check_pair(a, b, paired=True)
    if a.shape[0] < 2:
        raise ValueError(f"d_z needs >= 2 pairs, got {a.shape[0]}")
    diff = a - b
    return _effect(diff.mean(0), diff.std(0, ddof=1))


def cohens_d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cohen's d of every feature, ``(mean_a - mean_b) / pooled SD``: ``(D,)``; pooled SD =
    ``sqrt(((n1-1) s1^2 + (n2-1) s2^2) / (n1 + n2 - 2))``. Zero SD gives 0 or +-inf."""
    a, b = _check_pair(a, b)
    n1, n2 = a.shape[0], b.shape[0]
    if n1 + n2 < 3:
        raise ValueError(f"Cohen's d needs at least 3 samples in total, got {n1} + {n2}")
    ss = a.var(0) * n1 + b.var(0) * n2  # sums of squared deviations
    return _effect(a.mean(0) - b.mean(0), np.sqrt(ss / (n1 + n2 - 2)))


def effect_size_band_counts(d: np.ndarray, mask: np.ndarray | None = None) -> dict[str, int]:
    """How many features (optionally only where ``mask``) fall in each |d| band of
    :data:`EFFECT_BANDS`."""
    ad = np.abs(np.asarray(d, dtype=np.float64))
    if mask is not None:
        ad = ad[np.asarray(mask, dtype=bool)]
    return {name: int(np.sum((ad > lo) & (ad <= hi))) for name, lo, hi in EFFECT_BANDS}


def rank_features(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Feature indices by ascending q, ties by descending |d| (infinite |d| first)."""
    return np.lexsort((-np.abs(np.nan_to_num(d, posinf=1e300, neginf=1e300)), q))


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
    """RBF-kernel MMD two-sample test (unbiased MMD^2, Gretton et al. 2012 eq. 3) with a
    permutation p-value.

    The bandwidth defaults to the median pairwise distance of the pooled samples (1.0 when all
    coincide). Permutation ``k`` uses the ``k``-th ``rng.permutation(n1 + n2)`` of
    ``np.random.default_rng(seed)``; its first ``n1`` indices form group a. p =
    ``(1 + #{MMD^2_perm >= MMD^2_obs}) / (1 + n_permutations)``. All permutations reuse one pooled
    kernel ``K0`` (zero diagonal): with the indicator ``z`` of group a, the within/between sums are
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
    bw = float(np.median(pdist(z)) or 1.0) if bandwidth is None else float(bandwidth)
    k0 = np.exp(-cdist(z, z, "sqeuclidean") / (2.0 * bw**2))
    np.fill_diagonal(k0, 0.0)
    row = k0.sum(1)
    total = row.sum()

    def stats_for(ind: np.ndarray) -> np.ndarray:  # ind: (P, n) 0/1 rows, 1 = group a
        s_aa = np.einsum("pi,pi->p", ind @ k0, ind)
        z_row = ind @ row
        s_bb = total - 2.0 * z_row + s_aa
        return s_aa / (n1 * (n1 - 1)) + s_bb / (n2 * (n2 - 1)) - 2.0 * (z_row - s_aa) / (n1 * n2)

    observed = float(stats_for(np.r_[np.ones(n1), np.zeros(n2)][None])[0])
    rng = np.random.default_rng(seed)
    exceed = 0
    for start in range(0, n_permutations, chunk):
        ind = np.zeros((min(chunk, n_permutations - start), n))
        for r in range(ind.shape[0]):
            ind[r, rng.permutation(n)[:n1]] = 1.0
        # tolerance: permutations equal to the observed split must count as ">="
        exceed += int(np.sum(stats_for(ind) >= observed - 1e-12 * max(1.0, abs(observed))))
    return MMDResult(observed, (1 + exceed) / (1 + n_permutations), bw, n_permutations, n1, n2)


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
    def d_name(self) -> str:
        """The effect size's column name: ``cohens_dz`` when paired, else ``cohens_d``."""
        return "cohens_dz" if self.test == "wilcoxon_signed_rank" else "cohens_d"

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
            "significant_uncorrected": int((self.p < self.alpha).sum()),
            "significant_fdr_bh": int(self.significant_fdr.sum()),
            "effect_size_bands_all": effect_size_band_counts(self.d),
            "effect_size_bands_significant_fdr": effect_size_band_counts(self.d, self.significant_fdr),
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
            self.d_name: self.d,
            self.test: self.u,
            "p_value": self.p,
            "q_value_bh": self.q,
            "significant_uncorrected": self.p < self.alpha,
            "significant_fdr": self.significant_fdr,
        }


def _comparison(a, b, names, alpha, top_k, stat, p, d, mmd, test) -> GroupComparison:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    q = sstats.false_discovery_control(p)  # Benjamini-Hochberg
    return GroupComparison(names[0], names[1], a.shape[0], b.shape[0], stat, p, q, d, a.mean(0), b.mean(0),
                           alpha, rank_features(q, d)[:top_k], mmd, test)


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
    """Mann-Whitney U + Benjamini-Hochberg, Cohen's d and the MMD test of ``a (n1, D)`` vs
    ``b (n2, D)``; ``top``: the ``top_k`` smallest q-values, ties broken by larger |d|.

    The MMD test uses at most ``mmd_max_samples`` rows in total (a seeded random subset in group
    proportion) so its ``(n, n)`` kernel stays in memory; ``mmd_permutations=0`` skips it.
    """
    a, b = _check_pair(a, b)
    u, p = mann_whitney_u(a, b)
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
    return _comparison(a, b, names, alpha, top_k, u, p, cohens_d(a, b), mmd, "mann_whitney_u")


def compare_paired(a: np.ndarray, b: np.ndarray, *, names: tuple[str, str] = ("a", "b"), alpha: float = 0.05,
                   top_k: int = 20) -> GroupComparison:
    """Paired comparison of ``a[i]`` vs ``b[i]`` (``(n, D)`` each; e.g. one subject's pre and
    post video): Wilcoxon signed-rank + Benjamini-Hochberg, Cohen's d_z. No MMD test."""
    a, b = _check_pair(a, b, paired=True)
    w, p = wilcoxon_signed_rank(a, b)
    return _comparison(a, b, names, alpha, top_k, w, p, cohens_dz(a, b), None, "wilcoxon_signed_rank")


if __name__ == "__main__":
    # the older `python -m marlin_jax.analysis.stats`; runpy keeps stats free of an import of the CLI
    import runpy

    runpy.run_module("marlin_jax.analysis", run_name="__main__", alter_sys=True)
