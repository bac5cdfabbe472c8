"""Runs the two-group analysis at each level and writes the report.

Output folder: ``report.md`` (summary, figures linked), ``summary.json`` (every count, MMD test
and top feature per level), ``features_<level>.csv`` (per-feature table), ``ranked_<level>.csv``
and ``ranked_features.xlsx`` (every feature ranked by q, then |d|, one sheet per level) and
``plots/<level>_*.png`` (distributions, difference heatmaps, feature importance, embeddings).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from marlin_jax.analysis.groups import FeatureGroups
from marlin_jax.analysis.stats import (
    EFFECT_BANDS,
    GroupComparison,
    compare_groups,
    compare_paired,
    rank_features,
)

__all__ = [
    "CLIP_LEVEL_WARNING",
    "mmd_linear_share",
    "ranked_table",
    "run_analysis",
    "write_feature_csv",
    "write_ranked_tables",
]

CLIP_LEVEL_WARNING = (
    "Clip-level tests treat every clip as an independent sample. Clips of one video share the "
    "person, session and recording, so they are not independent: the effective sample size is "
    "closer to the number of videos, and clip-level p-values (and q-values) overstate "
    "significance. Base conclusions on the video-level analysis (one mean feature vector per "
    "video); use the clip level only to describe within-video variation."
)


def write_feature_csv(table: dict[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Writes a table of columns (e.g. :meth:`GroupComparison.table`) as a CSV, one row per feature."""
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(table))
        w.writerows(zip(*([_csv_value(v) for v in col] for col in table.values()), strict=True))
    return path


