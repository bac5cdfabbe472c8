"""Benchmark: clips/s per core of the data sources against the original MARLIN loader.

Writes the YouTube-Faces layout first (:func:`marlin_jax.data.synthetic.write_ytf_layout`: 224x224
JPEG crops, int64 ``(1, 224, 224)`` parsing ``.npy`` per frame, what the original preprocessing
writes) and builds the ``youtube_faces_marlin`` records from it, then times, in one process,
interleaved (each loader in turn, ``--rounds`` times, the best round counts: robust to other load
on a shared machine), on the same files, fasking at mask ratio 0.9. A pipeline is timed in steady
state (its prefetch buffer drained untimed first) and only once every other loader is idle (their
prefetch threads and workers have filled their buffers): a loader never runs on another's time.

* ``original (stand-in)``: :class:`OriginalStandIn`, the operations and costs of
  ``YoutubeFace.__getitem__`` of ControlNet/MARLIN ``dataset/youtube_face.py`` (per clip, no
  batching: the original's own figure). With ``--original=<MARLIN checkout>`` the real one is
  timed too, and the stand-in's calibration (stand-in / real) printed;
* ``make_dataset`` batches (uint8 video + mask, batched) of the ``ytf`` layout (steady state: its
  per-video caches of folder listings and parsing-map coverage filled; and as in the first
  epoch, every clip's video new) and of the ``tfds`` records (JPEG frames, and ``raw frames``:
  the builder's ``raw`` config, pixels decoded at build time) with one decoding thread, then
  with ``--threads`` threads (default: every core) and, with ``--workers``, as that many worker
  processes of one thread each, and with ``--processes N`` as N independent single-thread
  pipelines run at once, one process each (one training process per accelerator). Their split
  lists each video ``--list`` times (same files, same work per clip; see :class:`Listed`).

Prints clips/s, clips/s per core, the ratios to the original per core and the scaling of all
cores over one thread, and (with several threads) that of plain 2.4 MB copies: the memory
bandwidth ceiling of the ``raw`` records. Usage::

    python scripts/bench_data.py [--videos 12] [--frames 48] [--clips 48] [--rounds 3]
        [--batch 8] [--threads N] [--workers N] [--processes N] [--no-tfds]
        [--original /path/to/MARLIN]
        [--only NAME ...]
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
import types
from collections.abc import Iterator

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from marlin_jax.data import default_data_config, make_dataset, make_source  # noqa: E402
from marlin_jax.data.synthetic import write_ytf_layout  # noqa: E402
from marlin_jax.data.tfds_source import DATASET_NAME  # noqa: E402
from marlin_jax.data.ytf import YtfSource  # noqa: E402
from marlin_jax.masking import SEG_GROUPS  # noqa: E402


class OriginalStandIn:
    """The per-clip work of the original ``YoutubeFace.__getitem__`` (fasking), for this benchmark.

    Same operations in the same order, hence the same costs: a pandas row lookup; the crop folder
    listed and sorted per clip; ``torch.randint`` start; a float32 ``(T, 224, 224, 3)`` torch
    video filled frame by frame from ``cv2.imread`` + ``cvtColor`` + ``/ 255`` (float64) ; per
    tubelet slice one ``np.load`` of the int64 ``(1, 224, 224)`` map and, walking the keep queue
    label by label, ``max_pool2d`` of ``(map == label).float()`` OR-ed by ``torch.maximum`` until
    the mean reaches the keep fraction; then the exact-count ``np.random.choice`` drop and the
    ``(C, T, H, W)`` view. Checked against the real code with ``--original``.
    """

    def __init__(self, root: str, clip_frames: int = 16, rate: int = 2, patch: int = 16,
                 tubelet: int = 2, mask_ratio: float = 0.9):
        import pandas as pd

        self.root, self.clip_frames, self.rate = root, clip_frames, rate
        self.patch, self.tubelet, self.keep = patch, tubelet, 1 - mask_ratio
        self.units = 224 // patch
        self.table = pd.read_csv(os.path.join(root, "train_set.csv"))

    def __len__(self) -> int:
        return len(self.table)

    def _slice_cover(self, rel: str, npy_name: str, queue: np.ndarray):
        import torch
        import torch.nn.functional as F

        cover = torch.zeros(self.units, self.units, dtype=torch.float32)
        labels = torch.from_numpy(np.load(os.path.join(
            self.root, "face_parsing_images_DB", rel, npy_name)))
        if labels.shape[0] == 0:
            cover[:] = 1.0
            return cover
        for group in queue:
            for label in SEG_GROUPS[group]:
                pooled = F.max_pool2d((labels == label).float(), kernel_size=self.patch)[0]
                cover = torch.maximum(cover, pooled)
                if cover.mean() >= self.keep:
                    return cover
        return cover

    def __getitem__(self, index: int):
        import torch

        row = self.table.iloc[index]
        crop_dir = os.path.join(self.root, "crop_images_DB", row.path)
        names = sorted(os.listdir(crop_dir))
        first = torch.randint(0, len(names) - self.clip_frames * self.rate + 1, ())
        picks = torch.arange(self.clip_frames) * self.rate + first
        video = torch.zeros(self.clip_frames, 224, 224, 3, dtype=torch.float32)
        slices = torch.zeros(self.clip_frames // self.tubelet, self.units, self.units,
                             dtype=torch.float32)
        queue = np.concatenate([[6, 5], np.random.permutation(5)])
        for t in range(self.clip_frames):
            name = names[picks[t]]
            bgr = cv2.imread(os.path.join(crop_dir, name))
            video[t] = torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) / 255)
            if t % self.tubelet == 0:
                slices[t // self.tubelet] = self._slice_cover(
                    row.path, name.replace(".jpg", ".npy"), queue)
        flat = slices.flatten().bool()
        visible = flat.nonzero().flatten()
        drop = np.random.choice(visible, len(visible) - int(len(flat) * self.keep), replace=False)
        flat[drop] = False
        return video.permute(3, 0, 1, 2), flat


def load_original(marlin_dir: str, root: str):
    """The real ``YoutubeFace`` of a ControlNet/MARLIN checkout, unmodified (``pytorch_lightning``,
    imported by its module but unused by the dataset, is stubbed when not installed)."""
    if importlib.util.find_spec("pytorch_lightning") is None:
        stub = types.ModuleType("pytorch_lightning")
        stub.LightningDataModule = type("LightningDataModule", (), {})
        sys.modules["pytorch_lightning"] = stub
    sys.path.insert(0, os.path.abspath(marlin_dir))
    module = importlib.import_module("dataset.youtube_face")
    return module.YoutubeFace(root, "train", clip_frames=16, temporal_sample_rate=2,
                              patch_size=16, tubelet_size=2, mask_percentage_target=0.9,
                              mask_strategy="fasking")


def per_clip(dataset) -> Iterator[int]:
    """Endless clips of a map-style dataset in shuffled order (1 clip per step)."""
    while True:
        for i in np.random.permutation(len(dataset)):
            video, mask = dataset[int(i)]
            assert tuple(video.shape) == (3, 16, 224, 224) and tuple(mask.shape) == (1568,)
            yield 1


class FirstEpochYtf(YtfSource):
    """The ytf source as in its first epoch: every clip's video is new, so its folder is listed
    and its slice maps are read (the source caches both per video for later epochs)."""

    def __getitem__(self, index: int):
        self._videos.pop(index, None)
        return super().__getitem__(index)


class Listed:
    """A source whose split lists each video ``times`` times (same files, same work per clip).

    grain's global shuffle costs about 16 ms / n per element for a split of n entries (its index
    shuffle cycle-walks a domain of ~2**14): 1.3 ms a clip for 12 videos, an artefact of the tiny
    benchmark split (5 us at YouTube Faces' 3,425 videos) that would otherwise count as loading.
    """

    def __init__(self, source, times: int):
        self.source, self.times, self.has_labels = source, times, source.has_labels

    def __len__(self) -> int:
        return len(self.source) * self.times

    def __getitem__(self, index: int):
        return self.source[index % len(self.source)]

    def __getattr__(self, name: str):  # the source's other methods (e.g. read_positions)
        if name == "source":  # not set yet: while unpickling in a worker process
            raise AttributeError(name)
        return getattr(self.source, name)


def our_batches(root: str, batch: int, threads: int, source: str = "ytf",
                workers: int = 0, first_epoch: bool = False, times: int = 1,
                tfds_name: str = "youtube_faces_marlin") -> tuple[Iterator[int], int]:
    """Endless batches of make_dataset (``batch`` clips per step) and how many clips its
    buffers hold (drained before timing)."""
    c = default_data_config()
    c.source, c.root_dir, c.tfds_data_dir, c.tfds_name = source, root, root, tfds_name
    c.num_threads, c.num_workers = threads, workers
    c.prefetch = 2 if workers else 2 * threads  # with workers: each worker's own buffer
    given = FirstEpochYtf(root, "train") if first_epoch else make_source(c, "train")
    given = Listed(given, times)

    def steps() -> Iterator[int]:
        for b in make_dataset(c, split="train", global_batch_size=batch, source=given):
            assert b["video"].shape == (batch, 16, 224, 224, 3)
            assert b["mask"].shape == (batch, 1568)
            yield batch

    buffered = c.prefetch + workers * (c.prefetch + c.worker_buffer_size)  # batches
    return steps(), 2 * batch * buffered  # drained twice over: steady state for sure


def _one_pipeline(root: str, source: str, tfds_name: str, batch: int, times: int, clips: int,
                  start: float) -> float:
    """One single-thread pipeline in a process of its own: clips per second from ``start`` on."""
    cv2.setNumThreads(1)
    steps, drain = our_batches(root, batch, 1, source, times=times, tfds_name=tfds_name)
    clips_per_second(steps, batch, drain)  # warm-up, then wait for the others
    time.sleep(max(0.0, start - time.time()))
    return clips_per_second(steps, clips, 2 * batch * 2)[0]


def independent_processes(root: str, source: str, tfds_name: str, batch: int, times: int,
                          clips: int, processes: int) -> float:
    """Clips per second of ``processes`` single-thread pipelines run at once, each in its own
    process (no shared interpreter, no shared memory): what one training process per accelerator
    gets from its own pipeline."""
    import multiprocessing

    start = time.time() + 30  # after every process has imported and warmed up
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        rates = pool.starmap(_one_pipeline, [(root, source, tfds_name, batch, times, clips,
                                              start)] * processes)
    return sum(rates)


def process_cpu_seconds() -> float:
    """CPU time of this process's threads and of its live worker processes."""
    total = time.process_time()  # every thread of this process, high resolution
    try:
        import psutil
    except ImportError:  # workers then not seen: only their buffers' fill time goes unwaited
        return total
    for child in psutil.Process().children(recursive=True):
        try:
            ct = child.cpu_times()
            total += ct.user + ct.system
        except psutil.Error:
            pass
    return total


def wait_until_idle(tick: float = 0.1, timeout: float = 60.0) -> None:
    """Returns once the process uses < 5 % of a core: prefetch threads and workers of the other
    loaders have filled their buffers and block."""
    end, last = time.perf_counter() + timeout, process_cpu_seconds()
    while time.perf_counter() < end:
        time.sleep(tick)
        now = process_cpu_seconds()
        if now - last < 0.05 * tick:
            return
        last = now


def clips_per_second(steps: Iterator[int], clips: int, drain: int = 0
                     ) -> tuple[float, float, float]:
    """(clips per wall second, clips per CPU second of the process and its workers, clips per CPU
    second of this process alone)."""
    n = 0
    while n < drain:  # empty the full prefetch buffer first: steady state from here
        n += next(steps)
    t, cpu, main, n = time.perf_counter(), process_cpu_seconds(), time.process_time(), 0
    while n < clips:
        n += next(steps)
    return (n / (time.perf_counter() - t), n / max(process_cpu_seconds() - cpu, 1e-9),
            n / max(time.process_time() - main, 1e-9))


def copies_per_second(threads: int, seconds: float = 1.0) -> float:
    """Copies per second of one clip's bytes (uint8 16x224x224x3, 2.4 MB; ``np.copyto`` releases
    the GIL) by ``threads`` threads, each cycling through its own 64 buffers (past the caches):
    the memory bandwidth ceiling of the ``raw`` records, which copy every clip several times."""
    import threading

    bufs = [[np.ones(16 * 224 * 224 * 3, np.uint8) for _ in range(64)] for _ in range(threads)]
    counts = [0] * threads
    end = time.perf_counter() + seconds

    def work(i: int) -> None:
        while time.perf_counter() < end:
            np.copyto(bufs[i][(counts[i] + 1) % 64], bufs[i][counts[i] % 64])
            counts[i] += 1

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(counts) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=12)
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--clips", type=int, default=48, help="clips timed per loader and round")
    ap.add_argument("--rounds", type=int, default=3,
                    help="loaders are timed in turn this many times; the best round counts")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads of the all-cores rows (default: every core)")
    ap.add_argument("--workers", type=int, default=0,
                    help="also time this many worker processes (data.num_workers, 1 thread each)")
    ap.add_argument("--processes", type=int, default=0,
                    help="also time this many independent single-thread pipelines at once, one "
                         "process each (once, after the rounds)")
    ap.add_argument("--tfds", action=argparse.BooleanOptionalAction, default=True,
                    help="build the youtube_faces_marlin records and time them (default: on)")
    ap.add_argument("--original", default=None, metavar="MARLIN_DIR",
                    help="a ControlNet/MARLIN checkout: also time its YoutubeFace and print the "
                         "stand-in's calibration")
    ap.add_argument("--only", nargs="+", default=None, metavar="NAME",
                    help="time only the loaders whose name contains one of these (and the "
                         "original stand-in), e.g. --only 'raw frames'")
    ap.add_argument("--dir", default=None, help="reuse/write the layout here (default: temp)")
    ap.add_argument("--list", type=int, default=0, metavar="N",
                    help="our pipelines see a split listing each video this many times (same "
                         "files; keeps grain's shuffle cost of tiny splits out; default: enough "
                         "for ~2000 entries)")
    args = ap.parse_args()
    cv2.setNumThreads(1)  # per-core figures: no hidden OpenCV / torch threads on either side
    import torch

    torch.set_num_threads(1)
    cores = args.threads
    times = args.list or max(1, 2000 // args.videos)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or os.path.join(tmp, "ytf")
        if not os.path.isfile(os.path.join(root, "train_set.csv")):
            t = time.perf_counter()
            write_ytf_layout(root, args.videos, num_frames=args.frames, size=224,
                             val_fraction=0.0)
            print(f"wrote {args.videos} videos x {args.frames} frames (224x224 JPEG + int64 "
                  f"npy) in {time.perf_counter() - t:.1f}s to {root}")
        # name -> (steps, clips buffered, cores used)
        loaders: dict[str, tuple[Iterator[int], int, int]] = {
            "original (stand-in), per clip": (per_clip(OriginalStandIn(root)), 0, 1)}
        if args.original:
            loaders["original (real code), per clip"] = (
                per_clip(load_original(args.original, root)), 0, 1)
        loaders["ytf layout (1 thread)"] = (*our_batches(root, args.batch, 1, times=times), 1)
        loaders["ytf layout, 1st epoch (1 thread)"] = (
            *our_batches(root, args.batch, 1, first_epoch=True, times=times), 1)
        tfds_dir = os.path.join(args.dir or tmp, "tfds")
        if args.tfds:
            from marlin_jax.data.tfds_source import build_youtube_faces_marlin

            t = time.perf_counter()
            build_youtube_faces_marlin(root, tfds_dir)
            print(f"built the youtube_faces_marlin records in {time.perf_counter() - t:.1f}s")
            t = time.perf_counter()
            build_youtube_faces_marlin(root, tfds_dir, frame_encoding="raw")
            print(f"built them with raw frames in {time.perf_counter() - t:.1f}s")
            raw = "youtube_faces_marlin/raw"
            loaders["records (1 thread)"] = (
                *our_batches(tfds_dir, args.batch, 1, "tfds", times=times), 1)
            loaders["records, raw frames (1 thread)"] = (
                *our_batches(tfds_dir, args.batch, 1, "tfds", times=times, tfds_name=raw), 1)
        if cores > 1:
            loaders[f"ytf layout ({cores} threads)"] = (
                *our_batches(root, args.batch, cores, times=times), cores)
            if args.tfds:
                loaders[f"records ({cores} threads)"] = (
                    *our_batches(tfds_dir, args.batch, cores, "tfds", times=times), cores)
                loaders[f"records, raw frames ({cores} threads)"] = (*our_batches(
                    tfds_dir, args.batch, cores, "tfds", times=times, tfds_name=raw), cores)
        if args.workers:
            w = args.workers
            loaders[f"ytf layout ({w} workers)"] = (
                *our_batches(root, args.batch, 1, workers=w, times=times), w)
            if args.tfds:
                loaders[f"records ({w} workers)"] = (
                    *our_batches(tfds_dir, args.batch, 1, "tfds", workers=w, times=times), w)
                loaders[f"records, raw frames ({w} workers)"] = (*our_batches(
                    tfds_dir, args.batch, 1, "tfds", workers=w, times=times, tfds_name=raw), w)
        if args.only:
            loaders = {k: v for i, (k, v) in enumerate(loaders.items())
                       if i == 0 or any(s in k for s in args.only)}
        for steps, drain, _ in loaders.values():  # warm-up: imports, files, pools, caches
            clips_per_second(steps, args.batch, drain)
        best = {name: [0.0, 0.0, 0.0] for name in loaders}  # wall, CPU, CPU of this process
        copies = {1: 0.0, cores: 0.0}
        for _ in range(args.rounds):
            if cores > 1:
                for n in copies:
                    wait_until_idle()
                    copies[n] = max(copies[n], copies_per_second(n))
            for name, (steps, drain, _) in loaders.items():
                wait_until_idle()
                best[name] = [max(b, r) for b, r in zip(
                    best[name], clips_per_second(steps, args.clips, drain), strict=True)]
        independent = {}  # kind -> clips/s of args.processes independent pipelines
        kinds = {"ytf layout": (root, "ytf", ""), "records": (tfds_dir, "tfds", DATASET_NAME),
                 "records, raw frames": (tfds_dir, "tfds", f"{DATASET_NAME}/raw")}
        for kind, (where, source, name) in kinds.items() if args.processes else ():
            if f"{kind} (1 thread)" in loaders and (source == "ytf" or args.tfds):
                wait_until_idle()
                independent[kind] = independent_processes(
                    where, source, name, args.batch, times, args.clips, args.processes)

    base_wall, base_cpu, _ = best["original (stand-in), per clip"]
    print(f"best of {args.rounds} interleaved rounds of {args.clips} clips; per core = clips per "
          "CPU second (this process + workers), robust to other load; wall / core = clips per "
          "second / cores used")
    print(f"{'loader':<38}{'clips/s':>9}{'wall/core':>10}{'x orig':>8}{'per core':>10}"
          f"{'x orig':>8}")
    for name, (_, _, used) in loaders.items():
        wall, cpu, _ = best[name]
        print(f"{name:<38}{wall:>9.1f}{wall / used:>10.1f}{wall / used / base_wall:>7.2f}x"
              f"{cpu:>10.1f}{cpu / base_cpu:>7.2f}x")
    if args.original:
        real_wall, real_cpu, _ = best["original (real code), per clip"]
        print(f"stand-in calibration (stand-in / real original): wall {base_wall / real_wall:.2f}, "
              f"CPU {base_cpu / real_cpu:.2f} (target: within 0.90..1.10)")
    for kind in ("ytf layout", "records", "records, raw frames"):
        for many in ([f"{cores} threads"] if cores > 1 else []) + (
                [f"{args.workers} workers"] if args.workers else []):
            if f"{kind} ({many})" in best and f"{kind} (1 thread)" in best:
                print(f"scaling of {kind} (wall): {many} / 1 thread = "
                      f"{best[f'{kind} ({many})'][0] / best[f'{kind} (1 thread)'][0]:.2f}x")
    if cores > 1:
        print(f"memory bandwidth: clip copies (2.4 MB) per second, 1 thread {copies[1]:.0f}, "
              f"{cores} threads {copies[cores]:.0f}: {copies[cores] / copies[1]:.2f}x")
    for name in loaders:
        if name.endswith(" workers)"):  # what limits any number of workers: this process's part
            print(f"{name}: this process's own CPU per clip {1e3 / best[name][2]:.3f} ms (receive, "
                  f"read deferred frames, account): at most ~{best[name][2]:.0f} clips/s with "
                  "any number of workers")
    for kind, rate in independent.items():
        print(f"scaling of {kind} (wall), {args.processes} independent processes of 1 thread: "
              f"{rate:.1f} clips/s = {rate / best[f'{kind} (1 thread)'][0]:.2f}x one thread")
    print("targets: ytf layout >= 2x, records >= 3x the original per core (and > ytf layout); "
          ">= 1.7x scaling on 2 cores")


if __name__ == "__main__":
    main()
