"""Video file reading and writing with OpenCV (no ffmpeg binary needed).

Frames are RGB uint8 ``(T, H, W, 3)``; every failure raises :class:`VideoReadError` naming the
file and the problem. A full read that decodes fewer frames than the container declares (a
truncated file) is a logged warning naming both counts, or :class:`IncompleteVideoError` with
``strict=True`` (:func:`check_decoded`, the one place of that rule).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


class VideoReadError(ValueError):
    """A video file is missing, unreadable, or has no frames."""


class IncompleteVideoError(VideoReadError):
    """Strict reading: the container declares more frames than could be decoded."""


@dataclass(frozen=True)
class IncompleteDecode:
    """A video whose container declares more frames than decode (truncated or damaged file)."""

    path: str
    declared: int
    decoded: int

    def __str__(self) -> str:
        return (f"{self.path}: the container declares {self.declared} frames but only {self.decoded} "
                f"could be decoded (truncated or damaged file)")


def check_decoded(path: str | os.PathLike, declared: int, decoded: int, *, strict: bool = False,
                  on_incomplete: Callable[[IncompleteDecode], None] | None = None) -> None:
    """Nothing when a full read ``decoded`` every frame the container ``declared`` (<= 0: unknown);
    else logs a warning and passes the :class:`IncompleteDecode` to ``on_incomplete``, or raises
    :class:`IncompleteVideoError` when ``strict``."""
    if declared <= 0 or decoded >= declared:
        return
    issue = IncompleteDecode(os.fspath(path), int(declared), int(decoded))
    if strict:
        raise IncompleteVideoError(f"{issue} [strict]")
    log.warning("%s; using the %d decodable frames", issue, decoded)
    if on_incomplete is not None:
        on_incomplete(issue)


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


def iter_frames(path: str | os.PathLike, step: int = 1, *, strict: bool = False, expect: int | None = None,
                on_incomplete: Callable[[IncompleteDecode], None] | None = None) -> Iterator[np.ndarray]:
    """Yields every ``step``-th frame of a video as RGB uint8 ``(H, W, 3)``.

    Skipped frames are grabbed but not decoded. Raises VideoReadError if the file cannot be opened
    or yields no frame. Read to its end, a partly decodable file is passed to ``on_incomplete``
    (see :func:`check_decoded`; ``strict`` raises after the last frame). ``expect``: a second
    read of a file whose first read decoded ``expect`` frames; reads at most those and raises
    VideoReadError when it decodes fewer.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    cap = _open(path)
    declared = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    index = 0
    try:
        while index != expect:
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
    if expect is not None and index != expect:
        raise VideoReadError(f"{os.fspath(path)}: decoded {expect} frames, then {index} when read again")
    if index == 0:
        said = f" (the container declares {declared})" if declared > 0 else ""
        raise VideoReadError(f"{os.fspath(path)}: video has no decodable frames{said}")
    if expect is None:
        check_decoded(path, declared, index, strict=strict, on_incomplete=on_incomplete)


def read_frames(path: str | os.PathLike, step: int = 1, max_frames: int | None = None) -> np.ndarray:
    """Reads (every ``step``-th frame of) a whole video: uint8 ``(T, H, W, 3)`` RGB."""
    return np.stack(list(itertools.islice(iter_frames(path, step), max_frames)))


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


def count_frames(path: str | os.PathLike, *, strict: bool = False,
                 on_incomplete: Callable[[IncompleteDecode], None] | None = None) -> int:
    """Exact number of frames, counted by demuxing (grab without decoding to RGB); a partly
    decodable file is passed to ``on_incomplete`` (see :func:`check_decoded`)."""
    cap = _open(path)
    n = 0
    try:
        declared = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        while cap.grab():
            n += 1
    finally:
        cap.release()
    if n:
        check_decoded(path, declared, n, strict=strict, on_incomplete=on_incomplete)
    return n


class VideoWriter(contextlib.AbstractContextManager):
    """Streams RGB uint8 frames ``(H, W, 3)`` (or batches ``(T, H, W, 3)``) into an mp4 (mp4v) or
    avi (MJPG) file, so long videos never need to be held in memory. The frame size is that of
    the first frame. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: str | os.PathLike, fps: float = 25.0):
        self.path, self.fps = os.fspath(path), fps
        self._writer: cv2.VideoWriter | None = None
        self._size: tuple[int, int] | None = None
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

    def write(self, frames: np.ndarray) -> None:
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"{self.path}: frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
        if self._writer is None:
            self._size = (frames.shape[2], frames.shape[1])
            fourcc = cv2.VideoWriter_fourcc(*("MJPG" if self.path.lower().endswith(".avi") else "mp4v"))
            self._writer = cv2.VideoWriter(self.path, fourcc, self.fps, self._size)
            if not self._writer.isOpened():
                raise OSError(f"{self.path}: OpenCV cannot open a video writer for this path")
        elif (frames.shape[2], frames.shape[1]) != self._size:
            raise ValueError(f"{self.path}: frame size {frames.shape[2]}x{frames.shape[1]} differs from the "
                             f"video's {self._size[0]}x{self._size[1]}")
        for frame in frames:
            self._writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None

    def __exit__(self, *exc) -> None:
        self.close()


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 25.0) -> None:
    """Writes RGB uint8 frames ``(T, H, W, 3)`` to an mp4 (mp4v codec) or avi (MJPG) file."""
    with VideoWriter(path, fps) as writer:
        writer.write(frames)