def mmd_linear_share(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Each feature's share ``(D,)`` of the linear-kernel MMD² between ``a (n1, D)`` and
    ``b (n2, D)`` standardised per feature (pooled over both groups): ``delta_j² / sum delta²``
    with ``delta = (mean_a - mean_b) / sd``. Sums to 1 (all 0 when the means agree)."""
    both = np.concatenate([a, b], axis=0)
    sd = both.std(0)
    delta = (a.mean(0) - b.mean(0)) / np.where(sd > 0, sd, 1.0)
    sq = delta**2
    total = sq.sum()
    return sq / total if total > 0 else np.zeros_like(sq)


def ranked_table(res: GroupComparison, mmd_share: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every feature ranked as the report ranks its top features (ascending q, then descending
    |d|): columns rank, feature, means, p, q, d (d_z when paired), significance flag and, when
    given, the MMD share; row i is rank i + 1."""
    order = rank_features(res.q, res.d)
    table = {
        "rank": np.arange(1, order.size + 1),
        "feature": order,
        "p_value": res.p[order],
        "q_value_bh": res.q[order],
        res.d_name: res.d[order],
        "mean_" + res.group_a: res.mean_a[order],
        "mean_" + res.group_b: res.mean_b[order],
        "significant_fdr": res.significant_fdr[order],
    }
    if mmd_share is not None:
        table["mmd_linear_share"] = mmd_share[order]
    return table


def write_ranked_tables(tables: dict[str, dict[str, np.ndarray]], output_dir: str | os.PathLike) -> str | None:
    """Writes ``ranked_<level>.csv`` per level and ``ranked_features.xlsx`` (one sheet per
    level); returns a note when openpyxl is missing (no workbook)."""
    out = Path(output_dir)
    for level, table in tables.items():
        write_feature_csv(table, out / f"ranked_{level}.csv")
    if not tables:
        return None
    try:
        from openpyxl import Workbook
    except ImportError:
        return "ranked_features.xlsx not written: openpyxl is not installed"
    wb = Workbook()
    wb.remove(wb.active)
    for level, table in tables.items():
        ws = wb.create_sheet(level)
        ws.append(list(table))
        for row in zip(*table.values(), strict=True):
            ws.append([_excel_value(v) for v in row])
        ws.freeze_panes = "A2"
    wb.save(out / "ranked_features.xlsx")
    return None


def _excel_value(v):
    if isinstance(v, np.bool_ | np.integer):
        return v.item()
    v = float(v)
    return v if np.isfinite(v) else str(v)  # Excel has no NaN / inf


def _csv_value(v):
    if isinstance(v, np.bool_ | bool | np.integer):
        return int(v)
    return repr(float(v))


def _fmt(x: float) -> str:
    if not np.isfinite(x):
        return str(x)
    return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def run_analysis(
    groups: FeatureGroups,
    output_dir: str | os.PathLike,
    *,
    alpha: float = 0.05,
    top_k: int = 20,
    levels: Sequence[str] = ("clip", "video"),
    mmd_permutations: int = 1000,
    mmd_max_samples: int | None = 2000,
    embeddings: Sequence[str] = ("pca", "umap", "tsne"),
    plots: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Compares the two groups at each level, writes tables, plots and ``report.md``; returns
    the report path. ``progress``: a tqdm bar (stderr) over the levels and their steps."""
    out = Path(output_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    names = groups.names
    summary: dict = {
        "groups": list(names),
        "source": groups.source,
        "counts": groups.counts(),
        "feature_dim": groups.dim,
        "notes": list(groups.notes),
        "clip_level_warning": CLIP_LEVEL_WARNING,
        "levels": {},
    }
    sections = []
    ranked: dict[str, dict[str, np.ndarray]] = {}
    bar = tqdm(total=len(levels), desc="analysis", unit="level", disable=not progress)
    for level in levels:
        bar.set_postfix_str(f"{level}: tests")
        paired = level == "paired"
        a, b = groups.paired() if paired else (groups.samples(names[0], level), groups.samples(names[1], level))
        if a.shape[0] + (0 if paired else b.shape[0]) < 3:
            summary["notes"].append(
                f"paired level skipped: {a.shape[0]} video id(s) are in both groups, a paired test needs at least 3"
                if paired else f"{level} level skipped: fewer than 3 samples in total")
            bar.update()
            continue
        if paired:
            res = compare_paired(a, b, names=names, alpha=alpha, top_k=top_k)
        else:
            res = compare_groups(a, b, names=names, alpha=alpha, top_k=top_k, mmd_permutations=mmd_permutations,
                                 mmd_max_samples=mmd_max_samples, seed=seed)
        csv_path = write_feature_csv(res.table(), out / f"features_{level}.csv")
        ranked[level] = table = ranked_table(res, None if paired else mmd_linear_share(a, b))
        figures: dict[str, str] = {}
        level_notes: list[str] = []
        if plots:
            from marlin_jax.analysis import plots as pl

            bar.set_postfix_str(f"{level}: plots")
            t = f"{level} level: {names[0]} vs {names[1]}"
            figures = {"top feature distributions": f"plots/{level}_top_features.png",
                       "feature differences": f"plots/{level}_feature_differences.png",
                       "feature importance": f"plots/{level}_feature_importance.png"}
            png = [out / f for f in figures.values()]
            pl.plot_top_feature_distributions(a, b, names, res.top[:12], res.d, res.q, png[0], title=t, paired=paired)
            pl.plot_feature_differences(a, b, names, res.d, res.q, alpha, res.top, png[1], title=t, paired=paired)
            pl.plot_feature_importance(res.top, res.d, res.q, png[2], names=names, alpha=alpha, paired=paired,
                                       title=f"{t}: top {len(res.top)} features by q, then |d|")
            if embeddings:
                emb = f"plots/{level}_embeddings.png"
                path, notes = pl.plot_embeddings(a, b, names, out / emb, methods=embeddings, seed=seed, title=t)
                level_notes += notes
                if path is not None:
                    figures["embeddings"] = emb
        if res.mmd is None and mmd_permutations > 0 and not paired:
            level_notes.append("MMD test skipped: it needs at least 2 samples in each group")
        entry = res.summary() | {"csv": csv_path.name, "ranked_csv": f"ranked_{level}.csv", "figures": figures,
                                 "notes": level_notes}
        keys = ["feature", "mean_" + names[0], "mean_" + names[1], res.d_name, "p_value", "q_value_bh"]
        keys += [] if paired else ["mmd_linear_share"]
        entry["top_table"] = [{k: (int if k == "feature" else float)(table[k][r]) for k in keys}
                              for r in range(len(res.top))]
        summary["levels"][level] = entry
        sections.append(_markdown_level(level, res, entry))
        bar.update()
    bar.close()

    excel_note = write_ranked_tables(ranked, out)
    if excel_note:
        summary["notes"].append(excel_note)
    elif ranked:
        summary["ranked_workbook"] = "ranked_features.xlsx"
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=lambda o: o.tolist()))
    report = out / "report.md"
    report.write_text(_markdown(summary, sections))
    return report


def _markdown_level(level: str, res: GroupComparison, entry: dict) -> str:
    a, b = res.group_a, res.group_b
    paired = level == "paired"
    d_name = "Cohen's d_z" if paired else "Cohen's d"
    lines = [f"## {level.capitalize()} level", ""]
    if level == "clip":
        lines += [f"> **Warning.** {CLIP_LEVEL_WARNING}", ""]
    if paired:
        samples = (f"Samples: {res.n_a} pairs (the mean feature vector of each video id present in both "
                   f"{a} and {b}); {res.num_features} features. Test: two-sided Wilcoxon signed-rank "
                   f"on the paired differences; effect size {d_name} = mean({a} - {b}) / sd({a} - {b}).")
    else:
        unit = "clips" if level == "clip" else "videos (mean over each video's clips)"
        samples = (f"Samples: {res.n_a} {a} and {res.n_b} {b} {unit}; {res.num_features} features. "
                   "Test: two-sided Mann-Whitney U.")
    lines += [
        samples,
        "",
        "| | count |",
        "|---|---|",
        f"| significant, uncorrected (p < {res.alpha:g}) | {entry['significant_uncorrected']} |",
        f"| significant after Benjamini-Hochberg (q < {res.alpha:g}) | "
        f"{entry['significant_fdr_bh']} |",
    ]
    for name, _, _ in EFFECT_BANDS:
        label = name.replace("|", "\\|")  # a bare | would split the Markdown table cell
        counts = f"{entry['effect_size_bands_all'][name]} / {entry['effect_size_bands_significant_fdr'][name]}"
        lines.append(f"| effect size {label}: all / FDR-significant | {counts} |")
    lines.append("")
    if res.mmd is not None:
        m = res.mmd
        lines += [
            f"Kernel two-sample test (RBF kernel, median-heuristic bandwidth {_fmt(m.bandwidth)}, "
            f"unbiased MMD², {m.n_permutations} permutations on {m.n_a} + {m.n_b} samples): "
            f"MMD² = {_fmt(m.mmd2)}, permutation p = {_fmt(m.p_value)}.",
            "",
        ]
    share_col = " MMD share |" if not paired else ""
    lines += [
        f"Top {len(res.top)} features (smallest q, then largest |d|; d = {a} - {b}"
        + ("; MMD share: the feature's part of the linear-kernel MMD² on standardised features"
           if not paired else "") + "):",
        "",
        f"| rank | feature | mean {a} | mean {b} | {d_name} | p | q (BH) |{share_col}",
        "|---|---|---|---|---|---|---|" + ("---|" if not paired else ""),
    ]
    for rank, row in enumerate(entry["top_table"], start=1):
        i = row["feature"]
        share = f" {row['mmd_linear_share']:.3f} |" if not paired else ""
        lines.append(
            f"| {rank} | {int(i)} | {_fmt(res.mean_a[i])} | {_fmt(res.mean_b[i])} | "
            f"{res.d[i]:+.3f} | {_fmt(res.p[i])} | {_fmt(res.q[i])} |{share}"
        )
    lines += [
        "",
        f"Per-feature table: [{entry['csv']}]({entry['csv']}); every feature ranked: "
        f"[{entry['ranked_csv']}]({entry['ranked_csv']}) (also a sheet of "
        "[ranked_features.xlsx](ranked_features.xlsx))",
        "",
    ]
    for name, path in entry["figures"].items():
        lines += [f"![{level} level: {name}]({path})", ""]
    lines += [f"- {note}" for note in entry["notes"]]
    return "\n".join(lines)


def _markdown(summary: dict, sections: list[str]) -> str:
    a, b = summary["groups"]
    counts = summary["counts"]
    lines = [
        f"# Feature analysis: {a} vs {b}",
        "",
        f"Groups from {summary['source']}; feature size {summary['feature_dim']}.",
        "",
        "| group | videos | clips |",
        "|---|---|---|",
    ]
    lines += [f"| {g} | {counts[g]['videos']} | {counts[g]['clips']} |" for g in (a, b)]
    lines += [
        "",
        "Per feature: two-sided Mann-Whitney U test (normal approximation with tie and continuity "
        "correction, exact null distribution for small samples without ties), Benjamini-Hochberg "
        "false discovery rate over all features, Cohen's d with the pooled standard deviation. "
        "Whole feature vectors: kernel maximum mean discrepancy (MMD) test with a permutation "
        "p-value. The paired level (when analysed) uses the two-sided Wilcoxon signed-rank test "
        "and Cohen's d_z instead.",
        "",
        "> **Clip level vs video level.** Clip-level p-values overstate significance when a "
        "video's clips are not independent (see the clip-level warning); the video-level "
        "analysis is the one to base conclusions on.",
        "",
    ]
    if summary["notes"]:
        lines += ["Notes:", ""] + [f"- {n}" for n in summary["notes"]] + [""]
    return "\n".join(lines + sections) + "\n"
