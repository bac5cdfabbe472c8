"""Plain video files (mp4, avi, ...) with optional parsing maps and labels, as a source.

For datasets such as CelebV-HQ or VoxCeleb after face cropping. Layout::

    root/[videos/]<rel>.mp4                 videos (``videos/`` is used when it exists)
    root/parsing/<rel>.npy or beside video  optional uint8 (T, H, W) LaPa maps, one per frame
    root/labels.csv                         optional: column ``name`` (= <rel>) + integer labels
    root/<split>.txt                        optional: one <rel> per line selects the split

Without a split file every video belongs to split ``train`` (and ``all``). When the dataset has
parsing maps (a parsing folder, or any ``.npy`` beside a video), a video without its own is a bad
record where maps are read (fasking), as in the ytf source; without any, fasking masks at random.
A truncated video is read as far as it decodes, or is a bad record with ``strict=True``.
"""

from __future__ import annotations

import csv
import functools
import logging
import os
from collections.abc import Sequence

import cv2
import numpy as np

from marlin_jax.data.records import (
    BadRecordError,
    PatchLabelCache,
    VideoRecord,
    load_parsing_npy,
)
from marlin_jax.video_io import VIDEO_EXTENSIONS, IncompleteDecode, VideoReadError, count_frames

log = logging.getLogger(__name__)
_NAMED_WARNINGS = 20  # missing parsing maps named one WARNING each; the rest in one summary


def read_video_frames(path: str, indices: Sequence[int]) -> np.ndarray:
    """Decodes only the frames at ``indices`` (any order, repeats allowed): uint8 ``(k,H,W,3)``.

    Frames before the last wanted one are demuxed (``grab``) but only wanted ones are decoded.
    """
    wanted = sorted(set(int(i) for i in indices))
    if not os.path.isfile(path):
        raise BadRecordError(f"{path}: no such video file")
    cap = cv2.VideoCapture(path)
    got: dict[int, np.ndarray] = {}
    try:
        if not cap.isOpened():
            raise BadRecordError(f"{path}: not a readable video (OpenCV could not open it)")
        pos = 0
        for target in wanted:
            while pos < target and cap.grab():
                pos += 1
            ok, frame = cap.read()
            if not ok:
                raise BadRecordError(f"{path}: cannot decode frame {target} (video too short "
                                     f"or corrupt)")
            got[target] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            pos += 1
    finally:
        cap.release()
    return np.stack([got[int(i)] for i in indices])


def _read_parsing(path: str, num_frames: int, indices: Sequence[int]) -> list[np.ndarray]:
    maps = load_parsing_npy(path)
    if maps.size == 0:  # no face anywhere: every slice stays visible, as the original
        return [np.zeros((0,), np.uint8) for _ in indices]
    if maps.ndim != 3 or maps.shape[0] != num_frames:
        raise BadRecordError(f"{path}: parsing maps must be (T={num_frames}, H, W) for the video "
                             f"beside it, got {maps.shape}")
    return [maps[int(i)] for i in indices]


def _missing_parsing(video_path: str, candidates: Sequence[str], indices: Sequence[int]
                     ) -> list[np.ndarray]:
    raise BadRecordError(f"{video_path}: no parsing map ({' or '.join(candidates)} not found); the "
                         f"video is skipped, as the ytf source skips videos without parsing maps")


