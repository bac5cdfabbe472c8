"""The record protocol shared by every video source, temporal sampling, and decoding helpers.

A source is a grain ``RandomAccessDataSource``: ``source[i]`` is a cheap :class:`VideoRecord`
(metadata plus lazy readers), so only the sampled frames are decoded. Read failures raise
:class:`BadRecordError` naming the file; the pipeline skips those within an error budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Protocol

import cv2
import numpy as np
import simplejpeg

from marlin_jax.masking import patch_label_bits

PatchLabelReader = Callable[[Sequence[int], int, int], np.ndarray]


class BadRecordError(ValueError):
    """One video (or one of its frames / parsing maps) cannot be read; names the file."""


@dataclasses.dataclass(frozen=True)
class VideoRecord:
    """One video of a source. Nothing is decoded until ``read_frames`` / ``read_parsing``.

    Attributes:
      name: stable identifier (relative path or key), used in logs and errors.
      num_frames: number of frames available to sample from (>= 1).
      read_frames: indices -> uint8 ``(k, H, W, 3)`` RGB.
      read_parsing: indices -> list of k LaPa parsing maps (uint8 ``(H, W)``, or empty where the
        face parser found no face: the slice stays visible), or ``None`` without parsing maps.
      labels: int32 ``(L,)`` labels when the source has them, else ``None``.
      read_patch_labels: optional ``(indices, img_size, patch_size)`` -> uint16 ``(k, gh, gw)``
        patch coverage of the parsing maps (:func:`parsing_patch_labels` of ``read_parsing``'s
        maps, cached or precomputed: a few hundred bytes a frame); fasking prefers it.
      frame_positions: optional indices -> int64 ``(k,)`` positions of those frames in the
        source, which its ``read_positions`` turns into the frames ``read_frames`` gives: lets a
        worker process hand over where a clip's frames are instead of their pixels.
    """

    name: str
    num_frames: int
    read_frames: Callable[[Sequence[int]], np.ndarray]
    read_parsing: Callable[[Sequence[int]], list[np.ndarray]] | None = None
    labels: np.ndarray | None = None
    read_patch_labels: PatchLabelReader | None = None
    frame_positions: Callable[[Sequence[int]], np.ndarray] | None = None


class VideoSource(Protocol):
    """Random-access video source (grain ``RandomAccessDataSource`` of :class:`VideoRecord`)."""

    has_labels: bool

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> VideoRecord: ...


def sample_frame_indices(
    num_frames: int, clip_frames: int, sample_rate: int, rng: np.random.Generator
) -> np.ndarray:
    """Temporal sampling of the original MARLIN: ``clip_frames`` indices, stride ``sample_rate``,
    uniformly random start. Returns int64 ``(clip_frames,)``.

    Short videos follow the original's CelebV-HQ loader: with at most ``clip_frames`` frames the
    clip is padded by repeating the last frame; with fewer than ``clip_frames * sample_rate``
    frames the stride drops to ``num_frames // clip_frames``.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_frames <= clip_frames:
        return np.minimum(np.arange(clip_frames), num_frames - 1)
    rate = sample_rate if num_frames >= clip_frames * sample_rate else num_frames // clip_frames
    start = int(rng.integers(0, num_frames - clip_frames * rate + 1))
    return start + np.arange(clip_frames) * rate


def decode_jpeg(data: bytes, name: str, out: np.ndarray | None = None) -> np.ndarray:
    """JPEG (or any OpenCV image) bytes -> uint8 ``(H, W, 3)`` RGB; BadRecordError if corrupt.

    JPEGs go through simplejpeg (libjpeg-turbo: OpenCV's pixels, ~20 % faster), other formats and
    JPEGs simplejpeg rejects through OpenCV. ``out``: decode into this ``(H, W, 3)`` array (no
    copy); BadRecordError if the image has another size.
    """
    img = None
    if data[:2] == b"\xff\xd8":
        with contextlib.suppress(ValueError):  # corrupt, unusual or larger than out: OpenCV decides
            img = simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)
    if img is None:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
        if bgr is None:
            raise BadRecordError(f"{name}: not a decodable image ({len(data)} bytes)")
        img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        if out is not None and img.shape == out.shape:
            out[...] = img
            img = out
    if out is not None and img.shape != out.shape:
        raise BadRecordError(f"{name}: frame is {img.shape[1]}x{img.shape[0]}, the video's other "
                             f"frames {out.shape[1]}x{out.shape[0]}")
    return img


def decode_frames(data: Sequence[bytes], names: Sequence[str]) -> np.ndarray:
    """A video's encoded frames -> uint8 ``(k, H, W, 3)`` RGB, decoded in place (one array, no
    per-frame copies); BadRecordError naming the frame that is corrupt or of another size."""
    first = decode_jpeg(data[0], names[0])
    frames = np.empty((len(data), *first.shape), np.uint8)
    frames[0] = first
    for i in range(1, len(data)):
        decode_jpeg(data[i], names[i], out=frames[i])
    return frames


