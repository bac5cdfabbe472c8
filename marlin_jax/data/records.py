"""The record protocol shared by every video source, temporal sampling, and decoding helpers.

A source is a grain ``RandomAccessDataSource``: ``len(source)`` videos, ``source[i]`` a cheap
:class:`VideoRecord` (metadata plus lazy readers), so that only the sampled frames are ever
decoded. Every read failure raises :class:`BadRecordError` naming the file and the problem; the
pipeline skips such records within an error budget.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

# Frame indices -> uint8 (k, H, W, 3) RGB.
FrameReader = Callable[[Sequence[int]], np.ndarray]
# Frame indices -> k parsing maps, each uint8 (H, W), or an empty array where the face parser
# found no face in that frame (the original then keeps the whole slice visible).
ParsingReader = Callable[[Sequence[int]], list[np.ndarray]]


class BadRecordError(ValueError):
    """One video (or one of its frames / parsing maps) cannot be read; names the file."""


@dataclasses.dataclass(frozen=True)
class VideoRecord:
    """One video of a source. Nothing is decoded until ``read_frames`` / ``read_parsing``.

    Attributes:
      name: stable identifier (relative path or key), used in logs and errors.
      num_frames: number of frames available to sample from (>= 1).
      read_frames: indices -> uint8 ``(k, H, W, 3)`` RGB.
      read_parsing: indices -> list of k LaPa parsing maps (uint8 ``(H, W)``, or empty), or
        ``None`` when this video has no parsing maps.
      labels: int32 ``(L,)`` labels when the source has them, else ``None``.
    """

    name: str
    num_frames: int
    read_frames: FrameReader
    read_parsing: ParsingReader | None = None
    labels: np.ndarray | None = None


@runtime_checkable
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


def decode_jpeg(data: bytes, name: str) -> np.ndarray:
    """JPEG (or any OpenCV image) bytes -> uint8 ``(H, W, 3)`` RGB; BadRecordError if corrupt."""
    img = None
    if data:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise BadRecordError(f"{name}: not a decodable image ({len(data)} bytes)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_image(path: str) -> np.ndarray:
    """An image file -> uint8 ``(H, W, 3)`` RGB; BadRecordError if missing or corrupt."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadRecordError(f"{path}: cannot read image ({e.strerror or e})") from e
    return decode_jpeg(data, path)


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
    original. No face (``(0, H, W)``) gives an empty ``(0,)`` map. ``(H, W)`` files are accepted.
    """
    arr = load_parsing_npy(path)
    if arr.ndim == 3:
        return arr[0] if arr.shape[0] else np.zeros((0,), np.uint8)
    if arr.ndim == 2 or arr.size == 0:
        return arr if arr.size else np.zeros((0,), np.uint8)
    raise BadRecordError(f"{path}: parsing map must be (faces, H, W) or (H, W), got {arr.shape}")


def encode_parsing_png(parsing: np.ndarray) -> bytes:
    """uint8 ``(H, W)`` parsing map -> lossless PNG bytes; an empty map -> ``b""``."""
    if parsing.size == 0:
        return b""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(parsing, np.uint8))
    if not ok:
        raise ValueError(f"cannot PNG-encode a parsing map of shape {parsing.shape}")
    return buf.tobytes()


def decode_parsing_png(data: bytes, name: str) -> np.ndarray:
    """Inverse of :func:`encode_parsing_png`: uint8 ``(H, W)``, or empty ``(0,)`` for ``b""``."""
    if not data:
        return np.zeros((0,), np.uint8)
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.ndim != 2:
        raise BadRecordError(f"{name}: not a decodable parsing-map PNG ({len(data)} bytes)")
    return arr


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``(k, H, W, 3)`` -> ``(k, size, size, 3)`` (area/linear filter); no-op if equal."""
    if frames.shape[1:3] == (size, size):
        return frames
    interp = cv2.INTER_AREA if min(frames.shape[1:3]) > size else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f, (size, size), interpolation=interp) for f in frames])


def resize_parsing(parsing: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``(H, W)`` labels -> ``(size, size)`` with nearest neighbour; empty stays empty."""
    if parsing.size == 0 or parsing.shape == (size, size):
        return parsing
    return cv2.resize(parsing, (size, size), interpolation=cv2.INTER_NEAREST)


def list_files(directory: str, suffix: str) -> list[str]:
    """Sorted names in ``directory`` ending with ``suffix``; BadRecordError if not a folder."""
    try:
        names = os.listdir(directory)
    except OSError as e:
        raise BadRecordError(f"{directory}: cannot list folder ({e.strerror or e})") from e
    return sorted(n for n in names if n.lower().endswith(suffix))
