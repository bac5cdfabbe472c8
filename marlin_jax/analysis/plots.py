"""Plots of a two-group feature comparison. Figures are ``matplotlib.figure.Figure`` (no pyplot
state, no display needed); every function writes one PNG and returns its path."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

__all__ = [
    "GROUP_COLOURS",
    "embed_2d",
    "plot_embeddings",
    "plot_feature_differences",
    "plot_feature_importance",
    "plot_top_feature_distributions",
    "save_figure",
]

GROUP_COLOURS = ("#1f77b4", "#d62728")
_DPI = 150


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 300) -> Path:
    """Writes a figure as PNG (its folder created) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)  # constrained layout already fits the labels
    return path


def plot_top_feature_distributions(
    a: np.ndarray,
    b: np.ndarray,
    names: tuple[str, str],
    features: Sequence[int],
    d: np.ndarray,
    q: np.ndarray,
    path: str | os.PathLike,
    *,
    title: str = "",
    paired: bool = False,
    n_cols: int = 4,
) -> Path:
    """Violin plots (with the samples as jittered dots) of ``features`` for both groups.

    ``a (n1, D)``, ``b (n2, D)``; ``d``/``q`` (``(D,)``) label each panel with the effect size
    and the FDR q-value. ``paired``: row i of ``a`` and ``b`` are one subject, joined by a line.
    """
    features = [int(f) for f in features]
    if not features:
        raise ValueError("no features to plot")
    n_rows = -(-len(features) // n_cols)
    cols = min(n_cols, len(features))
    fig = Figure(figsize=(3.0 * cols, 2.6 * n_rows), layout="constrained")
    rng = np.random.default_rng(0)
    for k, f in enumerate(features):
        ax = fig.add_subplot(n_rows, cols, k + 1)
        data = [a[:, f], b[:, f]]
        parts = ax.violinplot(data, positions=[0, 1], showmedians=True, widths=0.8)
        for body, colour in zip(parts["bodies"], GROUP_COLOURS, strict=True):
            body.set(facecolor=colour, alpha=0.35)
        if paired:
            ax.plot([0, 1], np.stack(data), color="0.5", linewidth=0.6, alpha=0.6)
        for pos, (vals, colour) in enumerate(zip(data, GROUP_COLOURS, strict=True)):
            if vals.size > 400:  # dots stop being readable; keep a subset
                vals = rng.choice(vals, 400, replace=False)
            jitter = np.zeros(vals.size) if paired else rng.uniform(-0.12, 0.12, vals.size)
            ax.scatter(pos + jitter, vals, s=4, color=colour, alpha=0.6)
        ax.set_xticks([0, 1], list(names))
        d_name = "d_z" if paired else "d"
        ax.set_title(f"feature {f}\n{d_name} = {d[f]:+.2f}, q = {q[f]:.2g}", fontsize=9)
        ax.tick_params(labelsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, _DPI)


def plot_feature_differences(
    a: np.ndarray,
    b: np.ndarray,
    names: tuple[str, str],
    d: np.ndarray,
    q: np.ndarray,
    alpha: float,
    top: Sequence[int],
    path: str | os.PathLike,
    *,
    title: str = "",
    row_width: int = 32,
    paired: bool = False,
) -> Path:
    """Two heatmaps of the group differences.

    Left: Cohen's d (``paired``: Cohen's d_z) of every feature laid out in rows of ``row_width`` (feature ``i`` at row
    ``i // row_width``), FDR-significant features outlined. Right: the ``top`` features of every
    sample (rows, group a then group b), z-scored per feature over both groups.
    """
    n_rows = -(-d.size // row_width)
    grid = np.full((n_rows, row_width), np.nan)
    grid.flat[: d.size] = np.clip(np.nan_to_num(d, posinf=5.0, neginf=-5.0), -5, 5)
    lim = max(0.5, float(np.nanmax(np.abs(grid))))

    fig = Figure(figsize=(13, max(4.0, 0.22 * n_rows + 1.5)), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1.2, 1])
    im = ax1.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="none")
    sig = np.flatnonzero(q < alpha)
    ax1.scatter(sig % row_width, sig // row_width, s=10, facecolors="none", edgecolors="k",
                linewidths=0.6, label=f"q < {alpha:g}")
    step = max(1, n_rows // 12)
    ax1.set_yticks(range(0, n_rows, step), [str(r * row_width) for r in range(0, n_rows, step)])
    ax1.set_xlabel(f"feature index - row start (rows of {row_width})")
    ax1.set_ylabel("row start (feature index)")
    d_name = "d_z" if paired else "d"
    ax1.set_title(f"Cohen's {d_name} ({names[0]} - {names[1]}), {sig.size} FDR-significant")
    if sig.size:
        ax1.legend(loc="upper right", fontsize=8, framealpha=0.8)
    fig.colorbar(im, ax=ax1, shrink=0.8, label=d_name)

    top = [int(t) for t in top]
    both = np.concatenate([a[:, top], b[:, top]], axis=0)
    sd = both.std(0)
    z = (both - both.mean(0)) / np.where(sd > 0, sd, 1.0)
    im2 = ax2.imshow(np.clip(z, -3, 3), cmap="RdBu_r", vmin=-3, vmax=3, aspect="auto",
                     interpolation="none")
    ax2.axhline(a.shape[0] - 0.5, color="k", linewidth=1.2)
    ax2.set_xticks(range(len(top)), [str(t) for t in top], rotation=90, fontsize=7)
    ax2.set_yticks([(a.shape[0] - 1) / 2, a.shape[0] + (b.shape[0] - 1) / 2], list(names))
    ax2.set_xlabel("top features")
    ax2.set_title("top features per sample (z-score)")
    fig.colorbar(im2, ax=ax2, shrink=0.8, label="z")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, _DPI)


