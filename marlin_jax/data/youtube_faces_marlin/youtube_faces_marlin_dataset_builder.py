"""tensorflow-datasets builder for the MARLIN YouTube-Faces layout, written without TensorFlow.

The manual dir is the layout the original preprocessing writes (:mod:`marlin_jax.data.ytf`). Each
example is **one frame**: its LaPa parsing map's patch coverage
(:func:`marlin_jax.masking.patch_label_bits` at 224x224, uint16 little-endian ``(14, 14)``, all
zero = no face) and, with config ``jpeg`` (the default), its JPEG file's bytes. With config ``raw``
the pixels, decoded and resized to 224x224 here (what a read of the ``jpeg`` build gives the
pipeline), go to a flat file per split beside the shards, ``<split>.frames`` (uint8
``(examples, 224, 224, 3)`` in example order, no header), and the coverage to
``<split>.patch_labels`` too: a frame is then one positional read straight into the clip, with no
record to read or parse. Frames are written in order and the videos indexed in ``metadata.json``
(per split: ``[name, first example, num_frames]``), so a clip reads its frames and nothing else.
Read with :class:`marlin_jax.data.tfds_source.TfdsSource`; build with
:func:`~marlin_jax.data.tfds_source.build_youtube_faces_marlin`. Videos whose folder or a parsing
map is unreadable are skipped and logged.
"""

from __future__ import annotations

import contextlib
import logging
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from marlin_jax.data.records import (
    BadRecordError,
    decode_frames,
    list_files,
    load_frame_parsing,
    parsing_patch_labels,
    read_bytes,
    resize_frames,
)
from marlin_jax.data.ytf import CROP_DIR, PARSING_DIR, read_split_csv

log = logging.getLogger(__name__)

_BYTES = tfds.features.Tensor(shape=(), dtype=np.object_)

IMG_SIZE = 224  # parsing maps are resized (nearest) to this size before patch coverage
PATCH_SIZE = 16  # patch of the stored coverage; the pipeline's img_size / patch_size must match


def raw_file_names(split: str) -> tuple[str, str]:
    """The raw config's flat files of ``split`` in the build's folder: pixels (uint8
    ``(examples, 224, 224, 3)``) and patch coverage (uint16 little-endian ``(examples, 14, 14)``),
    in example order, no header."""
    return f"{split}.frames", f"{split}.patch_labels"


