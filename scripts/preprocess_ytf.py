"""Preprocess YouTube Faces for MARLIN pretraining, offline.

    python scripts/preprocess_ytf.py --data_dir /data/YouTubeFaces [--workers 16]

Reads ``<data_dir>/frame_images_DB/<person>/<video>/*.jpg`` and writes, as the original MARLIN
``preprocess/ytf_preprocess.py``:

- ``crop_images_DB/<person>/<video>/<frame>.jpg``: 224 x 224 face crops (the original's square
  around the RetinaFace box, temporally smoothed per video, zero-padded at borders);
- ``face_parsing_images_DB/<person>/<video>/<frame>.npy``: uint8 ``(n_faces, 224, 224)`` LaPa
  label maps (n_faces is 1, or 0 where no face was detected in that frame);
- ``train_set.csv`` / ``val_set.csv`` (``path,len``): the original MARLIN split when
  ``--split_dir`` holds its CSVs, else a deterministic by-identity split (``--val_fraction``).

Resumable: videos whose outputs all exist are skipped (``--overwrite`` redoes them). A video that
fails (no face anywhere, unreadable images) is reported at the end and left out of the splits;
the run goes on. The parser used and the crop settings are recorded in
``<data_dir>/.marlin_face_preprocess.json``.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a file from a checkout: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from marlin_jax.face import FaceCropper, FaceParser
from marlin_jax.face.preprocess import preprocess_ytf, summarize


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", required=True, help="folder holding frame_images_DB/")
    p.add_argument("--workers", "--max_workers", type=int, default=os.cpu_count() or 1,
                   help="parallel worker processes (1 = in this process)")
    p.add_argument("--split_dir", default=None,
                   help="folder with the original MARLIN train_set.csv/val_set.csv to reuse")
    p.add_argument("--val_fraction", type=float, default=0.2,
                   help="share of identities held out for val when --split_dir is not given")
    p.add_argument("--margin", type=float, default=0.0,
                   help="extra context per edge, as a fraction of the face square (0 = original)")
    p.add_argument("--smoothing", type=float, default=2.0,
                   help="Gaussian sigma in frames for the box track (0 = per-frame boxes)")
    p.add_argument("--overwrite", action="store_true", help="redo videos already done")
    p.add_argument("--limit", type=int, default=None, help="only the first N videos (testing)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = 1 if args.workers > 1 else 0
    cropper = FaceCropper(margin=args.margin, smoothing=args.smoothing, num_threads=threads)
    parser = FaceParser(num_threads=threads)
    print(f"face parser: {parser.method}; workers: {args.workers}", flush=True)
    results, counts = preprocess_ytf(
        args.data_dir, args.workers, cropper, parser, args.val_fraction, args.split_dir,
        args.overwrite, args.limit,
    )  # fmt: skip
    print(summarize(results, os.path.join(args.data_dir, "preprocess_ytf_report.jsonl")))
    print(f"splits: train_set.csv {counts['train']} videos, val_set.csv {counts['val']} videos")
    return 1 if results and all(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
