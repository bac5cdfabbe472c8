"""ArrayRecord shards of the ``youtube_faces_marlin`` TFDS builder as a random-access source.

Reads through ``tfds.data_source`` (no TensorFlow). ``build_youtube_faces_marlin`` turns a
YouTube-Faces layout folder into the shards; on a pod, build once and point ``tfds_data_dir`` at
the (GCS) copy.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np

from marlin_jax.data.records import BadRecordError, VideoRecord, decode_jpeg, decode_parsing_png

DATASET_NAME = "youtube_faces_marlin"


def build_youtube_faces_marlin(manual_dir: str, data_dir: str) -> None:
    """Builds the ``youtube_faces_marlin`` ArrayRecord shards from a YouTube-Faces layout folder
    (``manual_dir``) into ``data_dir``. Idempotent: an existing build is reused."""
    import tensorflow_datasets as tfds

    from marlin_jax.data.youtube_faces_marlin import Builder

    builder = Builder(data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))


def _read_frames(name: str, frames: Sequence[bytes], indices: Sequence[int]) -> np.ndarray:
    out = [decode_jpeg(frames[i], f"{name} frame {i}") for i in indices]
    if len({f.shape for f in out}) != 1:
        raise BadRecordError(f"{name}: frames have different sizes")
    return np.stack(out)


def _read_parsing(name: str, parsing: Sequence[bytes], indices: Sequence[int]
                  ) -> list[np.ndarray]:
    return [decode_parsing_png(parsing[i], f"{name} parsing map {i}") for i in indices]


class TfdsSource:
    """grain random-access source over a built ``youtube_faces_marlin`` TFDS dataset.

    ``source[i]`` reads one ArrayRecord example (the encoded bytes of all its frames); only the
    sampled frames are JPEG-decoded later.
    """

    has_labels = False

    def __init__(self, data_dir: str, split: str = "train", name: str = DATASET_NAME):
        import tensorflow_datasets as tfds

        self.data_dir = os.fspath(data_dir)
        self.split = split
        self.name = name
        try:
            self._source = tfds.data_source(name, split=split, data_dir=self.data_dir,
                                            download=False)
        except Exception as e:  # noqa: BLE001 - tfds raises assorted types for a missing build
            raise FileNotFoundError(
                f"{self.data_dir}: no built TFDS dataset {name!r} split {split!r} "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); build it with "
                f"marlin_jax.data.tfds_source.build_youtube_faces_marlin") from e

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> VideoRecord:
        try:
            ex = self._source[index]
        except Exception as e:  # noqa: BLE001 - a corrupt shard surfaces as many types
            raise BadRecordError(f"{self.data_dir}/{self.name}[{self.split}][{index}]: "
                                 f"unreadable record ({type(e).__name__}: {e})") from e
        name = ex["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        frames, parsing = list(ex["frames"]), list(ex["parsing"])
        if not frames:
            raise BadRecordError(f"{name}: record has no frames")
        if len(parsing) != len(frames):
            raise BadRecordError(f"{name}: {len(frames)} frames but {len(parsing)} parsing maps")
        return VideoRecord(
            name=name,
            num_frames=len(frames),
            read_frames=functools.partial(_read_frames, name, frames),
            read_parsing=functools.partial(_read_parsing, name, parsing),
        )

    def __repr__(self) -> str:
        return (f"TfdsSource(data_dir={self.data_dir!r}, name={self.name!r}, "
                f"split={self.split!r}, len={len(self)})")
