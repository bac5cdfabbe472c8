"""The built-in synthetic face videos: exact parsing maps, face geometry, labels, writers."""

from __future__ import annotations

import csv
import itertools
import os

import cv2
import numpy as np
import pytest

from marlin_jax.data.synthetic import (
    CLASS_TO_LABEL,
    LABEL_NAMES,
    render_video,
    write_video_dataset,
    write_ytf_layout,
    ytf_frame_names,
)
from marlin_jax.masking import make_mask
from marlin_jax.video_io import read_frames

SIZE = 96  # small renders keep the tests quick; geometry scales with size


@pytest.fixture(scope="module")
def videos() -> list[dict]:
    return [render_video(i, num_frames=32, size=SIZE) for i in range(24)]


def centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def test_shapes_and_dtypes() -> None:
    v = render_video(0, num_frames=5, size=224)
    assert v["frames"].shape == (5, 224, 224, 3) and v["frames"].dtype == np.uint8
    assert v["parsing"].shape == (5, 224, 224) and v["parsing"].dtype == np.uint8
    assert v["labels"].shape == (3,) and v["labels"].dtype == np.int32
    assert set(np.unique(v["labels"])) <= {0, 1}
    assert v["name"] == "synth_000000"
    assert set(np.unique(v["parsing"])) <= set(range(11))
    assert LABEL_NAMES == ("mouth_open", "eyes_closed", "smiling")


def test_deterministic_and_prefix_stable() -> None:
    a, b = render_video(7, 12, SIZE, seed=3), render_video(7, 12, SIZE, seed=3)
    for key in ("frames", "parsing", "labels"):
        np.testing.assert_array_equal(a[key], b[key])
    longer = render_video(7, 20, SIZE, seed=3)  # frame t does not depend on num_frames
    np.testing.assert_array_equal(longer["frames"][:12], a["frames"])
    np.testing.assert_array_equal(longer["parsing"][:12], a["parsing"])
    assert not np.array_equal(render_video(8, 12, SIZE, seed=3)["frames"], a["frames"])
    assert not np.array_equal(render_video(7, 12, SIZE, seed=4)["frames"], a["frames"])


def test_maps_are_exact(videos) -> None:
    """Outside the background texture a pixel's colour determines its LaPa label, and each
    label's pixels carry the colours of that label only (one colour for flat parts)."""
    for v in videos[:8]:
        for frame, parsing in zip(v["frames"][::5], v["parsing"][::5], strict=True):
            face = parsing != 0
            # left and right parts share a colour; compare them up to the side
            sideless = np.where(np.isin(parsing, (3, 5)), parsing - 1, parsing)
            colour = frame.reshape(-1, 3).astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])
            colour = colour.reshape(parsing.shape)
            pairs = np.unique(np.stack([colour[face], sideless[face]], 1), axis=0)
            assert len(np.unique(pairs[:, 0])) == len(pairs), "a colour appears under two labels"
            for label in (1, 2, 3, 6, 7, 9, 10):
                assert len(np.unique(colour[parsing == label])) <= 1, f"label {label} not flat"
            # the eyes hold sclera / iris / pupil or a closed lid; the inner mouth dark + teeth
            assert len(np.unique(colour[np.isin(parsing, (4, 5))])) <= 3
            assert len(np.unique(colour[parsing == 8])) <= 2


def test_face_layout(videos) -> None:
    """Brows above eyes above nose above mouth, hair at the top, skin around; LaPa's left parts
    (2 brow, 4 eye) on the image's left."""
    for v in videos:
        for parsing in v["parsing"][::4]:
            present = set(np.unique(parsing))
            assert {0, 1, 2, 3, 4, 5, 6, 7, 9, 10} <= present
            brow_y = centroid(np.isin(parsing, (2, 3)))[1]
            eye_y = centroid(np.isin(parsing, (4, 5)))[1]
            nose_y = centroid(parsing == 6)[1]
            mouth_y = centroid(np.isin(parsing, (7, 8, 9)))[1]
            hair_y = centroid(parsing == 10)[1]
            assert hair_y < brow_y < eye_y < nose_y < mouth_y
            assert centroid(parsing == 2)[0] < centroid(parsing == 3)[0]
            assert centroid(parsing == 4)[0] < centroid(parsing == 5)[0]
            upper, lower = centroid(parsing == 7)[1], centroid(parsing == 9)[1]
            assert upper < lower
            if 8 in present:
                assert upper < centroid(parsing == 8)[1] < lower


