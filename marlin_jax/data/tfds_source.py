"""ArrayRecord shards of the ``youtube_faces_marlin`` TFDS builder as a random-access source.

One example per frame (the parsing map's 16x16-patch label coverage, 392 bytes, + the JPEG bytes),
frames of a video contiguous, videos indexed in the build's ``metadata.json``: a clip reads its 16
frames' examples and nothing else. The builder's ``raw`` config keeps the decoded 224x224x3 pixels
in a flat ``<split>.frames`` file instead: a frame is one positional read into the clip (the GIL
released), no record read or parsed. Opened through ``tfds.data_source`` (no TensorFlow); examples
are parsed with tfds' ``tf.train.Example`` proto module.
"""

from __future__ import annotations

import functools
import json
import os
import weakref
from collections.abc import Sequence

import numpy as np
from etils import epath

from marlin_jax.data.records import BadRecordError, VideoRecord, decode_frames

DATASET_NAME = "youtube_faces_marlin"
FRAME_ENCODINGS = ("jpeg", "raw")  # the builder's configs


def build_youtube_faces_marlin(manual_dir: str, data_dir: str, frame_encoding: str = "jpeg"
                               ) -> None:
    """Builds the ``youtube_faces_marlin`` ArrayRecord shards from a YouTube-Faces layout folder
    (``manual_dir``) into ``data_dir``, frames as JPEG bytes or (``"raw"``) uint8 224x224x3
    pixels in a flat file per split (~10x the bytes, no decode per read; read from a local file
    system). Idempotent: an existing build is reused."""
    import tensorflow_datasets as tfds

    from marlin_jax.data.youtube_faces_marlin import Builder

    if frame_encoding not in FRAME_ENCODINGS:
        raise ValueError(f"frame_encoding must be one of {FRAME_ENCODINGS}, got {frame_encoding!r}")
    builder = Builder(config=frame_encoding, data_dir=os.fspath(data_dir),
                      file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))


def _with_config(data_dir: str, name: str) -> str:
    """``name`` as tfds should read it: without a config, the one config built in ``data_dir``
    (several or none: tfds' default)."""
    if "/" in name:
        return name
    built = {p.parent.parent.name for p in (epath.Path(data_dir) / name).glob(
        "*/*/dataset_info.json")}
    return f"{name}/{built.pop()}" if len(built) == 1 else name


def _parse_frame(record: bytes) -> dict:
    """One serialised frame example of a ``jpeg`` build -> ``{"video", "frame", "image",
    "patch_labels"}``; the proto parsed directly takes 4x less time than tfds' decoding."""
    from tensorflow_datasets.proto import tf_example_pb2

    f = tf_example_pb2.Example.FromString(record).features.feature
    return {"video": f["video"].int64_list.value[0], "frame": f["frame"].int64_list.value[0],
            "image": f["jpeg"].bytes_list.value[0],
            "patch_labels": f["patch_labels"].bytes_list.value[0]}


