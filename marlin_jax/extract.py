"""Feature extraction: the `Marlin` API and the `python -m marlin_jax.extract` CLI.

Mirrors marlin-pytorch's `Marlin` (same sliding windows and padding rules), but batches the
windows of a video through one jitted call and reads frames with OpenCV (no ffmpeg binary).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import shutil
import sys
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from marlin_jax.files import atomic_path
from marlin_jax.interop.checkpoints import CONFIG_FILE
from marlin_jax.interop.hf import download_hf_checkpoint, load_checkpoint, resolve_checkpoint_config
from marlin_jax.models import RELEASE_URL, MarlinConfig, MarlinModel, get_config, video_to_float
from marlin_jax.models.layers import default_attention_impl
from marlin_jax.video_io import VIDEO_EXTENSIONS, IncompleteDecode, VideoReadError, iter_frames

REDUCTIONS = ("none", "mean", "max")
DEFAULT_MODEL = "marlin_vit_base_ytf"  # the architecture of checkpoints that do not name theirs


def default_cache_dir() -> Path:
    """``$MARLIN_JAX_CACHE`` or ``~/.cache/marlin-jax``: where downloaded checkpoints are kept."""
    return Path(os.environ.get("MARLIN_JAX_CACHE", Path.home() / ".cache" / "marlin-jax"))


def download(url: str, destination: Path, *, timeout: float = 30.0) -> Path:
    """Downloads ``url`` to ``destination`` atomically (a partial file never takes its name)."""
    from tqdm.auto import tqdm

    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        with (atomic_path(destination) as tmp, open(tmp, "xb") as out,
              urllib.request.urlopen(url, timeout=timeout) as response):
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"Downloading {destination.name}") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
            if total is not None and out.tell() != total:
                raise OSError(f"download of {url} ended after {out.tell()} of {total} bytes")
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise ConnectionError(
            f"cannot download {url} ({getattr(e, 'reason', e)}). If this machine is offline, fetch the "
            f"file elsewhere and either load it with Marlin.from_file(name, path) or copy it to {destination}"
        ) from e
    return destination


def iter_windows(frames: Iterator[np.ndarray], clip_frames: int = 16, sample_rate: int = 2,
                 stride: int = 16) -> Iterator[np.ndarray]:
    """Clips ``(clip_frames, H, W, 3)`` of a frame stream with marlin-pytorch's rules:

    - <= clip_frames frames: all of them, padded by repeating the last frame;
    - <= clip_frames * sample_rate frames: the first clip_frames consecutive frames;
    - longer: windows of every ``sample_rate``-th frame starting every ``stride * sample_rate`` frames
      while ``start < total - clip_frames * sample_rate``.
    Streams: memory holds one window of sampled frames plus the first clip_frames*sample_rate frames.
    """
    span = clip_frames * sample_rate
    head: list[np.ndarray] = []  # the first `span` frames, only needed while no window exists
    buffer: list[np.ndarray] = []  # the sampled frames from `next_start` on
    next_start = 0  # sampled-frame index where the next window begins (> 0 once one was emitted)
    for index, frame in enumerate(frames):
        if not next_start and index < span:
            head.append(frame)
        if index % sample_rate:
            continue
        j = index // sample_rate
        if j >= next_start:
            buffer.append(frame)
        # The window starting at sampled frame s is valid once sampled frame s + clip_frames exists
        # (frame s*rate + span < total): marlin-pytorch's `range(0, total - span, stride * rate)`.
        if j == next_start + clip_frames:
            yield np.stack(buffer[:clip_frames])
            head = []
            next_start += stride
            buffer = buffer[stride:]
    if head and not next_start:  # no window: the first clip_frames frames, the last one repeated as needed
        yield np.stack((head + [head[-1]] * clip_frames)[:clip_frames])


def face_windows(path: str, cropper: Any, clip_frames: int = 16, sample_rate: int = 2,
                 stride: int = 16, *, strict: bool = False,
                 on_incomplete: Callable[[IncompleteDecode], None] | None = None) -> Iterator[np.ndarray]:
    """Face-cropped windows ``(clip_frames, size, size, 3)`` of a video, in two passes: track the
    face over every frame a window can use (every ``sample_rate``-th, plus the first
    ``clip_frames``), then crop each window with the track's boxes. Raises VideoReadError when no
    frame has a face (the message says how many frames were searched)."""
    from marlin_jax.face import NoFaceError

    try:
        track = cropper.track_stream(
            iter_frames(path, strict=strict, on_incomplete=on_incomplete), name=path,
            search=lambda i: i % sample_rate == 0 or i < clip_frames)
    except NoFaceError as e:
        raise VideoReadError(str(e)) from e
    total = track.num_frames
    clips = iter_windows(iter_frames(path, expect=total), clip_frames, sample_rate, stride)
    numbers = iter_windows((np.int64(i) for i in range(total)), clip_frames, sample_rate, stride)
    for clip, index in zip(clips, numbers, strict=True):
        yield cropper.crop_frames(clip, track.squares_at(index))


def resolve_attention_impl(attention_impl: str | None, dtype: Any = jnp.float32) -> str | None:
    """``"auto"`` -> :func:`models.layers.default_attention_impl` for inference on JAX's default
    backend; any other value passes through."""
    if attention_impl == "auto":
        return default_attention_impl(jax.default_backend(), dtype, training=False)
    return attention_impl


class Marlin:
    """A MARLIN encoder ready for feature extraction.

    >>> marlin = Marlin.from_file("marlin_vit_base_ytf", "marlin_vit_base_ytf.encoder.pt")
    >>> feats = marlin.extract_video("face.mp4")           # (n_windows, 768) numpy
    >>> seq = marlin.extract_features(clips)               # clips (B, 16, 224, 224, 3) in [0, 1]
    """

    def __init__(self, model: MarlinModel, name: str | None = None, *, batch_size: int = 4):
        self.model = model
        self.config: MarlinConfig = model.config
        self.name = name
        self.batch_size = batch_size
        graphdef, state = nnx.split(model.encoder)
        dtype = model.encoder.matmul_dtype
        if dtype is not None:  # cast the matmul weights once, not per call; biases and norms keep theirs
            def cast(path, leaf):
                is_kernel = any(getattr(key, "key", getattr(key, "name", None)) == "kernel" for key in path)
                return leaf.astype(dtype) if is_kernel else leaf

            state = jax.tree_util.tree_map_with_path(cast, state)
        self._encoder_state = state

        def features(state, clips_uint8_or_float, keep_seq: bool):
            encoder = nnx.merge(graphdef, state)
            return encoder.extract_features(video_to_float(clips_uint8_or_float), keep_seq=keep_seq).astype(jnp.float32)

        self._features = jax.jit(features, static_argnums=2)

    @classmethod
    def from_file(cls, model_name: str | None, path: str | os.PathLike, *, batch_size: int = 4,
                  matmul_dtype: str | None = None, dtype: str = "float32",
                  attention_impl: str | None = "auto") -> Marlin:
        """Loads `.pt` (encoder-only or full), Lightning `.ckpt`, a VideoMAE checkpoint, a
        marlin-jax checkpoint directory or a Hugging Face folder / ``.safetensors`` file.
        ``model_name`` None takes the architecture the checkpoint carries, else
        :data:`DEFAULT_MODEL`; a name that disagrees with it is a ValueError.

        ``matmul_dtype="bfloat16"``: bf16 matmul operands, float32 accumulation (features differ
        by ~1e-2 relative); ``dtype="bfloat16"`` keeps activations in bf16 too (GPU/TPU);
        ``attention_impl``: see :func:`resolve_attention_impl`.
        """
        model_kwargs = {"dtype": jnp.dtype(dtype), "attention_impl": resolve_attention_impl(attention_impl, dtype),
                        "matmul_dtype": None if matmul_dtype is None else jnp.dtype(matmul_dtype)}
        config, name = resolve_checkpoint_config(model_name, path, default=DEFAULT_MODEL)
        return cls(load_checkpoint(path, config, **model_kwargs), name, batch_size=batch_size)

    @classmethod
    def from_pretrained(cls, repo_id: str, model_name: str | None = None, *, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, **kwargs) -> Marlin:
        """Loads the Hugging Face port of a MARLIN checkpoint (hub repo ``config.json`` +
        ``model.safetensors``) through ``huggingface_hub`` (its cache, ``HF_HUB_OFFLINE``,
        ``revision``); ``model_name`` only checks the architecture. ``kwargs``: :meth:`from_file`'s."""
        folder = download_hf_checkpoint(repo_id, revision=revision, cache_dir=cache_dir)
        return cls.from_file(model_name, folder, **kwargs)

    @classmethod
    def from_online(cls, model_name: str, full_model: bool = False, *, cache_dir: str | os.PathLike | None = None,
                    url: str | None = None, **kwargs) -> Marlin:
        """Downloads a released checkpoint once into the cache and loads it."""
        part = "full" if full_model else "encoder"
        if url is None:
            if not get_config(model_name).downloadable:
                raise ValueError(f"model {model_name!r} has no released checkpoint to download")
            url = RELEASE_URL.format(name=model_name, part=part)
        file = Path(cache_dir or default_cache_dir()) / f"{model_name}.{part}.pt"
        if not file.exists():
            download(url, file)
        return cls.from_file(model_name, file, **kwargs)

    @staticmethod
    def clean_cache(cache_dir: str | os.PathLike | None = None, verbose: bool = True) -> None:
        path = Path(cache_dir or default_cache_dir())
        if path.exists():
            shutil.rmtree(path)
            if verbose:
                print(f"MARLIN checkpoint cache {path} cleaned.")

    def lower_features(self, clips: jax.ShapeDtypeStruct, keep_seq: bool = False,
                       state_sharding: Any = None) -> jax.stages.Lowered:
        """:meth:`extract_features`'s jitted forward lowered for abstract ``clips`` and the weights
        placed by ``state_sharding``, for ahead-of-time compiles (``python -m marlin_jax.aot``)."""
        state = self._encoder_state
        if state_sharding is not None:
            state = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=state_sharding), state)
        return self._features.lower(state, clips, keep_seq)

    def extract_features(self, x: jax.Array | np.ndarray, keep_seq: bool = True,
                         channels_first: bool = False) -> jax.Array:
        """Features of clips.

        x: ``(B, T, H, W, C)`` float in [0, 1] or uint8; ``channels_first=True`` accepts
        marlin-pytorch's ``(B, C, T, H, W)`` layout. Returns ``(B, N, D)`` (keep_seq) or ``(B, D)``
        (mean-pooled before the final norm, exactly as the reference).
        """
        x = jnp.asarray(x)
        if channels_first:
            x = jnp.moveaxis(x, 1, -1)
        return self._features(self._encoder_state, x, keep_seq)

    @functools.cached_property
    def _face_cropper(self):
        from marlin_jax.face import FaceCropper

        return FaceCropper(size=self.config.img_size)

    def extract_video(self, video_path: str | os.PathLike, crop_face: bool = False, sample_rate: int = 2,
                      stride: int = 16, reduction: str = "none", keep_seq: bool = False, *,
                      strict: bool = False,
                      on_incomplete: Callable[[IncompleteDecode], None] | None = None) -> np.ndarray:
        """Features of a video file with marlin-pytorch's sliding windows.

        Returns ``(n_windows, D)`` (or ``(n_windows, N, D)`` with keep_seq); ``reduction`` "mean" or
        "max" reduces over windows. ``crop_face=True`` crops every window with a face track of the
        whole video (:func:`face_windows`); otherwise frames must be ``img_size`` face crops.
        A partly decodable video gives features of its decodable frames and a logged warning
        passed to ``on_incomplete``; with ``strict=True`` it raises ``IncompleteVideoError``.
        """
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if sample_rate < 1 or stride < 1:
            raise ValueError(f"sample_rate and stride must be >= 1, got {sample_rate}, {stride}")
        path = os.fspath(video_path)
        size = self.config.img_size
        if crop_face:
            windows = face_windows(path, self._face_cropper, self.config.n_frames, sample_rate, stride,
                                   strict=strict, on_incomplete=on_incomplete)
        else:
            windows = iter_windows(iter_frames(path, strict=strict, on_incomplete=on_incomplete),
                                   self.config.n_frames, sample_rate, stride)
        features: list[jax.Array] = []
        while batch := list(itertools.islice(windows, self.batch_size)):
            clips = np.stack(batch + batch[-1:] * (self.batch_size - len(batch)))  # fixed shape: one compile
            if clips.shape[2:4] != (size, size):
                raise VideoReadError(
                    f"{path}: frames are {clips.shape[3]}x{clips.shape[2]} but the model needs {size}x{size} "
                    f"face crops; pass crop_face=True or crop the video first")
            # Dispatch is asynchronous: decoding the next windows overlaps with this computation.
            features.append(self.extract_features(clips, keep_seq=keep_seq)[:len(batch)])
        out = np.concatenate([np.asarray(f) for f in features])
        return out if reduction == "none" else getattr(out, reduction)(axis=0)


