"""CLI: Grad-CAM heat maps of chosen MARLIN feature dimensions over a video.

    python -m marlin_jax.analysis.visualize --checkpoint C --model marlin_vit_base_ytf \
        --video V.mp4 --features 397 231 490 482 456 --output_dir O [--windows all] [--save_video]

Per video and feature: ``<video>_feature<f>.png`` (frames over heat-map overlays, 300 dpi; with
``--windows all`` one PNG per window, ``..._window<k>.png``), optionally
``<video>_feature<f>.mp4`` (frame | overlay side by side, every window in turn), and
``<video>_relevance.npz`` with the raw token relevance ``(windows, F, t, h, w)`` and the feature
values ``(windows, F)``. Windows are the extraction windows (``--sample_rate``, ``--stride``);
a video shorter than one clip is padded by repeating its last frame. Heat maps of one video and
feature share one scale over all its windows, so the windows can be compared.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from marlin_jax.analysis.heatmap import (
    MODES,
    FeatureGradCam,
    heatmap_grid_figure,
    load_clips,
    normalise,
    overlay,
    save_figure,
    side_by_side,
    upsample,
)

__all__ = [
    "add_model_arguments",
    "build_gradcam",
    "clip_relevance",
    "frame_size_note",
    "main",
    "resolve_features",
    "top_features_from_summary",
    "visualize_video",
]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by the heat-map CLIs: model, checkpoint, windows, Grad-CAM, drawing."""
    parser.add_argument("--checkpoint", required=True,
                        help=".pt / .ckpt / VideoMAE checkpoint or marlin-jax checkpoint folder")
    parser.add_argument("--model", default="marlin_vit_base_ytf", help="registered model name")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--features", type=int, nargs="+",
                       help="feature indices of the mean-pooled embedding, e.g. 397 231 490")
    which.add_argument("--top_features_from", metavar="SUMMARY_JSON",
                       help="take the top features of a statistics report (its summary.json; "
                            "video level if present, else clip level)")
    parser.add_argument("--num_top", type=int, default=5,
                        help="how many features --top_features_from takes")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--sample_rate", type=int, default=2, help="take every n-th frame")
    parser.add_argument("--stride", type=int, default=16, help="window stride in sampled frames")
    parser.add_argument("--crop_face", action="store_true",
                        help="detect and crop the face (else non-square frames are centre-cropped)")
    parser.add_argument("--layer", type=int, default=-1,
                        help="encoder block whose output tokens are weighted (-1 = last)")
    parser.add_argument("--mode", choices=MODES, default="gradcam",
                        help="gradcam: token-averaged gradients; hires: per-token gradient x activation")
    parser.add_argument("--alpha", type=float, default=0.5, help="heat-map opacity")
    parser.add_argument("--cmap", default="jet", help="matplotlib colour map")
    parser.add_argument("--dpi", type=int, default=300)
    parser.add_argument("--frames_shown", type=int, default=None,
                        help="frames per PNG (evenly spaced; default: all of the clip)")
    parser.add_argument("--batch_size", type=int, default=4, help="clips per jitted call")


