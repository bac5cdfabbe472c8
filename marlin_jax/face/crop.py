"""Square face crops with temporally smoothed boxes.

The crop rule is the original MARLIN one (FaceX-Zoo ``crop_face``): a square whose side is the
longer side of the detector's box, centred on it, zero-padded outside the frame, resized to
``size``. On top of that the boxes are smoothed over time (median, then Gaussian) so crops do not
jitter, and a frame with no face reuses the box of the nearest frame with one (a fade-in from
black takes the first good box); a video with no face at all raises :class:`NoFaceError`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter1d, median_filter

from marlin_jax.face.detect import SCORE_THRESHOLD, Detections, NoFaceError, detect_faces, primary_faces


@dataclass(frozen=True)
class FaceTrack:
    """Per-frame square crop boxes of one video.

    squares: float32 ``(T, 3)`` as ``(centre_x, centre_y, side)`` in frame pixels (smoothed);
    landmarks: float32 ``(T, 5, 2)`` detector landmarks in frame pixels, NaN where no face;
    found: bool ``(T,)``, True where the detector found a face in that frame;
    indices: int64 ``(T,)`` frame number of each row (None: rows are frames ``0 .. T-1``);
    num_frames: frames in the video, searched or not (None: ``T``).
    """

    squares: np.ndarray
    landmarks: np.ndarray
    found: np.ndarray
    indices: np.ndarray | None = None
    num_frames: int | None = None

    def squares_at(self, frames: Sequence[int] | np.ndarray) -> np.ndarray:
        """Squares ``(k, 3)`` for frame numbers ``frames``: each that of the nearest tracked frame
        (the frame itself when it was searched)."""
        frames = np.asarray(frames, np.int64)
        if self.indices is None:
            return self.squares[np.clip(frames, 0, len(self.squares) - 1)]
        right = np.clip(np.searchsorted(self.indices, frames), 0, len(self.indices) - 1)
        left = np.clip(right - 1, 0, len(self.indices) - 1)
        closer_left = np.abs(frames - self.indices[left]) <= np.abs(self.indices[right] - frames)
        return self.squares[np.where(closer_left, left, right)]


def square_from_box(boxes: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """``(..., 4)`` ``(x1, y1, x2, y2)`` boxes -> ``(..., 3)`` ``(cx, cy, side)`` squares: the
    original's rule (side = longer box side), enlarged by ``margin`` of the side on each edge."""
    boxes = np.asarray(boxes, np.float32)
    cx = (boxes[..., 0] + boxes[..., 2]) / 2
    cy = (boxes[..., 1] + boxes[..., 3]) / 2
    side = np.maximum(boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1])
    return np.stack([cx, cy, side * (1 + 2 * margin)], axis=-1)


