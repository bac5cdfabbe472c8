"""The grain input pipeline for MARLIN pretraining: one pipeline for one CPU, one GPU or a pod.

Per process: ``range(len(source))[process_index::process_count]`` -> shuffle -> repeat ->
``random_map(LoadClip)`` (16 sampled frames + mask) -> batch -> ``to_iter_dataset(threads)``
[-> ``mp_prefetch(workers)``] -> error accounting. With workers, a source that can (``raw``
records) has them send each clip's frame positions, and the frames are read in this process (one
kernel copy per frame) instead of crossing shared memory. Batches are ``{"video": uint8
(B, T, H, W, 3), "mask": bool (B, N)}`` (+ ``"labels"`` int32 ``(B, L)`` when the source has
labels), numpy arrays owned by the caller; normalise to [0, 1] inside the jitted step. The
iterator's ``get_state``/``set_state`` resume it exactly, error counts included.

A bad record (missing/corrupt JPEG, npy, video) is replaced by another record of the same shard
drawn from the element's own RNG (batches keep their size, the pipeline stays deterministic),
counted, and logged by file name when newly found; more than ``error_budget`` *distinct* bad
records raise :class:`ErrorBudgetError`. Known bad records (part of the iterator state) are
skipped without being read again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import grain
import ml_collections
import numpy as np

from marlin_jax.data.records import (
    BadRecordError,
    VideoRecord,
    VideoSource,
    parsing_patch_labels,
    resize_frames,
    sample_frame_indices,
)
from marlin_jax.data.synthetic_source import SyntheticSource
from marlin_jax.data.tfds_source import TfdsSource
from marlin_jax.data.videos import VideoFileSource
from marlin_jax.data.ytf import YtfSource
from marlin_jax.masking import STRATEGIES, make_mask
from marlin_jax.video_io import VideoReadError

log = logging.getLogger(__name__)

SOURCES = ("synthetic", "ytf", "tfds", "videos")

# Kinds of data issues the pipeline counts. Only "skipped" counts against the error budget.
SKIPPED = "skipped"  # unreadable record replaced by another one
SHORT_VIDEO = "short_video"  # fewer than clip_frames * temporal_sample_rate frames
EMPTY_PARSING = "empty_parsing"  # a slice's parsing map is empty (no face): slice all visible
NO_PARSING = "no_parsing"  # fasking on a video without parsing maps: uniform random mask
ISSUE_KINDS = (SKIPPED, SHORT_VIDEO, EMPTY_PARSING, NO_PARSING)

_READ_ERRORS = (BadRecordError, VideoReadError, OSError, cv2.error)


class ErrorBudgetError(RuntimeError):
    """More bad records were skipped than ``data_config.error_budget`` allows."""


def default_data_config() -> ml_collections.ConfigDict:
    """Every data knob with its default (the original MARLIN YouTube-Faces recipe)."""
    c = ml_collections.ConfigDict()
    c.source = "synthetic"  # one of SOURCES (README, Data)
    # ytf: folder with crop_images_DB/, face_parsing_images_DB/, <split>_set.csv.
    # videos: folder of video files (or with videos/, parsing/, labels.csv, <split>.txt).
    c.root_dir = ""
    # videos: folder of <name>.npy parsing maps; "" = <root_dir>/parsing or beside each video.
    c.parsing_dir = ""
    c.tfds_name = "youtube_faces_marlin"  # tfds: dataset name
    c.tfds_data_dir = ""  # tfds: data_dir holding the built dataset (local path or gs://)
    c.train_split = "train"  # split name the trainer passes to make_dataset for training
    c.val_split = "val"  # split name for validation
    c.take_num = 0  # ytf/videos: use only the first N videos of the split (0 = all)
    c.clip_frames = 16  # frames per clip (T)
    c.temporal_sample_rate = 2  # stride between sampled frames (smaller for short videos)
    c.img_size = 224  # frames are resized to img_size x img_size when they differ
    c.patch_size = 16  # spatial patch size of the tokeniser
    c.tubelet_size = 2  # temporal patch size of the tokeniser
    c.mask_strategy = "fasking"  # fasking | fasking_opp | random | tube | frame
    c.mask_ratio = 0.9  # fraction of tokens masked; visible = int(N * (1 - mask_ratio))
    c.num_threads = 4  # decoding threads per process (grain ReadOptions)
    c.num_workers = 0  # > 0: grain multiprocessing workers per process (raw records: 2+ cores)
    c.worker_buffer_size = 2  # batches buffered per worker process
    c.prefetch = 4  # batches buffered ahead of the consumer (per process)
    c.seed = 0  # data seed (shuffle order, temporal starts, masks); combined with make_dataset's
    c.error_budget = 100  # distinct bad records tolerated per process before failing
    c.max_retries = 16  # replacement records tried for one bad record before failing
    c.strict_videos = False  # videos: a truncated video is a bad record (else read with a warning)
    # repeat=False only: drop the last partial batch and make all process shards equal (at most
    # process_count - 1 videos dropped): every process runs the same number of steps
    c.drop_remainder = True
    c.synthetic_num_videos = 512  # synthetic: videos per split
    c.synthetic_num_frames = 32  # synthetic: frames per rendered video
    c.synthetic_seed = 0  # synthetic: rendering seed
    return c


def make_source(data_config: ml_collections.ConfigDict, split: str) -> VideoSource:
    """The random-access source named by ``data_config.source`` for ``split``."""
    c = data_config
    take = c.take_num or None
    if c.source == "synthetic":
        return SyntheticSource(c.synthetic_num_videos, split=split,
                               num_frames=c.synthetic_num_frames, size=c.img_size,
                               seed=c.synthetic_seed)
    if not (c.root_dir or (c.source == "tfds" and c.tfds_data_dir)):
        raise ValueError(f"data source {c.source!r} needs data_config.root_dir"
                         + (" or tfds_data_dir" if c.source == "tfds" else ""))
    if c.source == "ytf":
        return YtfSource(c.root_dir, split=split, take_num=take)
    if c.source == "tfds":
        return TfdsSource(c.tfds_data_dir or c.root_dir, split=split, name=c.tfds_name)
    if c.source == "videos":
        return VideoFileSource(c.root_dir, split=split, parsing_dir=c.parsing_dir or None,
                               take_num=take, strict=bool(c.get("strict_videos", False)))
    raise ValueError(f"unknown data source {c.source!r}; expected one of {SOURCES}")


class LoadClip:
    """grain random map: global source index -> one clip, its mask and its issues.

    Returns ``{"video": uint8 (T, S, S, 3), "mask": bool (N,), ["labels": int32 (L,)],
    "_issues": [(kind, message[, index]), ...]}``. A bad record is replaced by a random record of
    the same shard, at most ``max_retries`` times; the choice depends only on the element's RNG,
    so records in ``known_bad`` (index -> message) are skipped unread with the same result.
    ``defer_frames``: where the record offers ``frame_positions``, return ``"frame_positions":
    int64 (T,)`` instead of ``"video"``, read later by the source's ``read_positions`` (see
    :class:`AccountingIterator`): a worker process then hands over a few bytes, not the pixels.
    """

    def __init__(self, source: VideoSource, *, clip_frames: int, temporal_sample_rate: int,
                 img_size: int, patch_size: int, tubelet_size: int, mask_strategy: str,
                 mask_ratio: float, shard_offset: int = 0, shard_stride: int = 1,
                 max_retries: int = 16, defer_frames: bool = False):
        if mask_strategy not in STRATEGIES:
            raise ValueError(f"unknown mask_strategy {mask_strategy!r}; expected one of "
                             f"{STRATEGIES}")
        if clip_frames % tubelet_size or img_size % patch_size:
            raise ValueError(f"clip_frames {clip_frames} / img_size {img_size} must be multiples "
                             f"of tubelet_size {tubelet_size} / patch_size {patch_size}")
        self.source = source
        self.clip_frames = clip_frames
        self.rate = temporal_sample_rate
        self.img_size = img_size
        self.patch_size = patch_size
        self.tubelet_size = tubelet_size
        self.strategy = mask_strategy
        self.mask_ratio = mask_ratio
        self.grid = (clip_frames // tubelet_size, img_size // patch_size, img_size // patch_size)
        self.shard_offset = shard_offset
        self.shard_stride = shard_stride
        self.shard_len = len(range(shard_offset, len(source), shard_stride))
        self.max_retries = max_retries
        self.defer_frames = defer_frames
        self.with_labels = bool(getattr(source, "has_labels", False))
        self.known_bad: dict[int, str] = {}  # source index -> why it cannot be read

    def __call__(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        skipped: list[tuple[Any, ...]] = []
        index = int(index)
        for _ in range(self.max_retries + 1):
            if index not in self.known_bad:  # else skipped without reading
                notes: list[tuple[Any, ...]] = []  # kept only if this record loads
                before = rng.bit_generator.state
                try:
                    element = self._load(self.source[index], rng, notes)
                    element["_issues"] = skipped + notes
                    return element
                except _READ_ERRORS as e:
                    rng.bit_generator.state = before  # as if skipped without reading
                    self.known_bad[index] = str(e)
            skipped.append((SKIPPED, self.known_bad[index], index))
            index = self.shard_offset + self.shard_stride * int(rng.integers(self.shard_len))
        raise ErrorBudgetError(
            f"{self.max_retries + 1} records in a row were unreadable; last: {skipped[-1][1]}")

    def _load(self, record: VideoRecord, rng: np.random.Generator,
              issues: list[tuple[str, str]]) -> dict[str, Any]:
        n = record.num_frames
        if n < self.clip_frames * self.rate:
            how = "padded" if n <= self.clip_frames else f"stride {n // self.clip_frames}"
            issues.append((SHORT_VIDEO, f"{record.name}: {n} frames < "
                                        f"{self.clip_frames * self.rate} ({how})"))
        idx = sample_frame_indices(n, self.clip_frames, self.rate, rng)
        if self.defer_frames and record.frame_positions is not None:
            out: dict[str, Any] = {"frame_positions": record.frame_positions(idx)}
        else:
            video = np.asarray(record.read_frames(idx))
            if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
                raise BadRecordError(f"{record.name}: frames must be uint8 (T, H, W, 3), got "
                                     f"{video.dtype} {video.shape}")
            out = {"video": np.ascontiguousarray(resize_frames(video, self.img_size))}
        bits = None
        if self.strategy in ("fasking", "fasking_opp"):
            # one map per tubelet slice: the slice's first frame, as the original; fasking needs
            # only its patch coverage (all zero = no face: the slice stays visible)
            slice_idx = idx[:: self.tubelet_size]
            if record.read_patch_labels is not None:
                bits = record.read_patch_labels(slice_idx, self.img_size, self.patch_size)
            elif record.read_parsing is not None:
                maps = record.read_parsing(slice_idx)
                try:
                    bits = parsing_patch_labels(maps, self.img_size, self.patch_size)
                except ValueError as e:
                    raise BadRecordError(f"{record.name}: bad parsing map: {e}") from e
            else:
                issues.append((NO_PARSING, f"{record.name}: no parsing maps; random mask"))
                bits = np.zeros((len(slice_idx), *self.grid[1:]), np.uint16)
            if record.read_parsing is not None or record.read_patch_labels is not None:
                empty = int((~bits.reshape(len(bits), -1).any(1)).sum())
                if empty:
                    issues.append((EMPTY_PARSING, f"{record.name}: {empty} of {len(bits)} "
                                                  f"slice parsing maps empty (kept visible)"))
        try:
            mask = make_mask(self.strategy, self.mask_ratio, rng, patch_labels=bits,
                             grid=self.grid, patch_size=self.patch_size,
                             tubelet_size=self.tubelet_size)
        except ValueError as e:
            raise BadRecordError(f"{record.name}: cannot build a mask: {e}") from e
        out["mask"] = mask
        if self.with_labels:
            out["labels"] = np.asarray([] if record.labels is None else record.labels, np.int32)
        return out


def collate(elements: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stacks arrays along a new batch axis and concatenates the ``_issues`` lists."""
    batch = {k: np.stack([e[k] for e in elements]) for k in elements[0] if k != "_issues"}
    batch["_issues"] = [i for e in elements for i in e["_issues"]]
    return batch