def top_features_from_summary(path: str | os.PathLike, num: int) -> list[int]:
    """The first ``num`` top features of a statistics report's ``summary.json`` (video level
    when it was analysed, else clip level)."""
    import json

    path = Path(path)
    try:
        levels = json.loads(path.read_text())["levels"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a statistics summary.json ({e})") from e
    for level in ("video", "clip"):
        if level in levels:
            return [int(f) for f in levels[level]["top_features"][:num]]
    raise ValueError(f"{path}: the summary holds no analysed level")


def resolve_features(parser: argparse.ArgumentParser, args: argparse.Namespace,
                     cam: FeatureGradCam) -> list[int]:
    """The feature indices asked for (``--features`` or ``--top_features_from``); exits with a
    usage error when one is outside the model's feature size."""
    try:
        features = (list(args.features) if args.features is not None
                    else top_features_from_summary(args.top_features_from, args.num_top))
    except ValueError as e:
        parser.error(str(e))
    bad = [f for f in features if not 0 <= f < cam.feature_dim]
    if bad:
        parser.error(f"features {bad} out of range: the model has {cam.feature_dim} features "
                     f"(0..{cam.feature_dim - 1})")
    return features


def frame_size_note(video: str | os.PathLike, config, crop_face: bool) -> str | None:
    """A line telling the user that a video's frames will be centre-cropped and resized (they
    are not ``img_size`` squares and no face cropping was asked for), else None."""
    from marlin_jax.video_io import video_info

    if crop_face:
        return None
    try:
        info = video_info(video)
    except ValueError:
        return None  # unreadable: reported when the video is loaded
    size = config.img_size
    if (info["width"], info["height"]) == (size, size):
        return None
    return (f"note: {video} is {info['width']}x{info['height']}; its frames are centre-cropped "
            f"and resized to {size}x{size} (pass --crop_face to crop the face instead)")


def build_gradcam(model_name: str, checkpoint: str | os.PathLike, *, layer: int = -1,
                  mode: str = "gradcam") -> FeatureGradCam:
    """Loads a checkpoint with :meth:`marlin_jax.extract.Marlin.from_file` and wraps its encoder."""
    from marlin_jax.extract import Marlin

    return FeatureGradCam(Marlin.from_file(model_name, checkpoint).model, layer=layer, mode=mode)


def clip_relevance(cam: FeatureGradCam, clips: Sequence[np.ndarray], features: Sequence[int],
                   batch_size: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Relevance ``(n_clips, F, t, h, w)`` and values ``(n_clips, F)`` of uint8 clips, in batches
    of a fixed size (the last one padded) so the jitted function compiles once."""
    rels, vals = [], []
    for start in range(0, len(clips), batch_size):
        batch = list(clips[start : start + batch_size])
        n = len(batch)
        padded = np.stack(batch + [batch[-1]] * (batch_size - n)) if len(clips) > n else np.stack(batch)
        r, v = cam.relevance(padded, features)
        rels.append(r[:n])
        vals.append(v[:n])
    return np.concatenate(rels), np.concatenate(vals)


def visualize_video(
    cam: FeatureGradCam,
    video: str | os.PathLike,
    features: Sequence[int],
    output_dir: str | os.PathLike,
    *,
    windows: str = "first",
    sample_rate: int = 2,
    stride: int = 16,
    crop_face: bool = False,
    save_video: bool = False,
    fps: float = 10.0,
    alpha: float = 0.5,
    cmap: str = "jet",
    dpi: int = 300,
    frames_shown: int | None = None,
    batch_size: int = 4,
) -> list[Path]:
    """Writes the heat-map PNGs (and optionally mp4s) of ``features`` for one video; returns the
    written paths."""
    from marlin_jax.video_io import write_video

    video = Path(video)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    clips = list(load_clips(video, cam.config, windows=windows, sample_rate=sample_rate,
                            stride=stride, crop_face=crop_face))
    rel, vals = clip_relevance(cam, clips, features, batch_size)
    np.savez(out / f"{video.stem}_relevance.npz", relevance=rel, values=vals,
             features=np.asarray(features))
    written = [out / f"{video.stem}_relevance.npz"]
    scale = rel.max(axis=(0, 2, 3, 4), keepdims=True)[0]  # (F, 1, 1, 1): one scale per feature
    for fi, f in enumerate(features):
        movie = []
        for w, clip in enumerate(clips):
            heat = upsample(normalise(rel[w, fi], scale[fi]), cam.config)
            over = overlay(clip, heat, alpha=alpha, cmap=cmap)
            suffix = f"_window{w:03d}" if windows == "all" else ""
            title = (f"{video.name}  feature {f}  (value {vals[w, fi]:+.3f}"
                     f"{f', window {w}' if windows == 'all' else ''}; {cam.mode}, block {cam.layer})")
            fig = heatmap_grid_figure(clip, over, title, frames_shown=frames_shown)
            written.append(save_figure(fig, out / f"{video.stem}_feature{f}{suffix}.png", dpi))
            if save_video:
                movie.append(side_by_side(clip, over))
        if save_video:
            path = out / f"{video.stem}_feature{f}.mp4"
            write_video(path, np.concatenate(movie), fps=fps)
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m marlin_jax.analysis.visualize",
        description="Grad-CAM heat maps of MARLIN feature dimensions: PNG grids (and mp4s).",
    )
    parser.add_argument("--video", nargs="+", required=True, help="video file(s)")
    add_model_arguments(parser)
    parser.add_argument("--windows", choices=("first", "all"), default="first",
                        help="first: one clip per video (padded if short); all: every window")
    parser.add_argument("--save_video", action="store_true",
                        help="also write a side-by-side mp4 per feature")
    parser.add_argument("--fps", type=float, default=10.0, help="frame rate of the mp4")
    args = parser.parse_args(argv)

    from marlin_jax.video_io import VideoReadError

    try:
        cam = build_gradcam(args.model, args.checkpoint, layer=args.layer, mode=args.mode)
    except (ValueError, OSError) as e:
        parser.error(f"cannot load the model: {e}")
    features = resolve_features(parser, args, cam)
    failures = []
    for video in args.video:
        note = frame_size_note(video, cam.config, args.crop_face)
        if note:
            print(note, file=sys.stderr)
        try:
            paths = visualize_video(
                cam, video, features, args.output_dir, windows=args.windows,
                sample_rate=args.sample_rate, stride=args.stride, crop_face=args.crop_face,
                save_video=args.save_video, fps=args.fps, alpha=args.alpha, cmap=args.cmap,
                dpi=args.dpi, frames_shown=args.frames_shown, batch_size=args.batch_size,
            )
        except (VideoReadError, ValueError, OSError) as e:
            failures.append(f"{video}: {e}")
            continue
        print(f"{video}: {len(paths)} files -> {args.output_dir}")
    if failures:
        print(f"{len(failures)} failed:", *failures, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
