"""Extract MARLIN window features for every video of a dataset (the original's celebvhq_extract).

    python scripts/extract_dataset.py --data_dir=/data/CelebV-HQ \\
        --checkpoint=marlin_vit_base_ytf.encoder.pt [--model=marlin_vit_base_ytf]
        # videos <data_dir>/cropped/*.mp4 -> <data_dir>/<model>/<name>.npy
    python scripts/extract_dataset.py --video_dir=videos/ --output_dir=features/ --checkpoint=...

Each video becomes ``<output_dir>/<key>.npy``: float32 ``(n_windows, D)`` features of its sliding
16-frame windows (sample rate 2, stride 16, as ``Marlin.extract_video``), where ``key`` is the
video path relative to the video folder without extension (the key the evaluation datasets use).
With ``--keep_seq`` the files hold ``(n_windows, N, D)`` token features; the evaluation flattens
them for a token-level linear probe. They are large (1568 x 768 floats per window for ViT-B at
16x224x224): meant for small models, small inputs or few videos.

* Batched: windows of several videos share one jitted encoder call (fixed batch shape).
* Resumable: existing ``.npy`` files are kept (``--overwrite`` recomputes); files are written
  atomically, so an interrupted run never leaves a truncated one.
* Failures never produce arrays: a video that cannot be read gets ``<key>.error.json`` (the
  error), is listed in ``<output_dir>/extraction_summary.json`` and is retried only with
  ``--retry_failed``; the exit status is 1 if any video failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from marlin_jax.data.videos import VIDEO_EXTENSIONS  # noqa: E402
from marlin_jax.evaluation.datasets import ERROR_MARKER_SUFFIX  # noqa: E402

SUMMARY_FILE = "extraction_summary.json"


def list_videos(video_dir: str | os.PathLike, recursive: bool = True) -> list[tuple[str, Path]]:
    """``(key, path)`` of every video under ``video_dir``, sorted by key."""
    root = Path(video_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: video folder not found")
    found = root.rglob("*") if recursive else root.iterdir()
    videos = [p for p in found if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS]
    keyed = sorted((p.relative_to(root).with_suffix("").as_posix(), p) for p in videos)
    keys = [k for k, _ in keyed]
    dupes = sorted({k for k in keys if keys.count(k) > 1}) if len(set(keys)) < len(keys) else []
    if dupes:
        raise ValueError(f"{root}: several videos share a name but differ in extension: {dupes[:5]}")
    return keyed


def _write_marker(path: Path, video: Path, error: BaseException) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"video": str(video), "error": str(error),
                                "type": type(error).__name__, "time": time.time()}, indent=1))


def read_windows(path: Path, clip_frames: int, sample_rate: int, stride: int,
                 size: int) -> np.ndarray:
    """uint8 windows ``(n, clip_frames, size, size, 3)`` of a video (marlin-pytorch's rules).

    Raises ValueError naming the file if it has no window or frames of the wrong size."""
    from marlin_jax.extract import iter_windows
    from marlin_jax.video_io import iter_frames

    windows = list(iter_windows(iter_frames(path), clip_frames, sample_rate, stride))
    if not windows:
        raise ValueError(f"{path}: no window could be formed")
    clips = np.stack(windows)
    if clips.shape[2:4] != (size, size):
        raise ValueError(f"{path}: frames are {clips.shape[3]}x{clips.shape[2]} but the model "
                         f"needs {size}x{size} face crops (crop the videos first)")
    return clips


def extract_dataset(
    features_fn: Callable[[np.ndarray], np.ndarray],
    videos: Sequence[tuple[str, Path]],
    output_dir: str | os.PathLike,
    *,
    clip_frames: int = 16,
    size: int = 224,
    sample_rate: int = 2,
    stride: int = 16,
    batch_size: int = 16,
    overwrite: bool = False,
    retry_failed: bool = False,
    num_threads: int = 4,
    progress: bool = True,
) -> dict:
    """Writes ``<output_dir>/<key>.npy`` for every video; returns the run summary.

    Args:
      features_fn: uint8 clips ``(batch_size, T, S, S, 3)`` -> features ``(batch_size, D)``.
      videos: ``(key, path)`` pairs (see :func:`list_videos`).
      batch_size: windows per ``features_fn`` call (the last call is padded to it).

    Returns:
      ``{"written": [...], "existing": [...], "failed": {key: error}, "previously_failed": [...]}``.
    """
    from tqdm.auto import tqdm

    from marlin_jax.extract import save_npy_atomic

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"written": [], "existing": [], "failed": {}, "previously_failed": []}
    todo = []
    for key, path in videos:
        target, marker = out / f"{key}.npy", out / f"{key}{ERROR_MARKER_SUFFIX}"
        if target.exists() and not overwrite:
            summary["existing"].append(key)
        elif marker.exists() and not retry_failed:
            summary["previously_failed"].append(key)
        else:
            todo.append((key, Path(path)))

    def fail(key: str, path: Path, error: BaseException) -> None:
        summary["failed"][key] = f"{type(error).__name__}: {error}"
        _write_marker(out / f"{key}{ERROR_MARKER_SUFFIX}", path, error)

    def finish(key: str, path: Path, feats: np.ndarray) -> None:
        if feats.shape[0] == 0 or not np.all(np.isfinite(feats)):
            fail(key, path, ValueError(f"{path}: features are empty or not finite"))
            return
        save_npy_atomic(out / f"{key}.npy", feats.astype(np.float32))
        (out / f"{key}{ERROR_MARKER_SUFFIX}").unlink(missing_ok=True)
        summary["written"].append(key)

    # windows of consecutive videos are packed into fixed-size batches
    pending: list[tuple[str, Path, int]] = []  # videos whose windows are queued: (key, path, n)
    queue: list[np.ndarray] = []  # queued windows, in video order
    done_feats: list[np.ndarray] = []  # features of the queued windows computed so far

    def run_batches(final: bool) -> None:
        while len(queue) >= batch_size or (final and queue):
            n = min(batch_size, len(queue))
            clips = np.stack(queue[:n] + [queue[n - 1]] * (batch_size - n))
            done_feats.extend(np.asarray(features_fn(clips))[:n])
            del queue[:n]
        while pending and len(done_feats) >= pending[0][2]:
            key, path, n = pending.pop(0)
            finish(key, path, np.stack(done_feats[:n]))
            del done_feats[:n]

    def load(item: tuple[str, Path]) -> np.ndarray:
        return read_windows(item[1], clip_frames, sample_rate, stride, size)

    bar = tqdm(total=len(todo), desc="extracting", unit="video", disable=not progress)
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        for (key, path), future in zip(todo, _bounded(pool, load, todo, 2 * num_threads),
                                       strict=True):
            try:
                windows = future.result()
            except Exception as e:  # noqa: BLE001 - any reader failure is recorded, not fatal
                fail(key, path, e)
            else:
                pending.append((key, path, len(windows)))
                queue.extend(windows)
                run_batches(final=False)
            bar.update(1)
        run_batches(final=True)
    bar.close()
    summary_path = out / SUMMARY_FILE
    previous = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    failed_all = {k: v for k, v in previous.get("failed", {}).items()
                  if not (out / f"{k}.npy").exists()}
    failed_all.update(summary["failed"])
    summary_path.write_text(json.dumps({"failed": failed_all, "last_run": {
        k: (len(v) if k != "failed" else v) for k, v in summary.items()}}, indent=1,
        sort_keys=True))
    return summary


def _bounded(pool: ThreadPoolExecutor, fn, items, ahead: int) -> Iterator[Future]:
    """``pool.submit(fn, item)`` futures in order, with at most ``ahead`` running ahead."""
    futures: list[Future] = []
    it = iter(items)
    for item in it:
        futures.append(pool.submit(fn, item))
        if len(futures) > ahead:
            yield futures.pop(0)
    yield from futures


def register_from_checkpoint(name: str, checkpoint: str | os.PathLike) -> None:
    """Registers ``name`` with the architecture a checkpoint carries (a marlin-jax directory's
    marlin_config.json or a Hugging Face config.json) when ``name`` is not a registered model
    (e.g. a custom ViT-tiny trained by the trainer)."""
    from marlin_jax.interop.hf import checkpoint_config
    from marlin_jax.models import model_names, register_model

    if name in model_names():
        return
    saved = checkpoint_config(checkpoint)
    if saved is None:
        raise ValueError(f"model {name!r} is not registered and {checkpoint} names no architecture")
    register_model(name, saved[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", help="CelebV-HQ root: videos in cropped/, features to "
                        "<data_dir>/<model>/ (the layout configs/celebvhq_*_lp.py read)")
    parser.add_argument("--video_dir", help="folder of videos (searched recursively)")
    parser.add_argument("--output_dir", help="feature folder")
    parser.add_argument("--model", default=None, help="registered model name (default: the "
                        "architecture the checkpoint carries (marlin_config.json / config.json), else "
                        "marlin_vit_base_ytf)")
    parser.add_argument("--checkpoint", required=True,
                        help=".pt / .ckpt / VideoMAE checkpoint, marlin-jax checkpoint dir or Hugging Face "
                        "folder (config.json + model.safetensors)")
    parser.add_argument("--sample_rate", type=int, default=None,
                        help="temporal sample rate (default: the model's tubelet size, 2)")
    parser.add_argument("--stride", type=int, default=None,
                        help="window stride in sampled frames (default: n_frames, 16)")
    parser.add_argument("--batch_size", type=int, default=16, help="windows per encoder call")
    parser.add_argument("--keep_seq", action="store_true",
                        help="write (T, N, D) token features instead of (T, D) pooled ones (a token-level probe)")
    parser.add_argument("--num_threads", type=int, default=4, help="video decoding threads")
    parser.add_argument("--overwrite", action="store_true", help="recompute existing features")
    parser.add_argument("--retry_failed", action="store_true", help="retry marked failures")
    args = parser.parse_args(argv)
    if args.model is None:  # a checkpoint may name its architecture; else the released one
        from marlin_jax.extract import DEFAULT_MODEL
        from marlin_jax.interop.hf import checkpoint_config, registered_name

        saved = checkpoint_config(args.checkpoint)
        args.model = (DEFAULT_MODEL if saved is None
                      else registered_name(saved[0]) or Path(args.checkpoint).resolve().name)
    if args.data_dir:
        video_dir = args.video_dir or os.path.join(args.data_dir, "cropped")
        output_dir = args.output_dir or os.path.join(args.data_dir, args.model)
    elif args.video_dir and args.output_dir:
        video_dir, output_dir = args.video_dir, args.output_dir
    else:
        parser.error("give --data_dir, or both --video_dir and --output_dir")

    from marlin_jax.extract import Marlin

    register_from_checkpoint(args.model, args.checkpoint)
    marlin = Marlin.from_file(args.model, args.checkpoint)
    cfg = marlin.config
    videos = list_videos(video_dir)
    print(f"{len(videos)} videos in {video_dir} -> {output_dir}")
    summary = extract_dataset(
        lambda clips: marlin.extract_features(clips, keep_seq=args.keep_seq), videos, output_dir,
        clip_frames=cfg.n_frames, size=cfg.img_size,
        sample_rate=args.sample_rate or cfg.tubelet_size, stride=args.stride or cfg.n_frames,
        batch_size=args.batch_size, overwrite=args.overwrite, retry_failed=args.retry_failed,
        num_threads=args.num_threads)
    print(f"written {len(summary['written'])}, already there {len(summary['existing'])}, "
          f"failed {len(summary['failed'])}, skipped as failed before "
          f"{len(summary['previously_failed'])} (see {Path(output_dir) / SUMMARY_FILE})")
    for key, error in list(summary["failed"].items())[:20]:
        print(f"  {key}: {error}", file=sys.stderr)
    return 1 if summary["failed"] or summary["previously_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