def plan_outputs(inputs: list[str | os.PathLike], out_dir: str | os.PathLike
                 ) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]]]:
    """Where the CLI writes each video's features: ``(plan, renamed)``, lists of ``(video, .npy)``.

    A folder argument's videos keep their relative path (``F/sub/x.mp4`` -> ``out/sub/x.npy``);
    file arguments go to the top of ``out_dir``; ``x.mp4`` and ``x.avi`` in one folder keep their
    extension (``x.mp4.npy``; listed in ``renamed``). Raises ValueError naming the videos if two
    outputs still coincide.
    """
    out = Path(out_dir)
    found: dict[Path, tuple[Path, Path]] = {}  # resolved path -> (video, path relative to the output folder)
    for item in map(Path, inputs):
        if item.is_dir():
            pairs = [(p, p.relative_to(item)) for p in sorted(item.rglob("*"))
                     if p.suffix.lower() in VIDEO_EXTENSIONS and not p.is_dir()]
        else:
            pairs = [(item, Path(item.name))]
        for video, rel in pairs:
            found.setdefault(video.resolve(), (video, rel))
    stems = Counter(rel.with_suffix("") for rel in {rel for _, rel in found.values()})
    plan, renamed = [], []
    for video, rel in found.values():
        keep_extension = stems[rel.with_suffix("")] > 1  # x.mp4 + x.avi
        target = rel.parent / f"{rel.name}.npy" if keep_extension else rel.with_suffix(".npy")
        plan.append((video, out / target))
        if keep_extension:
            renamed.append(plan[-1])
    counts = Counter(target for _, target in plan)
    clashes = [f"{', '.join(str(v) for v, t in plan if t == target)} -> {target}"
               for target, n in counts.items() if n > 1]
    if clashes:
        raise ValueError("these videos would write the same output file: " + "; ".join(clashes)
                         + ". Pass their common parent folder instead, or use separate --output_dir")
    return plan, renamed