def fill_missing(values: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Fills rows where ``found`` is False with the nearest found row (the earlier one on a tie):
    leading misses take the first found row, trailing misses the last. ``values`` ``(T, ...)``,
    ``found`` bool ``(T,)`` with at least one True."""
    hits = np.flatnonzero(found)
    rows = np.arange(len(found))
    pos = np.searchsorted(hits, rows)  # hits[pos] is the first hit at or after each row
    before = hits[np.maximum(pos - 1, 0)]
    after = hits[np.minimum(pos, len(hits) - 1)]
    has_before, has_after = pos > 0, pos < len(hits)
    use_before = has_before & (~has_after | (rows - before <= after - rows))
    return values[np.where(found, rows, np.where(use_before, before, after))]


def smooth_squares(squares: np.ndarray, sigma: float) -> np.ndarray:
    """Smooths ``(T, 3)`` squares over time: a running median of 5 frames (drops single-frame
    outliers), then a Gaussian of ``sigma`` frames (zero phase, so no lag). ``sigma`` 0 returns
    the input unchanged."""
    if sigma <= 0 or len(squares) < 2:
        return squares
    out = median_filter(squares.astype(np.float64), size=(min(5, len(squares)), 1), mode="nearest")
    out = gaussian_filter1d(out, sigma=sigma, axis=0, mode="nearest")
    return out.astype(np.float32)


def crop_square(frame: np.ndarray, square: np.ndarray, size: int) -> np.ndarray:
    """Cuts the square ``(cx, cy, side)`` out of ``frame`` ``(H, W, C)``, zero-padding outside the
    frame, and resizes it to ``(size, size, C)`` (bilinear, as the original's ``cv2.resize``)."""
    cx, cy, side = (float(v) for v in square)
    half = max(1, int(side / 2))
    x, y = int(cx), int(cy)
    x1, x2, y1, y2 = x - half, x + half, y - half, y + half
    h, w = frame.shape[:2]
    out = np.zeros((y2 - y1, x2 - x1) + frame.shape[2:], frame.dtype)
    sx1, sx2 = max(x1, 0), min(x2, w)
    sy1, sy2 = max(y1, 0), min(y2, h)
    if sx2 > sx1 and sy2 > sy1:
        out[sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = frame[sy1:sy2, sx1:sx2]
    return cv2.resize(out, (size, size), interpolation=cv2.INTER_LINEAR)


def landmarks_to_crop(landmarks: np.ndarray, squares: np.ndarray, size: int) -> np.ndarray:
    """Maps frame-pixel landmarks ``(T, 5, 2)`` into the ``size`` crop made from ``squares``
    ``(T, 3)`` by :func:`crop_square`."""
    half = np.maximum(1, (squares[:, 2] / 2).astype(np.int64))
    origin = squares[:, :2].astype(np.int64) - half[:, None]
    scale = size / (2 * half)
    return ((landmarks - origin[:, None, :]) * scale[:, None, None]).astype(np.float32)


@dataclass(frozen=True)
class FaceCropper:
    """Stateless face-cropping configuration.

    size: output side in pixels (224 for MARLIN).
    margin: extra context on each edge as a fraction of the square's side (0 = the original's
        tight square around the detector box).
    smoothing: Gaussian sigma in frames for the box track (0 = per-frame boxes, like the original).
    score_threshold: RetinaFace confidence needed to accept a face.
    num_threads: onnxruntime threads (0 = all cores; preprocessing workers use 1).
    """

    size: int = 224
    margin: float = 0.0
    smoothing: float = 2.0
    score_threshold: float = SCORE_THRESHOLD
    num_threads: int = 0

    def track(self, frames: np.ndarray, name: str = "video") -> FaceTrack:
        """The smoothed box track of frames ``(T, H, W, 3)``. Raises NoFaceError (or its subclass
        FrameTooSmallError) naming ``name`` if no frame holds a face."""
        dets = detect_faces(frames, self.score_threshold, num_threads=self.num_threads, name=name)
        return self.track_detections(dets, name)

    def track_stream(self, frames: Iterable[np.ndarray], name: str = "video",
                     search: Callable[[int], bool] | None = None, batch_size: int = 16) -> FaceTrack:
        """The smoothed box track of a stream of RGB uint8 ``(H, W, 3)`` frames, holding one batch
        in memory. Only frames whose number passes ``search`` (all when None) are searched: they
        are the track's ``indices``. Raises NoFaceError naming ``name`` if none holds a face.
        """
        dets: list[Detections] = []
        indices: list[int] = []
        batch: list[np.ndarray] = []
        total = 0
        for i, frame in enumerate(itertools.chain(frames, [None])):  # None: the end, flush
            if frame is not None:
                total = i + 1
                if search is None or search(i):
                    batch.append(frame)
                    indices.append(i)
            if batch and (len(batch) == batch_size or frame is None):
                dets += detect_faces(np.stack(batch), self.score_threshold, num_threads=self.num_threads, name=name)
                batch = []
        if not dets:
            raise NoFaceError(f"{name}: no frames to search for a face ({total} frames in the video)")
        return self.track_detections(dets, name, indices=np.asarray(indices, np.int64), num_frames=total)

    def track_detections(self, dets: Sequence[Detections], name: str = "video",
                         indices: np.ndarray | None = None, num_frames: int | None = None) -> FaceTrack:
        """The smoothed box track of per-frame detections (from :func:`detect_faces`); ``indices``
        and ``num_frames`` as in :class:`FaceTrack`."""
        boxes, landmarks, found = primary_faces(dets)
        if not found.any():
            of = f" (of the {num_frames} in the video)" if num_frames not in (None, len(found)) else ""
            raise NoFaceError(f"{name}: no face found in any of {len(found)} frames searched{of}")
        squares = square_from_box(fill_missing(boxes, found), self.margin)
        return FaceTrack(smooth_squares(squares, self.smoothing), landmarks, found, indices, num_frames)

    def crop_frames(self, frames: np.ndarray, squares: np.ndarray) -> np.ndarray:
        """Crops ``(T, H, W, 3)`` frames with ``(T, 3)`` squares -> uint8 ``(T, size, size, 3)``."""
        return np.stack([crop_square(f, s, self.size) for f, s in zip(frames, squares, strict=True)])

    def crop_video(self, frames: np.ndarray, name: str = "video") -> np.ndarray:
        """RGB uint8 ``(T, H, W, 3)`` -> face crops uint8 ``(T, size, size, 3)``."""
        return self.crop_video_with_landmarks(frames, name)[0]

    def crop_video_with_landmarks(self, frames: np.ndarray, name: str = "video"
                                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Like :meth:`crop_video`, also returning the detector's 5 landmarks in crop pixels
        ``(T, 5, 2)`` (NaN where no face) and ``found`` ``(T,)``: what :func:`parse_faces` needs,
        so parsing does not detect again."""
        frames = np.asarray(frames)
        track = self.track(frames, name)
        crops = self.crop_frames(frames, track.squares)
        return crops, landmarks_to_crop(track.landmarks, track.squares, self.size), track.found
