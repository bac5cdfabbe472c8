"""tensorflow-datasets builder for the MARLIN YouTube-Faces layout, written without TensorFlow.

The manual download dir is the layout the original preprocessing writes (see
:mod:`marlin_jax.data.ytf`). Each example is one video: its JPEG frames as pre-encoded bytes
(exactly the files on disk, no re-encoding) and its per-frame parsing maps as lossless PNG bytes
(``b""`` where the face parser found no face). Only scalar/bytes ``Tensor`` features are used, so
neither building nor reading imports TensorFlow. Build with::

    builder = Builder(data_dir=..., file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=<ytf root>))

and read with ``tfds.data_source("youtube_faces_marlin", data_dir=..., split="train")``.
Videos whose folder or a parsing map is missing or unreadable are skipped and logged.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from marlin_jax.data.records import (
    BadRecordError,
    encode_parsing_png,
    list_files,
    load_frame_parsing,
)
from marlin_jax.data.ytf import CROP_DIR, PARSING_DIR, read_split_csv

log = logging.getLogger(__name__)

_BYTES = tfds.features.Tensor(shape=(), dtype=np.object_)


class Builder(tfds.core.GeneratorBasedBuilder):
    """YouTube-Faces crops + LaPa parsing maps of the MARLIN preprocessing, one video per example."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "JPEG frames and PNG parsing maps per video."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Run the MARLIN YouTube-Faces preprocessing, then pass its output folder (holding "
        f"{CROP_DIR}/, {PARSING_DIR}/, train_set.csv, val_set.csv) as the manual dir."
    )

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds' default probes importlib_resources (absent here, and not a tfds requirement)
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "YouTube Faces face crops with per-frame LaPa face-parsing maps, as prepared for "
                "MARLIN pretraining. frames: JPEG bytes; parsing: PNG bytes (b'' = no face)."
            ),
            features=tfds.features.FeaturesDict({
                "name": tfds.features.Text(),
                "num_frames": tfds.features.Scalar(dtype=np.int32),
                "frames": tfds.features.Sequence(_BYTES),
                "parsing": tfds.features.Sequence(_BYTES),
            }),
            homepage="https://github.com/ControlNet/MARLIN",
            citation=(
                "@inproceedings{cai2022marlin, title={MARLIN: Masked Autoencoder for facial video "
                "Representation LearnINg}, author={Cai, Zhixi and Ghosh, Shreya and Stefanov, "
                "Kalin and Dhall, Abhinav and Cai, Jianfei and Rezatofighi, Hamid and Haffari, "
                "Reza and Hayat, Munawar}, booktitle={CVPR}, year={2023}}"
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = os.fspath(dl_manager.manual_dir)
        splits = {}
        for split in ("train", "val"):  # absent or empty split files give no split
            if os.path.isfile(os.path.join(root, f"{split}_set.csv")) and read_split_csv(
                    root, split):
                splits[split] = self._generate_examples(root, split)
        if not splits:
            raise FileNotFoundError(f"{root}: no non-empty train_set.csv or val_set.csv in the "
                                    "manual dir")
        return splits

    def _generate_examples(self, root: str, split: str):
        skipped = 0
        for rel, _ in read_split_csv(root, split):
            try:
                example = _video_example(root, rel)
            except BadRecordError as e:
                skipped += 1
                log.warning("youtube_faces_marlin: skipping video %s: %s", rel, e)
                continue
            yield rel, example
        if skipped:
            log.warning("youtube_faces_marlin/%s: skipped %d unreadable videos", split, skipped)


def _video_example(root: str, rel: str) -> dict:
    """All frames (JPEG bytes) and parsing maps (PNG bytes) of one video folder."""
    crop_dir = os.path.join(root, CROP_DIR, rel)
    files = list_files(crop_dir, ".jpg")
    if not files:
        raise BadRecordError(f"{crop_dir}: no .jpg frames")
    frames, parsing = [], []
    for name in files:
        try:
            with open(os.path.join(crop_dir, name), "rb") as f:
                frames.append(f.read())
        except OSError as e:
            raise BadRecordError(f"{os.path.join(crop_dir, name)}: cannot read ({e})") from e
        npy = os.path.join(root, PARSING_DIR, rel, os.path.splitext(name)[0] + ".npy")
        parsing.append(encode_parsing_png(load_frame_parsing(npy)))
    return {"name": rel, "num_frames": len(files), "frames": frames, "parsing": parsing}