def plot_feature_importance(
    features: Sequence[int],
    d: np.ndarray,
    q: np.ndarray,
    path: str | os.PathLike,
    *,
    names: tuple[str, str] = ("a", "b"),
    alpha: float = 0.05,
    paired: bool = False,
    title: str = "",
) -> Path:
    """Horizontal bar chart of |Cohen's d| (``paired``: d_z) of the ranked ``features`` (best
    at the top), coloured by the sign of d (``names[0]`` higher: group a's colour), FDR-
    significant bars (q < ``alpha``) solid and the others hatched, each labelled with its q."""
    features = [int(f) for f in features]
    if not features:
        raise ValueError("no features to plot")
    eff = np.nan_to_num(d[features], posinf=5.0, neginf=-5.0)
    fig = Figure(figsize=(6.5, 1.2 + 0.32 * len(features)), layout="constrained")
    ax = fig.add_subplot()
    pos = np.arange(len(features))[::-1]
    colours = [GROUP_COLOURS[0] if e >= 0 else GROUP_COLOURS[1] for e in eff]
    bars = ax.barh(pos, np.abs(eff), color=colours, alpha=0.8)
    for bar, f in zip(bars, features, strict=True):
        if not q[f] < alpha:
            bar.set(hatch="//", alpha=0.45)
        ax.annotate(f" q = {q[f]:.2g}", (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                    va="center", fontsize=7)
    ax.set_yticks(pos, [f"feature {f}" for f in features], fontsize=8)
    d_name = "d_z" if paired else "d"
    ax.set_xlabel(f"|Cohen's {d_name}|  (hatched: q >= {alpha:g})", fontsize=8)
    ax.legend(handles=[Patch(color=GROUP_COLOURS[0], label=f"{names[0]} higher"),
                       Patch(color=GROUP_COLOURS[1], label=f"{names[1]} higher")],
              loc="lower right", fontsize=7, framealpha=0.8)
    ax.set_xlim(0, max(0.5, float(np.abs(eff).max())) * 1.3)
    ax.set_title(title or f"feature importance: top {len(features)} features", fontsize=10)
    return save_figure(fig, path, _DPI)


_EMBEDDINGS = {"pca": "PCA", "umap": "UMAP", "tsne": "t-SNE"}


def embed_2d(x: np.ndarray, method: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """2-D embedding ``(n, 2)`` of standardised rows of ``x (n, D)``: ``"pca"``, ``"umap"`` or
    ``"tsne"``; PCA also gives the explained variance ratio ``(2,)`` of its components (0 for one
    that does not exist), the others None. Raises ValueError when there are too few samples."""
    if method not in _EMBEDDINGS:
        raise ValueError(f"unknown embedding {method!r} (use pca, umap or tsne)")
    n = x.shape[0]
    if n < (2 if method == "pca" else 5):
        raise ValueError(f"{_EMBEDDINGS[method]} needs at least {2 if method == 'pca' else 5} samples, got {n}")
    sd = x.std(0)
    x = (x - x.mean(0)) / np.where(sd > 0, sd, 1.0)
    if method == "pca":
        from sklearn.decomposition import PCA

        k = min(2, n, x.shape[1])
        pca = PCA(n_components=k, random_state=seed)
        y = pca.fit_transform(x)
        ratio = np.nan_to_num(np.asarray(pca.explained_variance_ratio_, dtype=np.float64))
        return np.pad(y, ((0, 0), (0, 2 - k))), np.pad(ratio, (0, 2 - k))
    if method == "tsne":
        from sklearn.manifold import TSNE

        return TSNE(n_components=2, perplexity=float(min(30.0, (n - 1) / 3.0)), init="pca",
                    random_state=seed).fit_transform(x), None
    import umap  # umap-learn (numba); imported lazily: its import is slow

    reducer = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed, n_jobs=1)
    return np.asarray(reducer.fit_transform(x)), None


def plot_embeddings(
    a: np.ndarray,
    b: np.ndarray,
    names: tuple[str, str],
    path: str | os.PathLike,
    *,
    methods: Sequence[str] = ("pca", "umap", "tsne"),
    max_points: int = 3000,
    seed: int = 0,
    title: str = "",
) -> tuple[Path | None, list[str]]:
    """Scatter of the 2-D embeddings (one panel per method) coloured by group.

    At most ``max_points`` samples (a seeded random subset, in group proportion) are embedded.
    Returns the PNG path (None when no method could run) and notes on skipped methods. The PCA
    panel's axes name the components and the share of variance each explains.
    """
    rng = np.random.default_rng(seed)
    n = a.shape[0] + b.shape[0]
    notes = []
    if n > max_points:
        ka = max(1, round(max_points * a.shape[0] / n))
        a = a[rng.choice(a.shape[0], min(ka, a.shape[0]), replace=False)]
        b = b[rng.choice(b.shape[0], min(max_points - ka, b.shape[0]), replace=False)]
        notes.append(f"embeddings use a random subset of {a.shape[0] + b.shape[0]} of {n} samples")
    x = np.concatenate([a, b], axis=0)
    label = np.r_[np.zeros(a.shape[0], int), np.ones(b.shape[0], int)]
    results = []
    for m in methods:
        try:
            results.append((m, *embed_2d(x, m, seed)))
        except (ValueError, ImportError) as e:
            notes.append(f"{m.upper()} skipped: {e}")
    if not results:
        return None, notes
    fig = Figure(figsize=(4.5 * len(results), 4.2), layout="constrained")
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for ax, (m, y, explained) in zip(axes, results, strict=True):
        for g in (0, 1):
            ax.scatter(y[label == g, 0], y[label == g, 1], s=12, alpha=0.7,
                       color=GROUP_COLOURS[g], label=f"{names[g]} (n={int(np.sum(label == g))})")
        ax.set_title(_EMBEDDINGS[m])
        if explained is not None:
            ax.set_xlabel(f"PC1 ({100 * explained[0]:.1f}% of variance)")
            ax.set_ylabel(f"PC2 ({100 * explained[1]:.1f}% of variance)")
            ax.tick_params(labelsize=7)
        else:
            ax.set(xlabel=f"{_EMBEDDINGS[m]} 1", ylabel=f"{_EMBEDDINGS[m]} 2", xticks=[], yticks=[])
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, _DPI), notes
