"""Video file reading and writing with OpenCV (no ffmpeg binary needed).

Frames are returned RGB, uint8, channels-last: ``(T, H, W, 3)``. Every failure raises
:class:`VideoReadError` naming the file and the problem.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import cv2
import numpy as np


class VideoReadError(ValueError):
    """A video file is missing, unreadable, or has no frames."""


def _open(path: str | os.PathLike) -> cv2.VideoCapture:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoReadError(f"{path}: no such file")
    if os.path.isdir(path):
        raise VideoReadError(f"{path}: is a directory, not a video file")
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        cap.release()
        raise VideoReadError(f"{path}: not a readable video (OpenCV could not open it)")
    return cap


def iter_frames(path: str | os.PathLike, step: int = 1) -> Iterator[np.ndarray]:
    """Yields every ``step``-th frame of a video as RGB uint8 ``(H, W, 3)``.

    Skipped frames are grabbed but not decoded to RGB, so a step of 2 costs about half.
    Raises VideoReadError if the file cannot be opened or yields no frame at all.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    cap = _open(path)
    index = 0
    try:
        while True:
            if index % step == 0:
                ok, frame = cap.read()
                if not ok:
                    break
                yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            elif not cap.grab():
                break
            index += 1
    finally:
        cap.release()
    if index == 0:
        raise VideoReadError(f"{os.fspath(path)}: video has no decodable frames")


def read_frames(path: str | os.PathLike, step: int = 1, max_frames: int | None = None) -> np.ndarray:
    """Reads (every ``step``-th frame of) a whole video: uint8 ``(T, H, W, 3)`` RGB."""
    frames = []
    for frame in iter_frames(path, step):
        frames.append(frame)
        if max_frames is not None and len(frames) >= max_frames:
            break
    return np.stack(frames)


def video_info(path: str | os.PathLike) -> dict:
    """Container metadata: ``frame_count`` (as stored; may be approximate), ``fps``, ``height``,
    ``width``."""
    cap = _open(path)
    try:
        return {
            "frame_count": int(cap.get(cv2.CAP_PROP_FRAME_COUNT)),
            "fps": float(cap.get(cv2.CAP_PROP_FPS)),
            "height": int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            "width": int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
        }
    finally:
        cap.release()


def count_frames(path: str | os.PathLike) -> int:
    """Exact number of frames, counted by demuxing (grab without decoding to RGB)."""
    cap = _open(path)
    n = 0
    try:
        while cap.grab():
            n += 1
    finally:
        cap.release()
    return n


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 25.0) -> None:
    """Writes RGB uint8 frames ``(T, H, W, 3)`` to an mp4 (mp4v codec) or avi (MJPG) file."""
    path = os.fspath(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fourcc = cv2.VideoWriter_fourcc(*("MJPG" if path.lower().endswith(".avi") else "mp4v"))
    height, width = frames.shape[1:3]
    writer = cv2.VideoWriter(path, fourcc, fps, (width, height))
    if not writer.isOpened():
        raise OSError(f"{path}: OpenCV cannot open a video writer for this path")
    try:
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