class AccountingIterator(grain.DatasetIterator):
    """Pops ``_issues`` from each batch, counts and logs them, enforces the error budget on the
    number of distinct bad records (counts and bad records are part of the iterator state).

    ``stats``: ``{kind: count}`` for :data:`ISSUE_KINDS` (``skipped``: every replacement, re-visits
    included); ``bad_records``: the distinct bad records ``{source index: message}``.
    ``read_positions``: turns a batch's deferred ``"frame_positions"`` (B, T) into its ``"video"``
    (resized to ``img_size`` where the source stores another size).
    """

    def __init__(self, parent: grain.DatasetIterator, error_budget: int,
                 copy_arrays: bool = False, known_bad: dict[int, str] | None = None,
                 read_positions: Callable[[np.ndarray], np.ndarray] | None = None,
                 img_size: int = 0):
        super().__init__(parent)
        self._budget = error_budget
        self._copy = copy_arrays
        self._read_positions, self._img_size = read_positions, img_size
        self._counts = dict.fromkeys(ISSUE_KINDS, 0)
        self._bad: dict[int, str] = {}
        # the transform's table (same process: threads) to skip known bad records unread
        self._known_bad = known_bad if known_bad is not None else {}

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._counts)

    @property
    def bad_records(self) -> dict[int, str]:
        return dict(self._bad)

    def _bad_record(self, index: int | None, message: str) -> None:
        if index is None or index in self._bad:
            log.debug("data: skipped known bad record: %s", message)
            return
        self._bad[index] = message
        self._known_bad.setdefault(index, message)
        log.warning("data: bad record %d of the error budget %d skipped (from now on without "
                    "reading it): %s", len(self._bad), self._budget, message)
        if len(self._bad) > self._budget:
            raise ErrorBudgetError(
                f"{len(self._bad)} distinct bad records skipped, more than the error budget of "
                f"{self._budget} (data_config.error_budget); last: {message}")

    def __next__(self) -> dict[str, Any]:
        batch = dict(next(self._parent))
        if self._copy:  # out of worker shared memory: valid after close(), owned by the caller
            batch = {k: np.array(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
        if "frame_positions" in batch:  # read here, in the consuming process (kernel copies)
            video = self._read_positions(batch.pop("frame_positions"))
            b, t = video.shape[:2]  # resized as frames, like LoadClip's own reads
            video = resize_frames(video.reshape(b * t, *video.shape[2:]), self._img_size)
            video = video.reshape(b, t, *video.shape[1:])
            batch = {"video": video, **batch}
        for kind, message, *index in batch.pop("_issues", ()):
            self._counts[kind] = self._counts.get(kind, 0) + 1
            if kind == SKIPPED:
                self._bad_record(index[0] if index else None, message)
            elif self._counts[kind] <= 5 or self._counts[kind] % 1000 == 0:  # the first, then rarely
                log.info("data: %s #%d: %s", kind, self._counts[kind], message)
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "issues": dict(self._counts),
                "bad_records": {str(k): v for k, v in sorted(self._bad.items())}}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._counts = {**dict.fromkeys(ISSUE_KINDS, 0),
                        **{k: int(v) for k, v in state["issues"].items()}}
        self._bad = {int(k): str(v) for k, v in state.get("bad_records", {}).items()}
        for index, message in self._bad.items():
            self._known_bad.setdefault(index, message)


class AccountingIterDataset(grain.IterDataset):
    """IterDataset whose iterator is an :class:`AccountingIterator`."""

    def __init__(self, parent: grain.IterDataset, error_budget: int, copy_arrays: bool = False,
                 known_bad: dict[int, str] | None = None,
                 read_positions: Callable[[np.ndarray], np.ndarray] | None = None,
                 img_size: int = 0):
        super().__init__(parent)
        self._args = (error_budget, copy_arrays, known_bad, read_positions, img_size)

    def __iter__(self) -> AccountingIterator:
        return AccountingIterator(self._parent.__iter__(), *self._args)


def _derive_seed(*parts: int) -> int:
    """A 32-bit seed from integers (grain seeds must fit in uint32)."""
    return int(np.random.SeedSequence([int(p) % (1 << 63) for p in parts])
               .generate_state(1, np.uint32)[0])


def make_dataset(data_config: ml_collections.ConfigDict, *, split: str, global_batch_size: int,
                 process_index: int = 0, process_count: int = 1, seed: int = 0,
                 shuffle: bool = True, repeat: bool = True,
                 source: VideoSource | None = None) -> AccountingIterDataset:
    """This process's pipeline (see the module docstring); ``iter()`` gives a checkpointable
    iterator of batches of ``global_batch_size // process_count`` clips.

    Args:
      data_config: see :func:`default_data_config`.
      split: the source's split name (e.g. ``data_config.train_split``).
      global_batch_size: clips per step over all processes; divisible by ``process_count``.
      process_index / process_count: ``jax.process_index()`` / ``jax.process_count()``.
      seed: combined with ``data_config.seed`` (shuffle order, temporal starts, masks).
      shuffle / repeat: shuffle each epoch; repeat forever (else one pass, in equal-length
        shards when ``data_config.drop_remainder``).
      source: use this source instead of building one from ``data_config`` (tests, custom data).
    """
    c = data_config
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by "
                         f"process_count {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    source = make_source(c, split) if source is None else source
    if len(source) < process_count:
        raise ValueError(f"{source!r} has {len(source)} videos, fewer than the "
                         f"{process_count} processes")
    transform = LoadClip(
        source, clip_frames=c.clip_frames, temporal_sample_rate=c.temporal_sample_rate,
        img_size=c.img_size, patch_size=c.patch_size, tubelet_size=c.tubelet_size,
        mask_strategy=c.mask_strategy, mask_ratio=c.mask_ratio, shard_offset=process_index,
        shard_stride=process_count, max_retries=c.max_retries,
        # with workers, sources that can (raw records) send frame positions, read in this process
        defer_frames=c.num_workers > 0 and hasattr(source, "read_positions"))

    n = len(source)
    if not repeat and c.drop_remainder:
        # one pass in lockstep (multi-host eval): equal shards, so every process yields the same
        # number of batches; drops at most process_count - 1 videos
        n -= n % process_count
    ds = grain.MapDataset.range(n)[process_index::process_count]
    if shuffle:
        ds = ds.shuffle(seed=_derive_seed(c.seed, seed, 1))
    if repeat:
        ds = ds.repeat()
    ds = ds.random_map(transform, seed=_derive_seed(c.seed, seed, 2, process_index))
    ds = ds.batch(global_batch_size // process_count, drop_remainder=c.drop_remainder,
                  batch_fn=collate)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, c.num_threads),
                                                 prefetch_buffer_size=max(1, c.prefetch)))
    if c.num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags: outside an absl app, accept the defaults
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=c.num_workers, per_worker_buffer_size=max(1, c.worker_buffer_size)))
    return AccountingIterDataset(
        it_ds, error_budget=c.error_budget, copy_arrays=c.num_workers > 0,
        known_bad=transform.known_bad, img_size=c.img_size,
        read_positions=source.read_positions if transform.defer_frames else None)