def save_npy_atomic(target: Path, array: np.ndarray) -> None:
    """``np.save`` via a temporary file in the target's folder: a partial file never has its name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp, open(tmp, "xb") as f:
        np.save(f, array)


def main(argv: list[str] | None = None) -> int:
    """The CLI; exit status 0 when every video was written or skipped, 1 if any failed, 2 for
    unusable arguments (clashing outputs, a checkpoint that cannot be loaded)."""
    parser = argparse.ArgumentParser(
        prog="python -m marlin_jax.extract",
        description="Extract MARLIN features from videos: one .npy per video in --output_dir, which "
                    "mirrors the input folders (F/sub/x.mp4 -> OUT/sub/x.npy; x.mp4 and x.avi in "
                    "one folder -> x.mp4.npy and x.avi.npy).")
    parser.add_argument("videos", nargs="+", help="video files (or directories of videos)")
    parser.add_argument("--model", default=None, help=f"registered model name (default: the architecture the "
                        f"checkpoint carries, a {CONFIG_FILE} or config.json, else {DEFAULT_MODEL})")
    parser.add_argument("--checkpoint", required=True, help=".pt / .ckpt / VideoMAE checkpoint, marlin-jax "
                        "checkpoint folder or trainer workdir, or Hugging Face folder")
    parser.add_argument("--output_dir", default="features",
                        help="where the .npy files go (paths relative to each input folder are kept)")
    parser.add_argument("--crop_face", action="store_true", help="detect and crop faces first")
    parser.add_argument("--sample_rate", type=int, default=2)
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--reduction", choices=REDUCTIONS, default="none")
    parser.add_argument("--keep_seq", action="store_true", help="keep the token sequence per window")
    parser.add_argument("--batch_size", type=int, default=4, help="windows per jitted call")
    parser.add_argument("--matmul_dtype", choices=["bfloat16"], default=None,
                        help="bf16 matmul operands with float32 accumulation (faster, ~1e-2 rel. error)")
    parser.add_argument("--attention_impl", choices=["auto", "xla", "per_head", "cudnn", "splash"], default="auto",
                        help="auto: per_head on CPU (cache-friendly), xla elsewhere; cudnn: fused GPU attention")
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute .npy files that existed before this run (default: skip them)")
    parser.add_argument("--strict", action="store_true",
                        help="fail a video whose container declares more frames than decode (a truncated "
                             "file) instead of writing features of its decodable frames with a warning")
    args = parser.parse_args(argv)

    from tqdm.auto import tqdm

    out_dir = Path(args.output_dir)
    try:
        plan, renamed = plan_outputs(args.videos, out_dir)
    except ValueError as e:
        print(f"marlin-jax extract: {e}", file=sys.stderr)
        return 2
    try:
        marlin = Marlin.from_file(args.model, args.checkpoint, batch_size=args.batch_size,
                                  matmul_dtype=args.matmul_dtype, attention_impl=args.attention_impl)
    except ValueError as e:  # CheckpointError, StateDictMismatchError, unknown or mismatched model
        print(f"marlin-jax extract: cannot load the model: {e}", file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    # Only outputs that existed before this run are skipped (resuming); never one written by it.
    existed = set() if args.overwrite else {target for _, target in plan if target.exists()}
    failures: list[str] = []
    incomplete: list[IncompleteDecode] = []
    todo = [(v, t) for v, t in plan if t not in existed]
    for video, target in tqdm(todo, desc="videos", unit="video"):
        issues: list[IncompleteDecode] = []
        try:
            feats = marlin.extract_video(video, crop_face=args.crop_face, sample_rate=args.sample_rate,
                                         stride=args.stride, reduction=args.reduction, keep_seq=args.keep_seq,
                                         strict=args.strict, on_incomplete=issues.append)
            save_npy_atomic(target, feats)
            incomplete += issues[:1]
        except (VideoReadError, ValueError, OSError) as e:
            failures.append(str(e) if str(video) in str(e) else f"{video}: {e}")
    written, skipped = len(plan) - len(existed) - len(failures), len(existed)
    partly = f" ({len(incomplete)} of them partly decodable)" if incomplete else ""
    print(f"{written} written{partly}, {skipped} skipped (output existed before this run), "
          f"{len(failures)} failed, of {len(plan)} videos -> {out_dir}")
    if renamed:
        print(f"{len(renamed)} videos share a name with another video in their folder; their outputs keep "
              "the extension:", *(f"{v} -> {t}" for v, t in renamed), sep="\n  ")
    if incomplete:
        print(f"{len(incomplete)} written from partly decodable videos (features of the decodable frames "
              "only; --strict makes this an error):", *map(str, incomplete), sep="\n  ", file=sys.stderr)
    if failures:
        print(f"{len(failures)} failed:", *failures, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
