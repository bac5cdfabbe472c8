"""Builds the ``youtube_faces_marlin`` ArrayRecord shards (no TensorFlow needed)::

    python -m marlin_jax.data.youtube_faces_marlin --manual_dir <ytf root> --data_dir <out>
        [--frame_encoding raw]
"""

from __future__ import annotations

import argparse
import logging

from marlin_jax.data.tfds_source import DATASET_NAME, FRAME_ENCODINGS, build_youtube_faces_marlin


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build the youtube_faces_marlin TFDS dataset.")
    ap.add_argument("--manual_dir", required=True,
                    help="YouTube-Faces layout: crop_images_DB/, face_parsing_images_DB/, "
                         "train_set.csv, val_set.csv")
    ap.add_argument("--data_dir", required=True, help="where to write the ArrayRecord shards")
    ap.add_argument("--frame_encoding", choices=FRAME_ENCODINGS, default="jpeg",
                    help="jpeg: the JPEG files' bytes; raw: pixels decoded and resized to 224x224 "
                         "at build time into a flat file per split (~10x the bytes, no decode or "
                         "record per read; read from a local file system)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    build_youtube_faces_marlin(args.manual_dir, args.data_dir, args.frame_encoding)
    print(f"built {DATASET_NAME}/{args.frame_encoding} in {args.data_dir}; train with data_config.source='tfds', "
          f"tfds_data_dir={args.data_dir!r}")


if __name__ == "__main__":
    main()