class Builder(tfds.core.GeneratorBasedBuilder):
    """YouTube-Faces crops + LaPa patch coverage of the MARLIN preprocessing, one frame per
    example, videos indexed in the metadata."""

    VERSION = tfds.core.Version("2.1.0")
    RELEASE_NOTES = {
        "1.0.0": "JPEG frames and PNG parsing maps per video.",
        "2.0.0": "One example per frame (JPEG bytes + 16x16-patch LaPa label bits at 224x224), "
                 "frames in order, videos indexed in metadata.json: a clip reads only its frames.",
        "2.1.0": "Configs jpeg (default, as 2.0.0) and raw (frames decoded and resized to 224x224 "
                 "at build time); metadata.json records frame_encoding.",
    }
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="jpeg", description="frames as their JPEG files' bytes"),
        tfds.core.BuilderConfig(name="raw", version="2.2.0", release_notes={
            "2.2.0": "Pixels (and a copy of the patch coverage) in flat <split>.frames / "
                     "<split>.patch_labels files beside the shards (a frame is one positional "
                     "read), examples without pixels; 2.1.0 held them in the examples."},
            description=(f"frames decoded and resized to {IMG_SIZE}x{IMG_SIZE} at build time, "
                         f"uint8 ({IMG_SIZE}, {IMG_SIZE}, 3) in <split>.frames "
                         f"({IMG_SIZE * IMG_SIZE * 3} bytes a frame, in example order)")),
    ]
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
        encoding = self.builder_config.name
        features = {
            "video": tfds.features.Scalar(dtype=np.int32),  # video number in the split
            "frame": tfds.features.Scalar(dtype=np.int32),  # frame number in the video
            "patch_labels": _BYTES,
        }
        if encoding == "jpeg":
            features["jpeg"] = _BYTES
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "YouTube Faces face crops as prepared for MARLIN pretraining, one example per "
                "frame: patch_labels (uint16 little-endian (14, 14) bit sets of the LaPa labels in "
                "each 16x16 patch of the 224x224 parsing map, all zero = no face) and jpeg (JPEG "
                f"bytes); config raw: no jpeg, the pixels as uint8 ({IMG_SIZE}, {IMG_SIZE}, 3) in "
                "<split>.frames, in example order. metadata.json indexes each split's videos: "
                "[name, first example, num_frames]."
            ),
            features=tfds.features.FeaturesDict(features),
            metadata=tfds.core.MetadataDict(img_size=IMG_SIZE, patch_size=PATCH_SIZE,
                                            frame_encoding=encoding),
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
            if os.path.isfile(os.path.join(root, f"{split}_set.csv")) and read_split_csv(root, split):
                splits[split] = self._generate_examples(root, split)
        if not splits:
            raise FileNotFoundError(f"{root}: no non-empty train_set.csv or val_set.csv in the "
                                    "manual dir")
        return splits

    def _generate_examples(self, root: str, split: str):
        """Frames in order with integer keys; fills ``metadata[f"{split}_videos"]``; with config
        raw writes each frame's pixels and coverage to the split's flat files as its example is
        generated (tfds writes examples in key order here: ``disable_shuffling``)."""
        videos: list[list] = []
        self.info.metadata[f"{split}_videos"] = videos  # saved after generation
        raw = self.builder_config.name == "raw"
        skipped, key = 0, 0
        # the build's temporary folder, renamed into place with the shards when the build succeeds
        with contextlib.ExitStack() as files:
            if raw:
                pixels, coverage = (files.enter_context(open(os.path.join(self.data_dir, n), "wb"))
                                    for n in raw_file_names(split))
            for rel, _ in read_split_csv(root, split):
                try:
                    frames, bits = _video_frames(root, rel, raw)
                except BadRecordError as e:
                    skipped += 1
                    log.warning("youtube_faces_marlin: skipping video %s: %s", rel, e)
                    continue
                videos.append([rel, key, len(frames)])
                for frame, (data, b) in enumerate(zip(frames, bits, strict=True)):
                    example = {"video": len(videos) - 1, "frame": frame,
                               "patch_labels": b.astype("<u2").tobytes()}
                    if raw:
                        if pixels.tell() != key * len(data):
                            raise RuntimeError(f"{pixels.name}: at byte {pixels.tell()} for "
                                               f"example {key}: examples not generated in order")
                        pixels.write(data)
                        coverage.write(example["patch_labels"])
                    else:
                        example["jpeg"] = data
                    yield key, example
                    key += 1
        if skipped:
            log.warning("youtube_faces_marlin/%s: skipped %d unreadable videos", split, skipped)


def _video_frames(root: str, rel: str, raw: bool) -> tuple[list[bytes], np.ndarray]:
    """Every frame of one video folder (JPEG bytes, or with ``raw`` the uint8 ``(224, 224, 3)``
    pixels' bytes) and the patch coverage of its parsing maps (uint16 ``(num_frames, 14, 14)``);
    all read and checked before any frame is written."""
    crop_dir = os.path.join(root, CROP_DIR, rel)
    files = list_files(crop_dir, ".jpg")
    if not files:
        raise BadRecordError(f"{crop_dir}: no .jpg frames")
    jpegs = [read_bytes(os.path.join(crop_dir, name)) for name in files]
    maps = [load_frame_parsing(os.path.join(root, PARSING_DIR, rel, os.path.splitext(n)[0] + ".npy"))
            for n in files]
    if raw:  # exactly what a read of the jpeg build hands the pipeline (decode, then resize)
        frames = resize_frames(decode_frames(jpegs, [os.path.join(crop_dir, n) for n in files]),
                               IMG_SIZE)
        jpegs = [f.tobytes() for f in frames]
    return jpegs, parsing_patch_labels(maps, IMG_SIZE, PATCH_SIZE)
