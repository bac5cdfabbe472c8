"""CLI: Grad-CAM heat maps of chosen MARLIN feature dimensions over a video.

    python -m marlin_jax.analysis.visualize --checkpoint C --video V.mp4 --features 397 231 --output_dir O

Per video and feature: ``<video>_feature<f>.png`` (frames over heat-map overlays; with
``--windows all`` one per window, ``..._window<k>.png``), the comparison video
``<video>_feature<f>.mp4`` (frame | overlay, every window in turn) and ``<video>_relevance.npz``
(token relevance ``(windows, F, t, h, w)``, feature values ``(windows, F)``). Heat maps of one
video and feature share one scale over all its windows.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from marlin_jax.analysis.heatmap import MODES, FeatureGradCam, frames_figure, load_clips, normalise, overlay, upsample
from marlin_jax.analysis.plots import save_figure
from marlin_jax.video_io import VideoReadError, VideoWriter, video_info

DEFAULT_FEATURES = (397, 231, 490, 482, 456)  # the feature-analysis fork's defaults (ViT-B, 768)

__all__ = [
    "DEFAULT_FEATURES",
    "add_model_arguments",
    "build_gradcam",
    "clip_relevance",
    "load_cam",
    "main",
    "note_frame_size",
    "top_features_from_summary",
    "visualize_video",
]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by the heat-map CLIs: model, checkpoint, windows, Grad-CAM, drawing."""
    parser.add_argument("--checkpoint", "--checkpoint_path", dest="checkpoint", required=True,
                        help=".pt / .ckpt / VideoMAE checkpoint, marlin-jax checkpoint folder (or trainer "
                             "workdir) or Hugging Face folder (config.json + model.safetensors)")
    parser.add_argument("--model", "--model_name", dest="model", default=None,
                        help="registered model name (default: the architecture the checkpoint carries, "
                             "a marlin_config.json or Hugging Face config.json, else marlin_vit_base_ytf)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--features", type=int, nargs="+",
                       help="feature indices of the mean-pooled embedding (default: "
                            f"{' '.join(map(str, DEFAULT_FEATURES))}, for a 768-wide model)")
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
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")