def read_bytes(path: str) -> bytes:
    """A file's bytes; BadRecordError naming it if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BadRecordError(f"{path}: cannot read image ({e.strerror or e})") from e


def load_parsing_npy(path: str) -> np.ndarray:
    """A parsing-map ``.npy`` -> its uint8 labels, any shape; BadRecordError if missing, corrupt
    or not integer-valued."""
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError as e:
        raise BadRecordError(f"{path}: parsing map not found") from e
    except Exception as e:  # noqa: BLE001 - numpy raises many types for corrupt files
        raise BadRecordError(f"{path}: corrupt parsing map ({type(e).__name__}: {e})") from e
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise BadRecordError(f"{path}: parsing map must be integer labels, got {arr.dtype}")
    return arr.astype(np.uint8, copy=False)


def load_frame_parsing(path: str) -> np.ndarray:
    """One frame's parsing ``.npy`` as the original face parser writes it -> uint8 ``(H, W)``.

    The file holds ``(num_faces, H, W)`` label maps (int64); the first face is used, as in the
    original. No face gives an empty ``(0,)`` map. ``(H, W)`` files are accepted.
    """
    arr = load_parsing_npy(path)
    if arr.size == 0:
        return np.zeros((0,), np.uint8)
    if arr.ndim in (2, 3):
        return arr[0] if arr.ndim == 3 else arr
    raise BadRecordError(f"{path}: parsing map must be (faces, H, W) or (H, W), got {arr.shape}")


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``(k, H, W, 3)`` -> ``(k, size, size, 3)`` (area/linear filter); no-op if equal."""
    if frames.shape[1:3] == (size, size):
        return frames
    interp = cv2.INTER_AREA if min(frames.shape[1:3]) > size else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f, (size, size), interpolation=interp) for f in frames])


def parsing_patch_labels(parsing: Sequence[np.ndarray], img_size: int, patch_size: int
                         ) -> np.ndarray:
    """Per-frame parsing maps (uint8 ``(H, W)``, or empty = no face) -> their patch coverage at
    ``img_size``: uint16 ``(k, img_size // patch_size, img_size // patch_size)``, bit ``l`` set
    where label ``l`` occurs in the patch (:func:`marlin_jax.masking.patch_label_bits` of the map
    resized to ``img_size`` with nearest neighbour), all zero for a frame without a face."""
    g = img_size // patch_size
    out = np.zeros((len(parsing), g, g), np.uint16)
    for i, p in enumerate(parsing):
        if p.size and p.ndim != 2:
            raise ValueError(f"a parsing map must be (H, W) labels, got shape {p.shape}")
        if p.size:
            if p.shape != (img_size, img_size):
                p = cv2.resize(p, (img_size, img_size), interpolation=cv2.INTER_NEAREST)
            out[i] = patch_label_bits(p[None], patch_size)[0]
    return out


class PatchLabelCache:
    """One video's parsing maps as patch coverage (a ``PatchLabelReader``), each frame's map read
    at most once through ``read_parsing`` (indices -> maps); ``whole``: all frames at the first
    call (one file per video). Concurrent readers may both fill a row (same value), never see a
    half-filled one (the row is written before its flag)."""

    def __init__(self, read_parsing: Callable[[Sequence[int]], list[np.ndarray]], num_frames: int,
                 whole: bool = False):
        self.read_parsing = read_parsing
        self.num_frames = num_frames
        self.whole = whole
        self.tables: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, indices: Sequence[int], img_size: int, patch_size: int) -> np.ndarray:
        table = self.tables.get((img_size, patch_size))
        if table is None:  # allocated once per geometry, not on every call
            g = img_size // patch_size
            table = self.tables.setdefault((img_size, patch_size), (
                np.zeros((self.num_frames, g, g), np.uint16), np.zeros(self.num_frames, bool)))
        bits, known = table
        idx = np.asarray(indices, np.int64)
        if not known[idx].all():
            todo = np.arange(self.num_frames) if self.whole else np.unique(idx[~known[idx]])
            bits[todo] = parsing_patch_labels(self.read_parsing(todo), img_size, patch_size)
            known[todo] = True
        return bits[idx]


def list_files(directory: str, suffix: str) -> list[str]:
    """Sorted names in ``directory`` ending with ``suffix``; BadRecordError if not a folder."""
    try:
        names = os.listdir(directory)
    except OSError as e:
        raise BadRecordError(f"{directory}: cannot list folder ({e.strerror or e})") from e
    return sorted(n for n in names if n.lower().endswith(suffix))
