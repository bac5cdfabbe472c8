"""The original MARLIN YouTube-Faces layout as a random-access source.

Layout (what the original preprocessing writes)::

    root/crop_images_DB/<person>/<i>/<frame>.jpg          face crops, 224x224
    root/face_parsing_images_DB/<person>/<i>/<frame>.npy  LaPa parsing map per frame (H, W)
    root/train_set.csv, root/val_set.csv                  columns ``path,len`` (path = <person>/<i>)

As in the original, a video's frames are the sorted file names of its crop folder and a frame's
parsing map the ``.npy`` of the same stem. Unlike the original, a folder is listed once and a map
read at most once (fasking keeps its 392-byte patch coverage, cached per video).
"""

from __future__ import annotations

import csv
import functools
import os
from collections.abc import Sequence

import numpy as np

from marlin_jax.data.records import (
    BadRecordError,
    PatchLabelCache,
    VideoRecord,
    decode_frames,
    list_files,
    load_frame_parsing,
    read_bytes,
)

CROP_DIR = "crop_images_DB"
PARSING_DIR = "face_parsing_images_DB"


def read_split_csv(root_dir: str, split: str) -> list[tuple[str, int]]:
    """``<root>/<split>_set.csv`` -> ``[(path, len), ...]``; ValueError naming the file."""
    path = os.path.join(root_dir, f"{split}_set.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: split file not found (YouTube-Faces layout expects "
                                f"{split}_set.csv with columns path,len)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise ValueError(f"{path}: expected a header with columns path,len; "
                             f"got {reader.fieldnames}")
        rows = []
        for line, row in enumerate(reader, start=2):
            try:
                rows.append((row["path"], int(row.get("len") or 0)))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}:{line}: bad row {row}") from e
    return rows


def _read_frames(crop_dir: str, files: Sequence[str], indices: Sequence[int]) -> np.ndarray:
    paths = [os.path.join(crop_dir, files[i]) for i in indices]
    return decode_frames([read_bytes(p) for p in paths], paths)


def _read_parsing(parsing_dir: str, files: Sequence[str], indices: Sequence[int]
                  ) -> list[np.ndarray]:
    return [load_frame_parsing(os.path.join(parsing_dir, os.path.splitext(files[i])[0] + ".npy"))
            for i in indices]


class YtfSource:
    """grain random-access source over the original YouTube-Faces layout; ``source[i]``'s readers
    load only the requested JPEG frames / ``.npy`` maps (listings and patch coverage cached)."""

    has_labels = False

    def __init__(self, root_dir: str, split: str = "train", take_num: int | None = None):
        self.root_dir = os.fspath(root_dir)
        self.split = split
        rows = read_split_csv(self.root_dir, split)
        self._paths = [p for p, _ in rows][:take_num]
        self._videos: dict[int, VideoRecord] = {}  # listed once, patch coverage cached

    def __getstate__(self) -> dict:
        # to worker processes without the cache: each fills its own
        return {**self.__dict__, "_videos": {}}

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> VideoRecord:
        record = self._videos.get(index)
        if record is None:
            rel = self._paths[index]
            crop_dir = os.path.join(self.root_dir, CROP_DIR, rel)
            files = list_files(crop_dir, ".jpg")
            if not files:
                raise BadRecordError(f"{crop_dir}: no .jpg frames")
            read = functools.partial(_read_parsing, os.path.join(self.root_dir, PARSING_DIR, rel), files)
            record = self._videos.setdefault(index, VideoRecord(  # atomic: threads agree
                name=rel, num_frames=len(files),
                read_frames=functools.partial(_read_frames, crop_dir, files),
                read_parsing=read, read_patch_labels=PatchLabelCache(read, len(files))))
        return record

    def __repr__(self) -> str:
        return f"YtfSource(root_dir={self.root_dir!r}, split={self.split!r}, len={len(self)})"