def top_features_from_summary(path: str | os.PathLike, num: int) -> list[int]:
    """The first ``num`` top features of a statistics report's ``summary.json`` (video level
    when it was analysed, else clip level)."""
    path = Path(path)
    try:
        levels = json.loads(path.read_text())["levels"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a statistics summary.json ({e})") from e
    for level in ("video", "clip"):
        if level in levels:
            return [int(f) for f in levels[level]["top_features"][:num]]
    raise ValueError(f"{path}: the summary holds no analysed level")


def load_cam(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[FeatureGradCam, list[int]]:
    """The Grad-CAM of ``--checkpoint`` and the feature indices asked for (``--features`` or
    ``--top_features_from``; neither: :data:`DEFAULT_FEATURES`); exits with a usage error when the
    model cannot be loaded or a feature is outside its feature size."""
    try:
        cam = build_gradcam(args.model, args.checkpoint, layer=args.layer, mode=args.mode)
    except (ValueError, OSError) as e:
        parser.error(f"cannot load the model: {e}")
    if args.features is None and args.top_features_from is None:
        if max(DEFAULT_FEATURES) >= cam.feature_dim:
            parser.error(f"no --features given, and the default features {' '.join(map(str, DEFAULT_FEATURES))} "
                         f"(of a 768-wide model such as ViT-B) do not exist in "
                         f"{f'model {args.model!r}' if args.model else 'the model'}, whose features are "
                         f"{cam.feature_dim} wide (0..{cam.feature_dim - 1}); pass --features or --top_features_from")
        return cam, list(DEFAULT_FEATURES)
    try:
        features = (list(args.features) if args.features is not None
                    else top_features_from_summary(args.top_features_from, args.num_top))
    except ValueError as e:
        parser.error(str(e))
    bad = [f for f in features if not 0 <= f < cam.feature_dim]
    if bad:
        parser.error(f"features {bad} out of range: the model has {cam.feature_dim} features "
                     f"(0..{cam.feature_dim - 1})")
    return cam, features


def note_frame_size(video: str | os.PathLike, config, crop_face: bool) -> None:
    """Tells the user (stderr) that a video's frames will be centre-cropped and resized: they
    are not ``img_size`` squares and no face cropping was asked for."""
    if crop_face:
        return
    try:
        info = video_info(video)
    except ValueError:
        return  # unreadable: reported when the video is loaded
    size = config.img_size
    if (info["width"], info["height"]) != (size, size):
        print(f"note: {video} is {info['width']}x{info['height']}; its frames are centre-cropped "
              f"and resized to {size}x{size} (pass --crop_face to crop the face instead)", file=sys.stderr)


def build_gradcam(model_name: str | None, checkpoint: str | os.PathLike, *, layer: int = -1,
                  mode: str = "gradcam") -> FeatureGradCam:
    """Loads a checkpoint with :meth:`marlin_jax.extract.Marlin.from_file` (``model_name`` None:
    the architecture the checkpoint carries) and wraps its encoder."""
    from marlin_jax.extract import Marlin

    return FeatureGradCam(Marlin.from_file(model_name, checkpoint).model, layer=layer, mode=mode)


def clip_relevance(cam: FeatureGradCam, clips: Iterable[np.ndarray], features: Sequence[int],
                   batch_size: int = 4, keep: int = 0, *, progress: bool = False,
                   desc: str = "relevance"
                   ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray] | None]:
    """Relevance ``(n_clips, F, t, h, w)`` and values ``(n_clips, F)`` of a stream of uint8
    clips, computed in batches of a fixed size (after the first batch, short batches are
    padded) so the jitted function compiles at most twice. Also returns the clips themselves
    when there are at most ``keep`` of them (else None: read them again to draw them), so a long
    video never sits in memory. ``progress``: a tqdm bar (stderr) counting the clips."""
    rels, vals, kept = [], [], []
    stream = iter(clips)
    bar = tqdm(desc=desc, unit="clip", disable=not progress, leave=False)
    while batch := list(itertools.islice(stream, batch_size)):
        n = len(batch)
        if rels:  # not the first batch
            batch += [batch[-1]] * (batch_size - n)
        r, v = cam.relevance(np.stack(batch), features)
        rels.append(r[:n])
        vals.append(v[:n])
        if kept is not None:
            kept += batch[:n]
            if len(kept) > keep:
                kept = None
        bar.update(n)
    bar.close()
    if not rels:
        raise ValueError("no clips to explain")
    return np.concatenate(rels), np.concatenate(vals), kept


def visualize_video(
    cam: FeatureGradCam,
    video: str | os.PathLike,
    features: Sequence[int],
    output_dir: str | os.PathLike,
    *,
    windows: str = "first",
    max_windows: int | None = None,
    sample_rate: int = 2,
    stride: int = 16,
    crop_face: bool = False,
    save_png: bool = True,
    save_video: bool = False,
    fps: float = 10.0,
    alpha: float = 0.5,
    cmap: str = "jet",
    dpi: int = 300,
    frames_shown: int | None = None,
    batch_size: int = 4,
    keep_clips: int = 16,
    progress: bool = False,
) -> list[Path]:
    """Writes the heat-map PNGs (and optionally mp4s) of ``features`` for one video; returns the
    written paths.

    Two passes over the windows: the first computes every window's relevance (so one scale per
    feature covers the whole video), the second draws; the clips are kept from the first pass
    when there are few, else read again. ``max_windows`` caps the windows of ``windows="all"``.
    ``progress``: tqdm bars (stderr) over the windows of both passes.
    """
    video = Path(video)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    def clips():
        stream = load_clips(video, cam.config, windows=windows, sample_rate=sample_rate,
                            stride=stride, crop_face=crop_face)
        return itertools.islice(stream, max_windows)

    rel, vals, kept = clip_relevance(cam, clips(), features, batch_size, keep=keep_clips,
                                     progress=progress, desc=f"{video.name}: relevance")
    npz = out / f"{video.stem}_relevance.npz"
    np.savez(npz, relevance=rel, values=vals, features=np.asarray(features))
    written = [npz]
    scale = rel.max(axis=(0, 2, 3, 4))  # (F,): one scale per feature over the whole video
    sinks = {f: VideoWriter(out / f"{video.stem}_feature{f}.mp4", fps) for f in features
             } if save_video else {}
    try:
        drawn = tqdm(kept if kept is not None else clips(), total=rel.shape[0], unit="window",
                     desc=f"{video.name}: drawing", disable=not progress, leave=False)
        for w, clip in enumerate(drawn):
            if w >= rel.shape[0]:
                break  # the video changed between the passes
            heat = upsample(normalise(rel[w], scale[:, None, None, None]), cam.config)  # (F,T,H,W)
            for fi, f in enumerate(features):
                over = overlay(clip, heat[fi], alpha=alpha, cmap=cmap)
                if save_png:
                    suffix = f"_window{w:03d}" if windows == "all" else ""
                    title = (f"{video.name}  feature {f}  (value {vals[w, fi]:+.3f}"
                             f"{f', window {w}' if windows == 'all' else ''}; {cam.mode}, "
                             f"block {cam.layer})")
                    fig = frames_figure([("frames", clip), ("heatmap", over)], title, frames_shown=frames_shown)
                    written.append(save_figure(fig, out / f"{video.stem}_feature{f}{suffix}.png",
                                               dpi))
                if save_video:
                    sinks[f].write(np.concatenate([clip, over], axis=2))  # side by side
    finally:
        for sink in sinks.values():
            sink.close()
    written += [Path(sink.path) for sink in sinks.values()]
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m marlin_jax.analysis.visualize",
        description="Grad-CAM heat maps of MARLIN feature dimensions: PNG grids (and mp4s).",
    )
    parser.add_argument("--video", "--video_path", dest="video", nargs="+", required=True,
                        help="video file(s)")
    add_model_arguments(parser)
    parser.add_argument("--windows", choices=("first", "all"), default="first",
                        help="first: one clip per video (padded if short); all: every window")
    parser.add_argument("--max_windows", type=int, default=None,
                        help="with --windows all: at most this many windows per video")
    video_opt = parser.add_mutually_exclusive_group()
    video_opt.add_argument("--save_video", action="store_true",
                           help="write the side-by-side comparison mp4 per feature (the default)")
    video_opt.add_argument("--skip_comparison_video", action="store_true",
                           help="do not write the comparison mp4s")
    parser.add_argument("--no_png", action="store_true",
                        help="skip the PNG grids (e.g. a long video: the mp4s only)")
    parser.add_argument("--fps", type=float, default=30.0,
                        help="frame rate of the comparison mp4 (default 30)")
    args = parser.parse_args(argv)

    cam, features = load_cam(parser, args)
    if args.max_windows is not None and args.max_windows < 1:
        parser.error(f"--max_windows must be >= 1, got {args.max_windows}")
    if args.no_png and args.skip_comparison_video:
        parser.error("--no_png with --skip_comparison_video leaves nothing to draw")
    progress = not args.no_progress
    failures = []
    for video in tqdm(args.video, desc="videos", unit="video",
                      disable=not progress or len(args.video) < 2):
        note_frame_size(video, cam.config, args.crop_face)
        try:
            paths = visualize_video(
                cam, video, features, args.output_dir, windows=args.windows,
                max_windows=args.max_windows, save_png=not args.no_png,
                sample_rate=args.sample_rate, stride=args.stride, crop_face=args.crop_face,
                save_video=not args.skip_comparison_video, fps=args.fps, alpha=args.alpha,
                cmap=args.cmap, dpi=args.dpi, frames_shown=args.frames_shown,
                batch_size=args.batch_size, progress=progress,
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