def _pread_into(fd: int, out: np.ndarray, offset: int) -> int:
    """Reads ``out.nbytes`` bytes at ``offset`` into ``out`` (contiguous); bytes read. One
    ``os.preadv`` (no copy, the GIL released); ``os.pread`` and a copy where there is none."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [out], offset)
    data = os.pread(fd, out.nbytes, offset)
    out.reshape(-1)[: len(data)] = np.frombuffer(data, np.uint8)
    return len(data)


class _VideoExamples:
    """The examples of one video read so far (a clip's frames and slice maps share reads)."""

    def __init__(self, source: TfdsSource, video: int):
        self.source, self.video = source, video
        self.name, self.first, self.num_frames = source._videos[video]
        self.examples: dict[int, dict] = {}

    def _get(self, indices: Sequence[int]) -> list[dict]:
        todo = sorted({int(i) for i in indices} - self.examples.keys())
        if todo:
            keys = [self.first + i for i in todo]
            reader = self.source._source.data_source  # the raw ArrayRecord reader: bytes per key
            try:  # one by one: __getitems__'s thread pool costs 5x more for 16 small records
                got = [_parse_frame(reader[k]) for k in keys]
            except Exception as e:  # noqa: BLE001 - a corrupt shard surfaces as many types
                raise BadRecordError(f"{self.name}: unreadable frame records {keys[0]}.."
                                     f"{keys[-1]} ({type(e).__name__}: {e})") from e
            for i, ex in zip(todo, got, strict=True):
                if int(ex["video"]) != self.video or int(ex["frame"]) != i:
                    raise BadRecordError(
                        f"{self.name}: record {self.first + i} holds video {int(ex['video'])} "
                        f"frame {int(ex['frame'])}, not video {self.video} frame {i} (the "
                        "index in metadata.json does not match the shards: rebuild)")
                self.examples[i] = ex
        return [self.examples[int(i)] for i in indices]

    def read_frames(self, indices: Sequence[int]) -> np.ndarray:
        examples = self._get(indices)
        return decode_frames([ex["image"] for ex in examples],
                             [f"{self.name} frame {int(ex['frame'])}" for ex in examples])

    def read_patch_labels(self, indices: Sequence[int], img_size: int, patch_size: int
                          ) -> np.ndarray:
        _check_geometry(self.source, img_size, patch_size)
        g = img_size // patch_size
        out = np.empty((len(indices), g, g), "<u2")
        for k, ex in enumerate(self._get(indices)):
            if len(ex["patch_labels"]) != out[k].nbytes:
                raise BadRecordError(
                    f"{self.source.build_dir}: {self.name} frame {int(ex['frame'])} (record "
                    f"{self.first + int(ex['frame'])}): patch_labels has {len(ex['patch_labels'])} "
                    f"bytes, expected {out[k].nbytes}: rebuild")
            out[k] = np.frombuffer(ex["patch_labels"], "<u2").reshape(g, g)
        return out


def _check_geometry(source: TfdsSource, img_size: int, patch_size: int) -> None:
    """ValueError unless the pipeline asks for the patch coverage the build stores."""
    if (img_size, patch_size) != (source.img_size, source.patch_size):
        raise ValueError(
            f"{DATASET_NAME} stores the parsing maps' coverage of {source.patch_size}x"
            f"{source.patch_size} patches at {source.img_size}x{source.img_size}; the pipeline "
            f"asks for patch_size {patch_size} at img_size {img_size}: rebuild with the builder's "
            "IMG_SIZE / PATCH_SIZE set to those")


class TfdsSource:
    """grain random-access source over a built ``youtube_faces_marlin`` TFDS dataset.

    ``source[i]`` is video ``i`` of the split's index (``metadata.json``) and reads nothing: a
    clip reads its sampled frames' examples only. ``name`` may name the config
    (``youtube_faces_marlin/raw``); without one, the config built in ``data_dir`` is read (both
    built: ``jpeg``).
    """

    has_labels = False

    def __init__(self, data_dir: str, split: str = "train", name: str = DATASET_NAME):
        import tensorflow_datasets as tfds

        self.data_dir = os.fspath(data_dir)
        self.split = split
        self.name = name
        try:
            self._source = tfds.data_source(_with_config(self.data_dir, name), split=split,
                                            data_dir=self.data_dir, download=False)
        except Exception as e:  # noqa: BLE001 - tfds raises assorted types for a missing build
            raise FileNotFoundError(
                f"{self.data_dir}: no built TFDS dataset {name!r} split {split!r} "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); build it with "
                f"marlin_jax.data.tfds_source.build_youtube_faces_marlin") from e
        info = self._source.dataset_info
        meta_path = epath.Path(info.data_dir) / "metadata.json"  # local or gs://
        try:
            meta = json.loads(meta_path.read_text())
            self._videos = [(str(n), int(first), int(k)) for n, first, k in
                            meta[f"{split}_videos"]]
            self.img_size, self.patch_size = int(meta["img_size"]), int(meta["patch_size"])
            self.frame_encoding = str(meta["frame_encoding"])
            if self.frame_encoding not in FRAME_ENCODINGS:
                raise ValueError(f"unknown frame_encoding {self.frame_encoding!r}")
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise FileNotFoundError(
                f"{meta_path}: no video index for split {split!r} ({type(e).__name__}: {e}); "
                f"built by {name} {info.version}, not the layout of version 2.1.0: rebuild with "
                f"build_youtube_faces_marlin") from e
        self.build_dir = str(info.data_dir)
        self._raw_paths: tuple[str, str] | None = None  # raw: the split's flat files
        self._raw_open: tuple[int, int, np.ndarray] | None = None  # (pid, frames fd, coverage)
        if self.frame_encoding == "raw":
            from marlin_jax.data.youtube_faces_marlin.youtube_faces_marlin_dataset_builder import (
                raw_file_names,
            )

            g = self.img_size // self.patch_size
            self._raw_paths = tuple(os.path.join(self.build_dir, n) for n in raw_file_names(split))
            for path, item in zip(self._raw_paths, (self.img_size ** 2 * 3, g * g * 2),
                                  strict=True):
                try:
                    got = os.path.getsize(path)
                except OSError as e:
                    raise FileNotFoundError(
                        f"{path}: a file of the raw build of split {split!r} cannot be read "
                        f"({e.strerror or e}); raw builds are read from a local file system. A "
                        "build of version 2.1.0 kept the pixels in the examples: rebuild with "
                        "build_youtube_faces_marlin") from e
                if got != len(self._source) * item:
                    raise BadRecordError(
                        f"{path}: {got} bytes, expected {len(self._source) * item} "
                        f"({len(self._source)} frames of {item}): truncated or from another "
                        "build; rebuild")

    def __getstate__(self) -> dict:  # to worker processes: their own files, not this one's
        return {**self.__dict__, "_raw_open": None}

    def _raw_files(self) -> tuple[int, np.ndarray]:
        """(frames fd, coverage memmap) of a raw build, opened once per process."""
        if self._raw_open is None or self._raw_open[0] != os.getpid():  # grain workers too
            g = self.img_size // self.patch_size
            frames, coverage = self._raw_paths
            fd = os.open(frames, os.O_RDONLY)
            weakref.finalize(self, os.close, fd)  # closed with the source (or at exit)
            self._raw_open = (os.getpid(), fd, np.memmap(coverage, "<u2", "r").reshape(-1, g, g))
        return self._raw_open[1:]

    def read_positions(self, positions: np.ndarray) -> np.ndarray:
        """Raw builds: uint8 ``(*positions.shape, S, S, 3)``, the frames at record ``positions``
        of the ``.frames`` file, each one ``os.preadv`` straight into place (the GIL released
        while it reads); BadRecordError naming the file on a short read."""
        if self._raw_paths is None:
            raise ValueError(f"{self.build_dir}: a {self.frame_encoding} build has no frames "
                             "file; read_positions is for raw builds")
        fd, _ = self._raw_files()
        positions = np.asarray(positions, np.int64)
        s = self.img_size
        out = np.empty((*positions.shape, s, s, 3), np.uint8)
        frames, size = out.reshape(-1, s, s, 3), s * s * 3
        for frame, position in zip(frames, positions.reshape(-1).tolist(), strict=True):
            try:
                got = _pread_into(fd, frame, position * size)
            except OSError as e:
                got = f"error ({e.strerror or e})"
            if got != size:
                raise BadRecordError(f"{self._raw_paths[0]}: record {position}: read {got} of "
                                     f"{size} bytes")
        return out

    def _raw_positions(self, first: int, indices: Sequence[int]) -> np.ndarray:
        return first + np.asarray(indices, np.int64)

    def _read_raw_patch_labels(self, first: int, indices: Sequence[int], img_size: int,
                               patch_size: int) -> np.ndarray:
        """uint16 ``(k, gh, gw)``: coverage of frames ``first + indices`` (``.patch_labels``)."""
        _check_geometry(self, img_size, patch_size)
        return np.asarray(self._raw_files()[1][self._raw_positions(first, indices)])

    def __len__(self) -> int:
        return len(self._videos)

    def __getitem__(self, index: int) -> VideoRecord:
        if self._raw_paths is not None:  # pixels and coverage from the flat files: no records
            name, first, n = self._videos[index]
            positions = functools.partial(self._raw_positions, first)
            return VideoRecord(
                name=name, num_frames=n,
                read_frames=lambda indices: self.read_positions(positions(indices)),
                read_patch_labels=functools.partial(self._read_raw_patch_labels, first),
                frame_positions=positions)
        video = _VideoExamples(self, index)
        return VideoRecord(name=video.name, num_frames=video.num_frames,
                           read_frames=video.read_frames, read_patch_labels=video.read_patch_labels)

    def __repr__(self) -> str:
        return (f"TfdsSource(data_dir={self.data_dir!r}, name={self.name!r}, "
                f"split={self.split!r}, len={len(self)})")