def read_labels_csv(path: str) -> dict[str, np.ndarray]:
    """``labels.csv`` (``name`` + integer columns) -> {name: int32 (L,)}; ValueError naming it."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or header[0] not in ("name", "path"):
            raise ValueError(f"{path}: first column must be 'name', got header {header}")
        out = {}
        for line, row in enumerate(reader, start=2):
            try:
                out[os.path.splitext(row[0])[0]] = np.asarray([int(v) for v in row[1:]],
                                                              np.int32)
            except (ValueError, IndexError) as e:
                raise ValueError(f"{path}:{line}: bad row {row}") from e
    return out


class VideoFileSource:
    """grain random-access source over a folder of video files (see the module docstring).

    ``parsing_dir``: folder of ``<rel stem>.npy`` maps (default ``root/parsing`` when it exists).
    ``strict``: truncated videos are bad records. For the run's report: ``missing_parsing`` and
    ``incomplete`` (name -> :class:`~marlin_jax.video_io.IncompleteDecode`, this process).
    """

    def __init__(self, root_dir: str, split: str = "train", parsing_dir: str | None = None,
                 take_num: int | None = None, *, strict: bool = False):
        self.root_dir = os.fspath(root_dir)
        self.split = split
        self.strict = strict
        vdir = os.path.join(self.root_dir, "videos")
        self.video_dir = vdir if os.path.isdir(vdir) else self.root_dir
        if not os.path.isdir(self.video_dir):
            raise FileNotFoundError(f"{self.video_dir}: video folder not found")
        if parsing_dir is not None and not os.path.isdir(parsing_dir):
            raise FileNotFoundError(f"{parsing_dir}: parsing map folder not found (parsing_dir)")
        pdir = parsing_dir or os.path.join(self.root_dir, "parsing")
        self.parsing_dir = pdir if os.path.isdir(pdir) else None
        videos = sorted(os.path.relpath(os.path.join(dirpath, f), self.video_dir)
                        for dirpath, _, files in os.walk(self.video_dir)
                        for f in files if f.lower().endswith(VIDEO_EXTENSIONS))
        split_file = os.path.join(self.root_dir, f"{split}.txt")
        if os.path.isfile(split_file):
            with open(split_file, encoding="utf-8") as f:
                keep = {os.path.splitext(ln.strip())[0] for ln in f if ln.strip()}
            videos = [v for v in videos if os.path.splitext(v)[0] in keep]
        elif split not in ("train", "all"):
            raise FileNotFoundError(f"{split_file}: split file not found (without one, every "
                                    f"video is in split 'train')")
        if not videos:
            raise FileNotFoundError(f"{self.video_dir}: no video files ({', '.join(VIDEO_EXTENSIONS)}) "
                                    f"for split {split!r}")
        self._videos = videos[:take_num]
        labels_csv = os.path.join(self.root_dir, "labels.csv")
        self._labels = read_labels_csv(labels_csv) if os.path.isfile(labels_csv) else None
        self.has_labels = self._labels is not None
        self._num_labels = len(next(iter(self._labels.values()))) if self._labels else 0
        self._frame_counts: dict[int, int] = {}
        self.incomplete: dict[str, IncompleteDecode] = {}
        self._parsing = [next((p for p in self._parsing_candidates(rel) if os.path.isfile(p)), None)
                         for rel in self._videos]
        self.has_parsing = self.parsing_dir is not None or any(p is not None for p in self._parsing)
        # video -> patch coverage of its parsing maps: each .npy read once (per process)
        self._patch_labels: dict[int, PatchLabelCache] = {}
        self.missing_parsing = [rel for rel, p in zip(self._videos, self._parsing, strict=True)
                                if p is None and self.has_parsing]
        for rel in self.missing_parsing[:_NAMED_WARNINGS]:
            log.warning("%s: no parsing map (%s); the video will be skipped where parsing maps are "
                        "read (fasking), as the ytf source does", os.path.join(self.video_dir, rel),
                        " or ".join(self._parsing_candidates(rel)))
        if len(self.missing_parsing) > _NAMED_WARNINGS:
            log.warning("%s: %d more videos have no parsing map and will be skipped (%d in all; "
                        "listed in missing_parsing)", self.video_dir,
                        len(self.missing_parsing) - _NAMED_WARNINGS, len(self.missing_parsing))

    @property
    def num_missing_parsing(self) -> int:
        """How many videos of this split are skipped for want of a parsing map."""
        return len(self.missing_parsing)

    def __len__(self) -> int:
        return len(self._videos)

    def __getstate__(self) -> dict:
        # to worker processes without the patch-coverage cache: each fills its own
        return {**self.__dict__, "_patch_labels": {}}

    def _parsing_candidates(self, rel: str) -> list[str]:
        stem = os.path.splitext(rel)[0]
        return [os.path.join(d, stem + ".npy") for d in (self.parsing_dir, self.video_dir) if d]

    def __getitem__(self, index: int) -> VideoRecord:
        rel = self._videos[index]
        path = os.path.join(self.video_dir, rel)
        n = self._frame_counts.get(index)
        if n is None:
            try:
                n = count_frames(path, strict=self.strict,
                                 on_incomplete=functools.partial(self.incomplete.__setitem__, rel))
            except VideoReadError as e:
                raise BadRecordError(str(e)) from e
            if n == 0:
                raise BadRecordError(f"{path}: video has no frames")
            self._frame_counts[index] = n
        parsing = self._parsing[index]
        read_parsing = read_patch_labels = None
        if parsing is not None:
            read_parsing = functools.partial(_read_parsing, parsing, n)
            read_patch_labels = self._patch_labels.setdefault(
                index, PatchLabelCache(read_parsing, n, whole=True))
        elif self.has_parsing:
            read_parsing = functools.partial(_missing_parsing, path, self._parsing_candidates(rel))
        labels = None
        if self._labels is not None:
            labels = self._labels.get(os.path.splitext(rel)[0],
                                      np.full((self._num_labels,), -1, np.int32))
        return VideoRecord(name=rel, num_frames=n, labels=labels,
                           read_frames=functools.partial(read_video_frames, path),
                           read_parsing=read_parsing, read_patch_labels=read_patch_labels)

    def __repr__(self) -> str:
        return f"VideoFileSource(root_dir={self.root_dir!r}, split={self.split!r}, len={len(self)})"