def test_labels_show_in_the_pixels(videos) -> None:
    by_label = {name: {0: [], 1: []} for name in LABEL_NAMES}
    for v in videos:
        p = v["parsing"]
        mouth_open, eyes_closed, smiling = (int(x) for x in v["labels"])
        # mouth_open: fraction of frames with inner-mouth pixels
        by_label["mouth_open"][mouth_open].append(np.mean([(m == 8).any() for m in p]))
        # eyes_closed: largest eye area relative to the skin area over the clip
        by_label["eyes_closed"][eyes_closed].append(
            max(np.isin(m, (4, 5)).sum() / (m == 1).sum() for m in p)
        )
        # smiling: mouth corners above the middle of the mouth (image y grows downwards)
        offsets = []
        for m in p:
            ys, xs = np.nonzero(np.isin(m, (7, 8, 9)))
            corners = (ys[xs <= xs.min() + 1].mean() + ys[xs >= xs.max() - 1].mean()) / 2
            middle = ys[np.abs(xs - (xs.min() + xs.max()) / 2) <= 1].mean()
            offsets.append((corners - middle) / SIZE)
        by_label["smiling"][smiling].append(np.mean(offsets))
    for name, groups in by_label.items():
        assert groups[0] and groups[1], f"the fixture lacks both values of {name}"
    assert min(by_label["mouth_open"][1]) > 0.6 > 0.3 > max(by_label["mouth_open"][0])
    assert max(by_label["eyes_closed"][1]) < 0.6 * min(by_label["eyes_closed"][0])
    assert max(by_label["smiling"][1]) < -0.015 < min(by_label["smiling"][0])


def test_labels_are_balanced_and_independent() -> None:
    labels = np.stack([render_video(i, 1, 32)["labels"] for i in range(160)])
    assert np.all(np.abs(labels.mean(0) - 0.5) < 0.15)
    combos = {tuple(row) for row in labels.tolist()}
    assert combos == set(itertools.product((0, 1), repeat=3))
    corr = np.corrcoef(labels.T)[np.triu_indices(3, 1)]
    assert np.all(np.abs(corr) < 0.25)


def test_the_head_moves() -> None:
    parsing = render_video(2, 40, SIZE)["parsing"]
    centres = np.array([centroid(m == 6) for m in parsing])
    assert np.ptp(centres, axis=0).max() > 1.0


def test_face_scale_frames_the_face_tighter() -> None:
    """Same video (labels, timing, palette) with a bigger face: the inner parts (brows, eyes,
    nose, lips, mouth) cover about face_scale**2 times the pixels, the background much less."""
    inner = (2, 3, 4, 5, 6, 7, 8, 9)
    for index in range(4):
        base = render_video(index, 4, SIZE)
        np.testing.assert_array_equal(render_video(index, 4, SIZE, face_scale=1.0)["frames"],
                                      base["frames"])
        tight = render_video(index, 4, SIZE, face_scale=1.5)
        np.testing.assert_array_equal(tight["labels"], base["labels"])
        ratio = np.isin(tight["parsing"], inner).sum() / np.isin(base["parsing"], inner).sum()
        assert 1.7 < ratio < 2.6, ratio
        assert (tight["parsing"] == 0).mean() < 0.5 * (base["parsing"] == 0).mean()


def test_strong_cues_make_mouth_and_eye_labels_visible() -> None:
    """Same labels and colours; a mouth_open video shows the inner mouth (LaPa 8) in every
    frame and a closed one never; open eyes (LaPa 4/5) cover more pixels than by default; a
    smile is broader (the lips span more columns), other mouths keep their width."""
    seen, seen_smile = set(), set()
    for index in range(12):
        base = render_video(index, 25, SIZE)
        strong = render_video(index, 25, SIZE, strong_cues=True)
        np.testing.assert_array_equal(strong["labels"], base["labels"])
        mouth_open, eyes_closed, smiling = (bool(v) for v in strong["labels"])
        seen.add(mouth_open)
        mouth_frames = (strong["parsing"] == 8).any(axis=(1, 2)).mean()
        assert mouth_frames == (1.0 if mouth_open else 0.0), (index, mouth_frames)
        if not eyes_closed:
            eyes = lambda v: np.isin(v["parsing"], (4, 5)).sum()  # noqa: E731
            assert eyes(strong) > 1.4 * eyes(base), index
        lip_columns = lambda v: np.isin(v["parsing"][0], (7, 9)).any(axis=0).sum()  # noqa: E731
        if smiling:
            assert lip_columns(strong) > lip_columns(base), index
        else:
            assert lip_columns(strong) == lip_columns(base), index
        seen_smile.add(smiling)
    assert seen == {True, False} and seen_smile == {True, False}


