"""The built-in synthetic face videos (:mod:`marlin_jax.data.synthetic`) as a random-access source.

Videos are rendered on demand from their index, so the source needs no files. Splits draw from
disjoint index ranges.
"""

from __future__ import annotations

import numpy as np

from marlin_jax.data.records import VideoRecord

# Split -> first video index; splits never overlap for fewer than 10**6 videos each.
_SPLIT_OFFSETS = {"train": 0, "val": 1_000_000, "test": 2_000_000}


class SyntheticSource:
    """grain random-access source of ``num_videos`` procedurally rendered face videos, each with
    exact LaPa parsing maps and int32 labels (see ``synthetic.LABEL_NAMES``)."""

    has_labels = True

    def __init__(self, num_videos: int, split: str = "train", num_frames: int = 32,
                 size: int = 224, seed: int = 0):
        if split not in _SPLIT_OFFSETS:
            raise ValueError(f"synthetic split must be one of {sorted(_SPLIT_OFFSETS)}, "
                             f"got {split!r}")
        if num_videos < 1:
            raise ValueError(f"num_videos must be >= 1, got {num_videos}")
        self.num_videos = num_videos
        self.split = split
        self.num_frames = num_frames
        self.size = size
        self.seed = seed

    def __len__(self) -> int:
        return self.num_videos

    def __getitem__(self, index: int) -> VideoRecord:
        from marlin_jax.data.synthetic import render_video

        if not 0 <= index < self.num_videos:
            raise IndexError(f"index {index} out of range for {self.num_videos} videos")
        video = render_video(_SPLIT_OFFSETS[self.split] + index, num_frames=self.num_frames,
                             size=self.size, seed=self.seed)
        frames, parsing = video["frames"], video["parsing"]
        return VideoRecord(name=str(video["name"]), num_frames=int(frames.shape[0]),
                           read_frames=lambda idx: frames[np.asarray(idx)],
                           read_parsing=lambda idx: list(parsing[np.asarray(idx)]),
                           labels=np.asarray(video["labels"], np.int32))

    def __repr__(self) -> str:
        return (f"SyntheticSource(num_videos={self.num_videos}, split={self.split!r}, "
                f"num_frames={self.num_frames}, size={self.size}, seed={self.seed})")
