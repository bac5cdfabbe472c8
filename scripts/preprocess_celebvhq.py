"""Crop CelebV-HQ videos for MARLIN fine-tuning/evaluation, offline.

    python scripts/preprocess_celebvhq.py --data_dir /data/CelebV-HQ [--workers 16]

Reads ``<data_dir>/downloaded/*.mp4`` and writes, as the original MARLIN
``preprocess/celebvhq_preprocess.py``:

- ``cropped/<name>.mp4``: 224 x 224 face crops at the source fps (mp4v), the original's square
  around the RetinaFace box, temporally smoothed, zero-padded at borders;
- ``train.txt`` / ``val.txt`` / ``test.txt``: 80/10/10 of the cropped videos (names without
  ``.mp4``), over the sorted names (the original used directory order). Existing split files are
  kept, as the original does, unless ``--overwrite``.

Resumable: videos already in ``cropped/`` are skipped. A video that fails (corrupt file, no face
anywhere) is reported at the end and gets no crop (so it is not in the splits); the run goes on.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a file from a checkout: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from marlin_jax.face import FaceCropper
from marlin_jax.face.preprocess import preprocess_celebvhq, summarize


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", required=True, help="CelebV-HQ root holding downloaded/")
    p.add_argument("--workers", "--max_workers", type=int, default=os.cpu_count() or 1,
                   help="parallel worker processes (1 = in this process)")
    p.add_argument("--margin", type=float, default=0.0,
                   help="extra context per edge, as a fraction of the face square (0 = original)")
    p.add_argument("--smoothing", type=float, default=2.0,
                   help="Gaussian sigma in frames for the box track (0 = per-frame boxes)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo videos already cropped and rewrite the split files")
    p.add_argument("--limit", type=int, default=None, help="only the first N videos (testing)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = 1 if args.workers > 1 else 0
    cropper = FaceCropper(margin=args.margin, smoothing=args.smoothing, num_threads=threads)
    results, counts = preprocess_celebvhq(
        args.data_dir, args.workers, cropper, args.overwrite, args.limit
    )
    print(summarize(results, os.path.join(args.data_dir, "preprocess_celebvhq_report.jsonl")))
    if counts is None:
        print("splits: existing train.txt/val.txt/test.txt kept (--overwrite rewrites them)")
    else:
        print("splits: " + ", ".join(f"{k}.txt {v} videos" for k, v in counts.items()))
    return 1 if results and all(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