def test_write_video_dataset_round_trip(tmp_path) -> None:
    root = write_video_dataset(tmp_path / "ds", num_videos=3, num_frames=8, size=64, seed=1)
    assert root == tmp_path / "ds"
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", *LABEL_NAMES]
    assert len(rows) == 4
    for index, row in enumerate(rows[1:]):
        v = render_video(index, 8, 64, seed=1)
        assert row == [f"{v['name']}.mp4", *(str(int(x)) for x in v["labels"])]
        frames = read_frames(root / "videos" / row[0])
        assert frames.shape == (8, 64, 64, 3)
        assert np.abs(frames.astype(int) - v["frames"]).mean() < 12  # lossy mp4
        parsing = np.load(root / "parsing" / f"{v['name']}.npy")
        assert parsing.dtype == np.uint8
        np.testing.assert_array_equal(parsing, v["parsing"])
    no_maps = write_video_dataset(tmp_path / "nomaps", 1, num_frames=4, size=64, with_parsing=False)
    assert not (no_maps / "parsing").exists() and (no_maps / "videos" / "synth_000000.mp4").exists()
    tight = write_video_dataset(tmp_path / "tight", 1, num_frames=4, size=64, face_scale=1.5)
    np.testing.assert_array_equal(np.load(tight / "parsing" / "synth_000000.npy"),
                                  render_video(0, 4, 64, face_scale=1.5)["parsing"])


def test_write_ytf_layout_matches_the_original(tmp_path) -> None:
    """Read back the way ControlNet/MARLIN's YoutubeFace does: csv ``path,len``, frames are the
    sorted listing of ``crop_images_DB/<path>``, maps the ``.npy`` of the same name."""
    root = write_ytf_layout(tmp_path / "ytf", num_videos=4, num_frames=12, size=64, seed=2)
    splits = {}
    for split in ("train", "val"):
        with open(root / f"{split}_set.csv", newline="") as f:
            text = f.read()
        lines = text.splitlines()
        assert lines[0] == "path,len"
        splits[split] = [line.split(",") for line in lines[1:]]
    assert [p for p, _ in splits["train"]] == ["Synth_000000/0", "Synth_000000/1", "Synth_000001/0"]
    assert [p for p, _ in splits["val"]] == ["Synth_000001/1"]
    for index, (path, length) in enumerate(splits["train"] + splits["val"]):
        v = render_video(index, 12, 64, seed=2)
        files = sorted(os.listdir(root / "crop_images_DB" / path))  # the original's ordering
        assert len(files) == int(length) == 12
        assert files == [f"{stem}.jpg" for stem in ytf_frame_names(index % 2, 12)]
        for t, name in enumerate(files):
            img = cv2.imread(str(root / "crop_images_DB" / path / name))
            rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
            assert np.abs(rgb.astype(int) - v["frames"][t]).mean() < 6  # JPEG, temporal order
            npy = np.load(root / "face_parsing_images_DB" / path / name.replace(".jpg", ".npy"))
            assert npy.dtype == np.int64 and npy.shape == (1, 64, 64)  # face_parse.py's format
            np.testing.assert_array_equal(npy[0], v["parsing"][t])
    # the original's fasking runs on what was written (16 frames would need len >= 32; use 4)
    files = sorted(os.listdir(root / "crop_images_DB" / "Synth_000000/0"))
    maps = [np.load(root / "face_parsing_images_DB" / "Synth_000000/0" / f.replace(".jpg", ".npy"))
            for f in files[:8]]  # fmt: skip
    mask = make_mask("fasking", 0.75, np.random.default_rng(0), parsing=maps, grid=(4, 4, 4))
    assert mask.sum() == 16


def test_ytf_frame_names_sort_in_time() -> None:
    for n in (5, 999, 1000, 12345):
        names = ytf_frame_names(1, n)
        assert sorted(names) == names and len(set(names)) == n
        assert names[0].startswith("1.")


def test_class_lut_covers_lapa() -> None:
    assert CLASS_TO_LABEL[:11].tolist() == list(range(11))
    assert set(CLASS_TO_LABEL.tolist()) == set(range(11))


def test_bad_input(tmp_path) -> None:
    with pytest.raises(ValueError, match="size must be >= 32"):
        render_video(0, 4, size=16)
    with pytest.raises(ValueError, match="num_frames must be >= 1"):
        render_video(0, 0)
    with pytest.raises(ValueError, match="index and seed must be >= 0"):
        render_video(-1)
    with pytest.raises(ValueError, match="face_scale must be in"):
        render_video(0, 4, size=32, face_scale=0.0)
    with pytest.raises(ValueError, match="num_videos must be >= 1"):
        write_video_dataset(tmp_path, 0)
    with pytest.raises(ValueError, match="val_fraction"):
        write_ytf_layout(tmp_path, 2, val_fraction=1.5)
