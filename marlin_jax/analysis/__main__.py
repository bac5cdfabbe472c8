"""The two-group statistics CLI: ``python -m marlin_jax.analysis`` (also run by the older
``python -m marlin_jax.analysis.stats``); writes the report of
:func:`marlin_jax.analysis.report.run_analysis`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from marlin_jax.analysis.groups import groups_from_args
from marlin_jax.analysis.report import run_analysis

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of :func:`main`."""
    parser = argparse.ArgumentParser(
        prog="python -m marlin_jax.analysis",
        description=(
            "Compare two groups of MARLIN feature files (.npy per video, (n_clips, D) or (D,)) "
            "at clip and video level: Mann-Whitney U + Benjamini-Hochberg FDR, Cohen's d, "
            "kernel MMD, plots and a Markdown/CSV/Excel/JSON report."
        ),
    )
    src = parser.add_argument_group("groups (a metadata table, or one folder per group)")
    src.add_argument("--features_dir", help="folder of .npy feature files (searched recursively)")
    src.add_argument("--meta", "--meta_path", dest="meta",
                     help="metadata table (.csv, .tsv, .xlsx) with one row per video")
    src.add_argument("--group_column",
                     help="metadata column holding the group of each video (default: outcome)")
    src.add_argument("--id_column",
                     help="metadata column naming the video (file name with or without extension); "
                     "default: the first of video/video_id/filename/file/name/id/path present")
    src.add_argument("--groups", nargs=2, metavar=("A", "B"),
                     help="the two group values to compare (required when the column has more than two)")
    src.add_argument("--group_dir", action="append", metavar="NAME=DIR",
                     help="a group as a folder of .npy files, e.g. --group_dir pre=F1 --group_dir post=F2")
    src.add_argument("--pre_dir", help="shorthand for --group_dir pre=DIR")
    src.add_argument("--post_dir", help="shorthand for --group_dir post=DIR")
    parser.add_argument("--output_dir", required=True, help="where the report and plots go")
    parser.add_argument("--alpha", type=float, default=0.05, help="FDR / significance level")
    parser.add_argument("--top_k", type=int, default=20, help="number of top features reported")
    parser.add_argument("--mmd_permutations", type=int, default=1000)
    parser.add_argument("--mmd_max_samples", type=int, default=2000)
    parser.add_argument(
        "--levels", nargs="+", choices=("clip", "video", "paired"), default=("clip", "video"),
        help="analysis levels: clip (every clip a sample), video (mean over its clips), paired "
        "(video means of the ids present in both groups, e.g. one subject pre and post: "
        "Wilcoxon signed-rank test)",
    )
    parser.add_argument("--embeddings", nargs="*", choices=("pca", "umap", "tsne"), default=("pca", "umap", "tsne"),
                        help="2-D embeddings to plot (none: no embedding plot)")
    parser.add_argument("--no_plots", action="store_true", help="write the tables only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        groups = groups_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    report = run_analysis(
        groups, args.output_dir, alpha=args.alpha, top_k=args.top_k, levels=tuple(args.levels),
        mmd_permutations=args.mmd_permutations, mmd_max_samples=args.mmd_max_samples,
        embeddings=() if args.no_plots else tuple(args.embeddings), plots=not args.no_plots, seed=args.seed,
        progress=not args.no_progress,
    )
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
