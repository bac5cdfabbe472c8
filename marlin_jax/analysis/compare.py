"""CLI: pre vs post Grad-CAM comparison of MARLIN feature dimensions for two videos.

    python -m marlin_jax.analysis.compare --checkpoint C --pre pre.mp4 --post post.mp4 --features 397 231 --output_dir O

Per feature: ``compare_feature<f>.png`` with four rows (pre frames, pre heat maps, post frames,
post heat maps), and ``compare_relevance.npz`` (token relevance and feature values of both
clips). The two heat maps of a feature share one scale unless ``--independent_scale``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from marlin_jax.analysis.heatmap import FeatureGradCam, frames_figure, load_clips, normalise, overlay, upsample
from marlin_jax.analysis.plots import save_figure
from marlin_jax.analysis.visualize import add_model_arguments, load_cam, note_frame_size
from marlin_jax.video_io import VideoReadError

__all__ = ["compare_videos", "main"]


def compare_videos(
    cam: FeatureGradCam,
    pre: str | os.PathLike,
    post: str | os.PathLike,
    features: Sequence[int],
    output_dir: str | os.PathLike,
    *,
    labels: tuple[str, str] = ("pre", "post"),
    window: int = 0,
    shared_scale: bool = True,
    alpha: float = 0.5,
    cmap: str = "jet",
    dpi: int = 300,
    frames_shown: int | None = None,
    progress: bool = False,
    **clip_kwargs,
) -> list[Path]:
    """Writes one four-row comparison PNG per feature; returns the written paths.
    ``progress``: a tqdm bar (stderr) over the features."""
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    clips = []
    for v in (pre, post):  # the window-th extraction window of each video
        stream = load_clips(v, cam.config, windows="all", **clip_kwargs)
        clips.append(next(itertools.islice(stream, window, None), None))
        if clips[-1] is None:
            raise ValueError(f"{v}: video has no window {window} (too short)")
    clips = np.stack(clips)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rel, vals = cam.relevance(clips, features)  # (2, F, t, h, w), (2, F)
    np.savez(out / "compare_relevance.npz", relevance=rel, values=vals,
             features=np.asarray(features), videos=np.asarray([str(pre), str(post)]))
    written = [out / "compare_relevance.npz"]
    for fi, f in enumerate(tqdm(features, desc="features", unit="feature",
                                disable=not progress)):
        scale = rel[:, fi].max() if shared_scale else None
        heat = upsample(normalise(rel[:, fi], scale), cam.config)  # (2, T, H, W)
        overlays = [overlay(clips[i], heat[i], alpha=alpha, cmap=cmap) for i in range(2)]
        title = (f"feature {f}: {labels[0]} {Path(pre).name} (value {vals[0, fi]:+.3f}) vs "
                 f"{labels[1]} {Path(post).name} (value {vals[1, fi]:+.3f})"
                 f"{'; shared scale' if shared_scale else ''}")
        rows = [(f"{label} {kind}", image) for label, clip, over in zip(labels, clips, overlays, strict=True)
                for kind, image in (("frames", clip), ("heatmap", over))]
        fig = frames_figure(rows, title, frames_shown=frames_shown)
        written.append(save_figure(fig, out / f"compare_feature{f}.png", dpi))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m marlin_jax.analysis.compare",
        description="Pre vs post Grad-CAM heat maps of MARLIN feature dimensions (4-row PNGs).",
    )
    parser.add_argument("--pre", "--pre_video", dest="pre", required=True, help="the 'pre' video")
    parser.add_argument("--post", "--post_video", dest="post", required=True,
                        help="the 'post' video")
    add_model_arguments(parser)
    parser.add_argument("--labels", nargs=2, default=("pre", "post"), metavar=("PRE", "POST"))
    parser.add_argument("--window", type=int, default=0, help="which extraction window of each video")
    parser.add_argument("--independent_scale", action="store_true",
                        help="normalise each clip's heat map on its own (default: shared scale)")
    args = parser.parse_args(argv)

    cam, features = load_cam(parser, args)
    for video in (args.pre, args.post):
        note_frame_size(video, cam.config, args.crop_face)
    try:
        paths = compare_videos(
            cam, args.pre, args.post, features, args.output_dir,
            labels=tuple(args.labels), window=args.window, shared_scale=not args.independent_scale,
            alpha=args.alpha, cmap=args.cmap, dpi=args.dpi, frames_shown=args.frames_shown,
            progress=not args.no_progress, sample_rate=args.sample_rate, stride=args.stride,
            crop_face=args.crop_face,
        )
    except (VideoReadError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{len(paths)} files -> {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
