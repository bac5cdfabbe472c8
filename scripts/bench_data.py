"""Benchmark: clips/s per core of the grain pipeline vs the original MARLIN recipe on the YouTube-
Faces layout with fasking.

Writes a realistic layout first (224x224 JPEG crops of the synthetic faces, int64 (1, 224, 224)
parsing ``.npy`` per frame, exactly what the original preprocessing writes), then times, in the
same run and on the same files:

* baseline: a straightforward per-sample PyTorch ``Dataset`` + ``DataLoader`` written to the
  original ``YoutubeFace`` recipe (``cv2.imread`` each frame into a float tensor / 255,
  ``np.load`` each slice's map and ``max_pool2d`` per LaPa component, exact-count drop with
  ``np.random.choice``), one process;
* ours: :func:`marlin_jax.data.make_dataset` (uint8 batches, vectorised fasking) with one thread,
  and with every core as threads.

Prints clips/s, clips/s per core and the ratio. Usage::

    python scripts/bench_data.py [--videos 16] [--frames 48] [--clips 96] [--batch 8] [--tfds]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from marlin_jax.data import default_data_config, make_dataset  # noqa: E402
from marlin_jax.data.synthetic import write_ytf_layout  # noqa: E402

SEG_GROUPS = [[2, 4], [3, 5], [6], [7, 8, 9], [10], [1], [0]]


def original_recipe_dataset(root: str, clip_frames: int = 16, rate: int = 2, patch: int = 16,
                            tubelet: int = 2, mask_ratio: float = 0.9):
    """A torch Dataset following the original YoutubeFace.__getitem__ step by step."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import Dataset

    keep = 1 - mask_ratio
    units = 224 // patch

    class OriginalRecipe(Dataset):
        def __init__(self):
            with open(os.path.join(root, "train_set.csv"), newline="") as f:
                self.paths = [row["path"] for row in csv.DictReader(f)]

        def __len__(self):
            return len(self.paths)

        def _slice_mask(self, rel, npy_name, queue):
            visible = torch.zeros(units, units)
            parsing = torch.from_numpy(np.load(os.path.join(
                root, "face_parsing_images_DB", rel, npy_name)))
            if parsing.shape[0] == 0:
                return torch.ones(units, units)
            for group in queue:
                for label in SEG_GROUPS[group]:
                    pooled = F.max_pool2d((parsing == label).float(), kernel_size=patch)[0]
                    visible = torch.maximum(visible, pooled)
                    if visible.mean() >= keep:
                        return visible
            return visible

        def __getitem__(self, index):
            rel = self.paths[index]
            crop = os.path.join(root, "crop_images_DB", rel)
            files = sorted(os.listdir(crop))
            start = int(torch.randint(0, len(files) - clip_frames * rate + 1, ()))
            idx = torch.arange(clip_frames) * rate + start
            video = torch.zeros(clip_frames, 224, 224, 3)
            masks = torch.zeros(clip_frames // tubelet, units, units)
            queue = np.concatenate([[6, 5], np.random.permutation(5)])
            for i in range(clip_frames):
                img = cv2.imread(os.path.join(crop, files[idx[i]]))
                video[i] = torch.from_numpy(cv2.cvtColor(img, cv2.COLOR_BGR2RGB) / 255)
                if i % tubelet == 0:
                    masks[i // tubelet] = self._slice_mask(
                        rel, files[idx[i]].replace(".jpg", ".npy"), queue)
            masks = masks.flatten().bool()
            target = int(len(masks) * keep)
            vis = masks.nonzero().flatten()
            masks[np.random.choice(vis, len(vis) - target, replace=False)] = False
            return video.permute(3, 0, 1, 2), masks

    return OriginalRecipe()


def baseline_batches(root: str, batch: int):
    """Endless batches of the original recipe: torch DataLoader, one process, one thread."""
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    loader = DataLoader(original_recipe_dataset(root), batch_size=batch, shuffle=True,
                        num_workers=0)
    while True:
        for video, mask in loader:
            assert video.shape == (batch, 3, 16, 224, 224) and mask.shape == (batch, 1568)
            yield video


def our_batches(root: str, batch: int, threads: int, source: str = "ytf"):
    """Endless batches of make_dataset with ``threads`` decoding threads."""
    c = default_data_config()
    c.source, c.root_dir, c.tfds_data_dir = source, root, root
    c.num_threads, c.prefetch = threads, 2 * threads
    for b in make_dataset(c, split="train", global_batch_size=batch):
        assert b["video"].shape == (batch, 16, 224, 224, 3) and b["mask"].shape == (batch, 1568)
        yield b


def clips_per_second(batches, clips: int, batch: int) -> float:
    t = time.perf_counter()
    for _ in range(clips // batch):
        next(batches)
    return (clips // batch) * batch / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=16)
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--clips", type=int, default=48, help="clips timed per loader and round")
    ap.add_argument("--rounds", type=int, default=3,
                    help="loaders are timed in turn this many times; the best round counts "
                         "(robust to other load on a shared machine)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tfds", action="store_true",
                    help="also build the youtube_faces_marlin ArrayRecord shards and time them")
    ap.add_argument("--dir", default=None, help="reuse/write the layout here (default: temp)")
    args = ap.parse_args()
    cv2.setNumThreads(1)  # per-core figures: no hidden OpenCV threads on either side
    cores = os.cpu_count() or 1

    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or os.path.join(tmp, "ytf")
        if not os.path.isfile(os.path.join(root, "train_set.csv")):
            t = time.perf_counter()
            write_ytf_layout(root, args.videos, num_frames=args.frames, size=224,
                             val_fraction=0.0)
            print(f"wrote {args.videos} videos x {args.frames} frames (224x224 JPEG + int64 "
                  f"npy) in {time.perf_counter() - t:.1f}s to {root}")
        loaders = {
            "original recipe (torch DataLoader, 1 core)": (baseline_batches(root, args.batch), 1),
            "marlin_jax grain pipeline (1 thread)": (our_batches(root, args.batch, 1), 1),
            f"marlin_jax grain pipeline ({cores} threads)":
                (our_batches(root, args.batch, cores), cores),
        }
        if args.tfds:
            from marlin_jax.data.tfds_source import build_youtube_faces_marlin

            tfds_dir = os.path.join(tmp, "tfds")
            build_youtube_faces_marlin(root, tfds_dir)
            loaders["marlin_jax grain pipeline, TFDS (1 thread)"] = (
                our_batches(tfds_dir, args.batch, 1, source="tfds"), 1)
        for batches, _ in loaders.values():
            next(batches)  # warm-up: imports, first files, thread pools
        best = dict.fromkeys(loaders, 0.0)
        for _ in range(args.rounds):
            for name, (batches, _) in loaders.items():
                best[name] = max(best[name], clips_per_second(batches, args.clips, args.batch))

    header = f"loader (best of {args.rounds} rounds)"
    print(f"{header:<44}{'clips/s':>10}{'clips/s/core':>14}")
    for name, (_, used) in loaders.items():
        print(f"{name:<44}{best[name]:>10.1f}{best[name] / used:>14.1f}")
    names = list(loaders)
    ratio = best[names[1]] / best[names[0]]
    print(f"ratio per core (ours 1 thread / original): {ratio:.2f}x  (target >= 2x)")


if __name__ == "__main__":
    main()
