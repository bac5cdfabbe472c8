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


class VideoWriter:
    """Streams RGB uint8 frames ``(H, W, 3)`` (or batches ``(T, H, W, 3)``) into an mp4 (mp4v) or
    avi (MJPG) file, so long videos never need to be held in memory. The frame size is ``size``
    (width, height) or that of the first frame. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: str | os.PathLike, fps: float = 25.0, size: tuple[int, int] | None = None):
        self.path, self.fps = os.fspath(path), fps
        self._writer: cv2.VideoWriter | None = None
        self._size: tuple[int, int] | None = None
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if size is not None:
            self._open(size)

    def _open(self, size: tuple[int, int]) -> None:
        self._size = size
        fourcc = cv2.VideoWriter_fourcc(*("MJPG" if self.path.lower().endswith(".avi") else "mp4v"))
        self._writer = cv2.VideoWriter(self.path, fourcc, self.fps, size)
        if not self._writer.isOpened():
            raise OSError(f"{self.path}: OpenCV cannot open a video writer for this path")

    def write(self, frames: np.ndarray) -> None:
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"{self.path}: frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
        if self._writer is None:
            self._open((frames.shape[2], frames.shape[1]))
        elif (frames.shape[2], frames.shape[1]) != self._size:
            raise ValueError(f"{self.path}: frame size {frames.shape[2]}x{frames.shape[1]} differs from the "
                             f"video's {self._size[0]}x{self._size[1]}")
        for frame in frames:
            self._writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 25.0) -> None:
    """Writes RGB uint8 frames ``(T, H, W, 3)`` to an mp4 (mp4v codec) or avi (MJPG) file."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    with VideoWriter(path, fps, size=(frames.shape[2], frames.shape[1])) as writer:
        writer.write(frames)
