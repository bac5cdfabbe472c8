"""tensorflow-datasets builder for the MARLIN YouTube-Faces layout, written without TensorFlow.

The manual download dir is the layout the original preprocessing writes (see
:mod:`marlin_jax.data.ytf`). Each example is **one frame**: its JPEG bytes (exactly the file on
disk, no re-encoding) and what fasking needs of its LaPa parsing map, computed once here: which
labels occur in each 16x16 patch of the map at 224x224 (:func:`marlin_jax.masking.patch_label_bits`,
uint16 little-endian ``(14, 14)``, 392 bytes; all zero where the face parser found no face).
Frames are written in order (``disable_shuffling``) and the videos are indexed in the dataset's
``metadata.json`` (per split: ``[name, first example, num_frames]``), so a 16-frame clip reads its
16 examples and nothing else of the video. Only scalar/bytes ``Tensor`` features are used, so
neither building nor reading imports TensorFlow. Build with::

    builder = Builder(data_dir=..., file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=<ytf root>))

and read with :class:`marlin_jax.data.tfds_source.TfdsSource`. Videos whose folder or a parsing
map is missing or unreadable are skipped and logged.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from marlin_jax.data.records import (
    BadRecordError,
    list_files,
    load_frame_parsing,
    parsing_patch_labels,
)
from marlin_jax.data.ytf import CROP_DIR, PARSING_DIR, read_split_csv

log = logging.getLogger(__name__)

_BYTES = tfds.features.Tensor(shape=(), dtype=np.object_)

IMG_SIZE = 224  # parsing maps are resized (nearest) to this size before patch coverage
PATCH_SIZE = 16  # patch of the stored coverage; the pipeline's img_size / patch_size must match


class Builder(tfds.core.GeneratorBasedBuilder):
    """YouTube-Faces crops + LaPa patch coverage of the MARLIN preprocessing, one frame per
    example, videos indexed in the metadata."""

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
        "1.0.0": "JPEG frames and PNG parsing maps per video.",
        "2.0.0": "One example per frame (JPEG bytes + 16x16-patch LaPa label bits at 224x224), "
                 "frames in order, videos indexed in metadata.json: a clip reads only its frames.",
    }
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
                "YouTube Faces face crops with per-frame LaPa face-parsing patch coverage, as "
                "prepared for MARLIN pretraining; one example per frame. jpeg: JPEG bytes; "
                "patch_labels: uint16 little-endian (14, 14) bit sets of the LaPa labels in each "
                "16x16 patch of the 224x224 map (all zero = no face). metadata.json indexes the "
                "videos of each split: [name, first example, num_frames]."
            ),
            features=tfds.features.FeaturesDict({
                "video": tfds.features.Scalar(dtype=np.int32),  # video number in the split
                "frame": tfds.features.Scalar(dtype=np.int32),  # frame number in the video
                "jpeg": _BYTES,
                "patch_labels": _BYTES,
            }),
            metadata=tfds.core.MetadataDict(img_size=IMG_SIZE, patch_size=PATCH_SIZE),
            disable_shuffling=True,  # frames of a video stay contiguous and in order
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
        """Frames in order with integer keys; fills ``metadata[f"{split}_videos"]``."""
        videos: list[list] = []
        self.info.metadata[f"{split}_videos"] = videos  # saved after generation
        skipped, key = 0, 0
        for rel, _ in read_split_csv(root, split):
            try:
                jpegs, bits = _video_frames(root, rel)  # all checked before any frame is written
            except BadRecordError as e:
                skipped += 1
                log.warning("youtube_faces_marlin: skipping video %s: %s", rel, e)
                continue
            videos.append([rel, key, len(jpegs)])
            for frame, (jpeg, b) in enumerate(zip(jpegs, bits, strict=True)):
                yield key, {"video": len(videos) - 1, "frame": frame, "jpeg": jpeg,
                            "patch_labels": b.astype("<u2").tobytes()}
                key += 1
        if skipped:
            log.warning("youtube_faces_marlin/%s: skipped %d unreadable videos", split, skipped)


def _video_frames(root: str, rel: str) -> tuple[list[bytes], np.ndarray]:
    """JPEG bytes of every frame of one video folder and the patch coverage of its parsing maps
    (uint16 ``(num_frames, 14, 14)``)."""
    crop_dir = os.path.join(root, CROP_DIR, rel)
    files = list_files(crop_dir, ".jpg")
    if not files:
        raise BadRecordError(f"{crop_dir}: no .jpg frames")
    jpegs, maps = [], []
    for name in files:
        try:
            with open(os.path.join(crop_dir, name), "rb") as f:
                jpegs.append(f.read())
        except OSError as e:
            raise BadRecordError(f"{os.path.join(crop_dir, name)}: cannot read ({e})") from e
        maps.append(load_frame_parsing(
            os.path.join(root, PARSING_DIR, rel, os.path.splitext(name)[0] + ".npy")))
    return jpegs, parsing_patch_labels(maps, IMG_SIZE, PATCH_SIZE)
