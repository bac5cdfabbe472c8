"""Sources on data the tests write: YouTube-Faces layout, its TFDS build, video files, synthetic,
and the sample videos; plus temporal sampling and the record helpers."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marlin_jax.data.records import (
    BadRecordError,
    decode_jpeg,
    load_frame_parsing,
    parsing_patch_labels,
    sample_frame_indices,
)
from marlin_jax.data.videos import VideoFileSource, read_video_frames
from marlin_jax.data.ytf import YtfSource
from marlin_jax.video_io import read_frames, write_video

ROOT = Path(__file__).resolve().parent.parent


def frame_image(video: int, frame: int, size: int) -> np.ndarray:
    """A JPEG-robust test frame: flat colour encoding (video, frame), uint8 (size, size, 3) RGB."""
    img = np.empty((size, size, 3), np.uint8)
    img[..., 0] = 7 * frame % 256
    img[..., 1] = 16 * video % 256
    img[..., 2] = 128
    return img


def parsing_map(size: int, shift: int = 0) -> np.ndarray:
    """A LaPa-like map: background border, skin oval, eyes, nose, mouth, hair. uint8 (H, W)."""
    yy, xx = np.mgrid[:size, :size] / size
    m = np.zeros((size, size), np.uint8)
    m[((yy - 0.5) ** 2 + (xx - 0.5) ** 2) < 0.16] = 1
    m[yy < 0.15] = 10
    m[(np.abs(yy - 0.4) < 0.05) & (np.abs(xx - 0.35) < 0.07)] = 4
    m[(np.abs(yy - 0.4) < 0.05) & (np.abs(xx - 0.65) < 0.07)] = 5
    m[(np.abs(yy - 0.55) < 0.06) & (np.abs(xx - 0.5) < 0.04)] = 6
    m[(np.abs(yy - 0.72 - 0.01 * shift) < 0.04) & (np.abs(xx - 0.5) < 0.12)] = 8
    return m


def write_ytf_tree(root: Path, lengths: dict[str, int], size: int = 64,
                   split: str = "train") -> Path:
    """The original MARLIN layout: crop_images_DB/<p>/<i>/%d.jpg, face_parsing_images_DB/.../
    %d.npy as int64 (1, H, W) (the face parser's format), <split>_set.csv with path,len."""
    rows = ["path,len"]
    for v, (rel, n) in enumerate(lengths.items()):
        cdir, pdir = root / "crop_images_DB" / rel, root / "face_parsing_images_DB" / rel
        cdir.mkdir(parents=True, exist_ok=True)
        pdir.mkdir(parents=True, exist_ok=True)
        for f in range(n):
            # zero-padded like the original frame names so sorted order is frame order
            bgr = cv2.cvtColor(frame_image(v, f, size), cv2.COLOR_RGB2BGR)
            cv2.imwrite(str(cdir / f"{f:04d}.jpg"), bgr)
            np.save(pdir / f"{f:04d}.npy", parsing_map(size, f)[None].astype(np.int64))
        rows.append(f"{rel},{n}")
    (root / f"{split}_set.csv").write_text("\n".join(rows) + "\n")
    return root


# --------------------------------------------------------------------------- temporal sampling


@pytest.mark.parametrize(
    "n, expect_stride",
    [(100, 2), (32, 2), (31, 1), (20, 1), (17, 1)],
)
def test_sample_frame_indices_stride(n, expect_stride):
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = sample_frame_indices(n, 16, 2, rng)
        assert idx.shape == (16,)
        assert (np.diff(idx) == expect_stride).all()
        assert idx[0] >= 0 and idx[-1] < n


def test_sample_frame_indices_pads_short_videos_with_last_frame():
    idx = sample_frame_indices(5, 16, 2, np.random.default_rng(0))
    np.testing.assert_array_equal(idx, [0, 1, 2, 3, 4] + [4] * 11)
    np.testing.assert_array_equal(sample_frame_indices(16, 16, 2, np.random.default_rng(0)),
                                  np.arange(16))


def test_sample_frame_indices_start_is_uniform_over_valid_range():
    rng = np.random.default_rng(1)
    starts = {int(sample_frame_indices(40, 16, 2, rng)[0]) for _ in range(400)}
    assert starts == set(range(40 - 32 + 1))  # torch.randint(0, total - 32 + 1) in the original


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), clip=st.sampled_from([1, 4, 8, 16]), rate=st.integers(1, 4),
       seed=st.integers(0, 2**32 - 1))
def test_sample_frame_indices_properties(n, clip, rate, seed):
    idx = sample_frame_indices(n, clip, rate, np.random.default_rng(seed))
    assert idx.shape == (clip,) and idx.min() >= 0 and idx.max() < n
    steps = np.diff(idx)
    if n <= clip:  # padded: 0, 1, ..., n - 1, then the last frame repeated
        np.testing.assert_array_equal(idx, np.minimum(np.arange(clip), n - 1))
    else:  # one constant stride: the configured one, or n // clip when too short for it
        assert (steps == (rate if n >= clip * rate else n // clip)).all()


# --------------------------------------------------------------------------- record helpers


def test_load_frame_parsing_formats(tmp_path):
    m = parsing_map(32)
    np.save(tmp_path / "faces.npy", np.stack([m, 10 - m]).astype(np.int64))
    np.save(tmp_path / "plain.npy", m)
    np.save(tmp_path / "noface.npy", np.zeros((0, 32, 32), np.int64))
    np.save(tmp_path / "float.npy", m.astype(np.float32))
    (tmp_path / "corrupt.npy").write_bytes(b"\x93NUMPY garbage")
    np.testing.assert_array_equal(load_frame_parsing(str(tmp_path / "faces.npy")), m)
    np.testing.assert_array_equal(load_frame_parsing(str(tmp_path / "plain.npy")), m)
    assert load_frame_parsing(str(tmp_path / "noface.npy")).size == 0
    for bad, msg in [("float.npy", "integer"), ("corrupt.npy", "corrupt"),
                     ("missing.npy", "not found")]:
        with pytest.raises(BadRecordError, match=msg) as e:
            load_frame_parsing(str(tmp_path / bad))
        assert bad in str(e.value)


# --------------------------------------------------------------------------- YouTube-Faces layout


@pytest.fixture
def ytf_root(tmp_path):
    return write_ytf_tree(tmp_path / "ytf", {"Ann/0": 40, "Ann/1": 33, "Bob/2": 12})


def test_ytf_source_reads_frames_and_first_face_parsing(ytf_root):
    src = YtfSource(str(ytf_root), "train")
    assert len(src) == 3 and not src.has_labels
    rec = src[1]
    assert rec.name == "Ann/1" and rec.num_frames == 33
    frames = rec.read_frames([0, 5, 5, 32])
    assert frames.shape == (4, 64, 64, 3) and frames.dtype == np.uint8
    want = cv2.cvtColor(cv2.imread(str(ytf_root / "crop_images_DB/Ann/1/0005.jpg")),
                        cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(frames[1], want)
    np.testing.assert_array_equal(frames[1], frames[2])
    assert abs(int(frames[3, ..., 0].mean()) - 7 * 32) <= 3  # frame index encoded in red
    parsing = rec.read_parsing([3])
    np.testing.assert_array_equal(parsing[0], parsing_map(64, 3))


def test_ytf_source_errors_name_the_file(ytf_root):
    with pytest.raises(FileNotFoundError, match="val_set.csv"):
        YtfSource(str(ytf_root), "val")
    (ytf_root / "crop_images_DB/Ann/0/0002.jpg").write_bytes(b"\xff\xd8 truncated")
    rec = YtfSource(str(ytf_root), "train")[0]
    with pytest.raises(BadRecordError, match="Ann/0/0002.jpg"):
        rec.read_frames([1, 2])
    os.remove(ytf_root / "face_parsing_images_DB/Ann/0/0004.npy")
    with pytest.raises(BadRecordError, match="Ann/0/0004.npy: parsing map not found"):
        rec.read_parsing([4])
    (ytf_root / "train_set.csv").write_text("path,len\nAnn/0,40\nNobody/9,50\n")
    with pytest.raises(BadRecordError, match="Nobody/9"):
        YtfSource(str(ytf_root), "train")[1]


# --------------------------------------------------------------------------- TFDS / ArrayRecord

_TFDS_SCRIPT = """
import sys
from marlin_jax.data.tfds_source import TfdsSource, build_youtube_faces_marlin
build_youtube_faces_marlin(sys.argv[1], sys.argv[2])
src = TfdsSource(sys.argv[2], "train")
print(len(src), [src[i].name for i in range(len(src))])
assert "tensorflow" not in sys.modules, "TensorFlow was imported"
"""


@pytest.fixture(scope="module")
def tfds_build(tmp_path_factory):
    """A YouTube-Faces tree with a missing video and a no-face frame, and its records, built in a
    fresh interpreter (proves neither build nor read imports TensorFlow)."""
    tmp = tmp_path_factory.mktemp("tfds")
    ytf_root = write_ytf_tree(tmp / "ytf", {"Ann/0": 40, "Ann/1": 33, "Bob/2": 12})
    (ytf_root / "train_set.csv").write_text(
        (ytf_root / "train_set.csv").read_text() + "Ghost/0,60\n")
    np.save(ytf_root / "face_parsing_images_DB/Bob/2/0003.npy", np.zeros((0, 64, 64), np.int64))
    data_dir = tmp / "tfds"
    out = subprocess.run([sys.executable, "-c", _TFDS_SCRIPT, str(ytf_root), str(data_dir)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    # the unreadable video is skipped at build time; the others keep the split's order
    assert "3 ['Ann/0', 'Ann/1', 'Bob/2']" in out.stdout
    return ytf_root, data_dir


def test_tfds_records_hold_the_frames_and_patch_coverage_of_the_layout(tfds_build):
    from marlin_jax.data.tfds_source import TfdsSource

    ytf_root, data_dir = tfds_build
    assert list(data_dir.glob("youtube_faces_marlin/jpeg/2.1.0/*.array_record*"))
    tf_src = TfdsSource(str(data_dir), "train")
    ytf_src = YtfSource(str(ytf_root), "train")
    for i in range(3):
        a, b = ytf_src[i], tf_src[i]
        assert (a.name, a.num_frames) == (b.name, b.num_frames) and b.read_parsing is None
        idx = [0, 3, a.num_frames - 1, 3]
        np.testing.assert_array_equal(a.read_frames(idx), b.read_frames(idx))  # same bytes
        want = parsing_patch_labels(a.read_parsing(idx), 224, 16)
        assert want.shape == (4, 14, 14) and want.dtype == np.uint16
        np.testing.assert_array_equal(b.read_patch_labels(idx, 224, 16), want)
        np.testing.assert_array_equal(a.read_patch_labels(idx, 224, 16), want)
    assert not tf_src[2].read_patch_labels([3], 224, 16).any()  # "no face" survives the build
    with pytest.raises(ValueError, match="patch_size 8 at img_size 224: rebuild"):
        tf_src[0].read_patch_labels([0], 224, 8)


class CountingReader:
    """Wraps the raw ArrayRecord reader and records which keys are read."""

    def __init__(self, inner):
        self.inner, self.keys = inner, []

    def __getitem__(self, key):
        self.keys.append(key)
        return self.inner[key]


def test_tfds_clip_reads_only_its_own_frames_once(tfds_build):
    from marlin_jax.data.tfds_source import TfdsSource

    src = TfdsSource(str(tfds_build[1]), "train")
    counting = CountingReader(src._source.data_source)
    src._source = type("Wrapped", (), {"data_source": counting})()
    rec = src[1]  # Ann/1: its frames follow Ann/0's 40
    assert counting.keys == []  # a record reads nothing until asked
    rec.read_frames([2, 4, 6, 8])
    rec.read_patch_labels([2, 6], 224, 16)  # the slice-first frames: already read
    assert sorted(counting.keys) == [42, 44, 46, 48]


def test_tfds_source_without_video_index_says_rebuild(tfds_build, tmp_path):
    import shutil

    from marlin_jax.data.tfds_source import TfdsSource

    copy = tmp_path / "tfds"
    shutil.copytree(tfds_build[1], copy)
    (copy / "youtube_faces_marlin/jpeg/2.1.0/metadata.json").unlink()
    with pytest.raises(FileNotFoundError, match="metadata.json: no video index.*rebuild"):
        TfdsSource(str(copy), "train")


def test_tfds_and_ytf_pipelines_give_the_same_batches(tfds_build):
    from marlin_jax.data import default_data_config, make_dataset

    ytf_root, data_dir = tfds_build
    # the layout without the video the build skipped, as a split of its own
    rows = (ytf_root / "train_set.csv").read_text().splitlines()
    (ytf_root / "built_set.csv").write_text("\n".join(r for r in rows if "Ghost" not in r))
    batches = {}
    for source in ("ytf", "tfds"):
        c = default_data_config()
        c.source, c.root_dir, c.tfds_data_dir = source, str(ytf_root), str(data_dir)
        c.clip_frames, c.temporal_sample_rate, c.num_threads, c.prefetch = 8, 1, 1, 1
        given = YtfSource(str(ytf_root), "built") if source == "ytf" else None
        it = iter(make_dataset(c, split="train", global_batch_size=3, seed=4, source=given))
        batches[source] = [next(it) for _ in range(2)]
    for a, b in zip(batches["ytf"], batches["tfds"], strict=True):
        np.testing.assert_array_equal(a["video"], b["video"])
        np.testing.assert_array_equal(a["mask"], b["mask"])


@pytest.fixture(scope="module")
def raw_build(tfds_build):
    """The same layout built with frame_encoding="raw", in a data_dir of its own."""
    from marlin_jax.data.tfds_source import build_youtube_faces_marlin

    ytf_root, data_dir = tfds_build
    raw_dir = data_dir.parent / "tfds_raw"
    build_youtube_faces_marlin(str(ytf_root), str(raw_dir), frame_encoding="raw")
    return raw_dir


def test_raw_build_gives_the_jpeg_builds_clips_and_masks(tfds_build, raw_build):
    from marlin_jax.data import default_data_config, make_dataset
    from marlin_jax.data.records import resize_frames
    from marlin_jax.data.tfds_source import TfdsSource

    jpeg_src, raw_src = TfdsSource(str(tfds_build[1])), TfdsSource(str(raw_build))  # no flag
    assert (jpeg_src.frame_encoding, raw_src.frame_encoding) == ("jpeg", "raw")
    for i in range(3):
        idx = [0, 5, raw_src[i].num_frames - 1, 5]
        raw = raw_src[i].read_frames(idx)
        assert raw.shape == (4, 224, 224, 3) and raw.dtype == np.uint8  # stored at 224
        np.testing.assert_array_equal(raw, resize_frames(jpeg_src[i].read_frames(idx), 224))
        np.testing.assert_array_equal(raw_src[i].read_patch_labels(idx, 224, 16),
                                      jpeg_src[i].read_patch_labels(idx, 224, 16))
    batches = {}
    for name, data_dir in (("jpeg", tfds_build[1]), ("raw", raw_build)):
        c = default_data_config()
        c.source, c.tfds_data_dir = "tfds", str(data_dir)
        c.clip_frames, c.temporal_sample_rate, c.num_threads, c.prefetch = 8, 1, 1, 1
        it = iter(make_dataset(c, split="train", global_batch_size=3, seed=4))
        batches[name] = [next(it) for _ in range(2)]
    for a, b in zip(batches["jpeg"], batches["raw"], strict=True):
        np.testing.assert_array_equal(a["video"], b["video"])
        np.testing.assert_array_equal(a["mask"], b["mask"])


def test_raw_clip_reads_its_frames_from_the_frames_file_and_bad_files_are_named(raw_build,
                                                                              tmp_path):
    import shutil

    from marlin_jax.data.tfds_source import TfdsSource

    src = TfdsSource(str(raw_build), "train")
    counting = CountingReader(src._source.data_source)
    src._source = type("Wrapped", (), {"data_source": counting})()
    rec = src[1]  # Ann/1: its frames follow Ann/0's 40
    frames = rec.read_frames([2, 4, 6, 8])
    labels = rec.read_patch_labels([2, 6], 224, 16)
    assert counting.keys == []  # pixels and coverage come from the flat files, not the records
    flat = np.fromfile(Path(src.build_dir) / "train.frames", np.uint8).reshape(-1, 224, 224, 3)
    np.testing.assert_array_equal(frames, flat[[42, 44, 46, 48]])
    np.testing.assert_array_equal(labels, [_record_labels(counting.inner[k]) for k in (42, 46)])
    with pytest.raises(ValueError, match="rebuild with the builder's IMG_SIZE"):
        rec.read_patch_labels([2], 112, 16)

    build = tmp_path / "raw"
    shutil.copytree(raw_build, build)
    frames_file = next(build.glob("youtube_faces_marlin/raw/*/train.frames"))
    size = frames_file.stat().st_size
    opened = TfdsSource(str(build), "train")
    with open(frames_file, "r+b") as f:  # shrinks under an open source: the read names it
        f.truncate(size - 3)
    last = len(opened) - 1
    with pytest.raises(BadRecordError, match=rf"train.frames: record {size // 150528 - 1}: read "
                                             "150525 of 150528 bytes"):
        opened[last].read_frames([opened[last].num_frames - 1])
    with pytest.raises(BadRecordError, match=rf"train.frames: {size - 3} bytes, expected {size} "
                                             r"\(\d+ frames of 150528\): truncated"):
        TfdsSource(str(build), "train")
    frames_file.unlink()  # a 2.1.0-style build (pixels in the examples) or a lost file
    with pytest.raises(FileNotFoundError, match="train.frames: a file of the raw build .* rebuild"):
        TfdsSource(str(build), "train")


def _record_labels(record: bytes) -> np.ndarray:
    """The patch coverage stored in one serialised frame example, uint16 (14, 14)."""
    from tensorflow_datasets.proto import tf_example_pb2

    f = tf_example_pb2.Example.FromString(record).features.feature
    return np.frombuffer(f["patch_labels"].bytes_list.value[0], "<u2").reshape(14, 14)


def test_raw_records_with_worker_processes_send_positions_and_give_the_same_batches(raw_build):
    from marlin_jax.data import default_data_config, make_dataset
    from marlin_jax.data.pipeline import LoadClip
    from marlin_jax.data.tfds_source import TfdsSource

    def batches(workers: int, img_size: int = 224) -> list[dict]:
        c = default_data_config()
        c.source, c.tfds_data_dir, c.tfds_name = "tfds", str(raw_build), "youtube_faces_marlin/raw"
        c.clip_frames, c.num_threads, c.prefetch, c.num_workers = 8, 1, 1, workers
        c.img_size, c.mask_strategy = img_size, "random" if img_size != 224 else "fasking"
        it = iter(make_dataset(c, split="train", global_batch_size=3, seed=5))
        out = [next(it) for _ in range(3)]
        it.close()
        return out

    for a, b in zip(batches(0), batches(2), strict=True):
        assert sorted(a) == sorted(b) == ["mask", "video"]
        np.testing.assert_array_equal(a["video"], b["video"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
    small = batches(2, img_size=112)  # stored at 224: resized after the read
    assert small[0]["video"].shape == (3, 8, 112, 112, 3)
    np.testing.assert_array_equal(small[0]["video"], batches(0, img_size=112)[0]["video"])

    src = TfdsSource(str(raw_build), "train")  # what a worker sends: positions, no pixels
    load = LoadClip(src, clip_frames=8, temporal_sample_rate=2, img_size=224, patch_size=16,
                    tubelet_size=2, mask_strategy="fasking", mask_ratio=0.9, defer_frames=True)
    element = load(1, np.random.default_rng(0))
    assert "video" not in element and element["frame_positions"].dtype == np.int64
    np.testing.assert_array_equal(src.read_positions(element["frame_positions"][None])[0],
                                  src[1].read_frames(element["frame_positions"] - 40))
    sent = pickle.loads(pickle.dumps(src))  # as to a worker: its own files, not the coverage data
    assert src._raw_open is not None and sent._raw_open is None
    assert len(pickle.dumps(src)) < 20_000
    np.testing.assert_array_equal(sent[1].read_patch_labels([3], 224, 16),
                                  src[1].read_patch_labels([3], 224, 16))


def test_both_encodings_in_one_data_dir(tfds_build, raw_build, tmp_path):
    import shutil

    from marlin_jax.data.tfds_source import TfdsSource, build_youtube_faces_marlin

    shutil.copytree(tfds_build[1], tmp_path / "both")
    shutil.copytree(raw_build / "youtube_faces_marlin/raw", tmp_path / "both/youtube_faces_marlin/raw")
    assert TfdsSource(str(tmp_path / "both")).frame_encoding == "jpeg"  # tfds' default config
    assert TfdsSource(str(tmp_path / "both"), name="youtube_faces_marlin/raw"
                      ).frame_encoding == "raw"
    with pytest.raises(ValueError, match="frame_encoding must be one of"):
        build_youtube_faces_marlin(str(tfds_build[0]), str(tmp_path / "x"), frame_encoding="png")


def test_ytf_source_reads_each_parsing_map_once(ytf_root):
    src = YtfSource(str(ytf_root), "train")
    first = src[0].read_patch_labels([3, 5, 3], 224, 16)
    np.testing.assert_array_equal(first[0], first[2])
    np.testing.assert_array_equal(
        first, parsing_patch_labels([parsing_map(64, f) for f in (3, 5, 3)], 224, 16))
    os.remove(ytf_root / "face_parsing_images_DB/Ann/0/0003.npy")  # cached: not read again
    np.testing.assert_array_equal(src[0].read_patch_labels([5, 3], 224, 16), first[[1, 0]])
    with pytest.raises(BadRecordError, match="Ann/0/0004.npy"):
        os.remove(ytf_root / "face_parsing_images_DB/Ann/0/0004.npy")
        src[0].read_patch_labels([4], 224, 16)


def test_decode_jpeg_matches_opencv_and_falls_back_for_other_formats(ytf_root):
    # simplejpeg and OpenCV both decode with libjpeg-turbo's default IDCT and upsampling: the same
    # pixels here; other decoder builds may differ by a level or two, hence the tolerance
    path = ytf_root / "crop_images_DB/Ann/0/0007.jpg"
    got = decode_jpeg(path.read_bytes(), str(path))
    want = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    assert got.shape == want.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - want).max() <= 2
    ok, png = cv2.imencode(".png", cv2.cvtColor(want, cv2.COLOR_RGB2BGR))
    np.testing.assert_array_equal(decode_jpeg(png.tobytes(), "x.png"), want)  # via OpenCV
    with pytest.raises(BadRecordError, match="bad.jpg: not a decodable image"):
        decode_jpeg(b"\xff\xd8\xff\xe0 truncated", "bad.jpg")


def test_tfds_source_missing_build_is_a_clear_error(tmp_path):
    from marlin_jax.data.tfds_source import TfdsSource

    with pytest.raises(FileNotFoundError, match="build_youtube_faces_marlin"):
        TfdsSource(str(tmp_path / "nothing"), "train")


# --------------------------------------------------------------------------- video files


def _write_videos(root: Path, lengths: dict[str, int], size: int = 32) -> Path:
    (root / "videos").mkdir(parents=True)
    (root / "parsing").mkdir()
    rows = ["name,mouth_open,smiling"]
    for v, (name, n) in enumerate(lengths.items()):
        write_video(root / "videos" / f"{name}.mp4",
                    np.stack([frame_image(v, f, size) for f in range(n)]))
        np.save(root / "parsing" / f"{name}.npy", np.stack([parsing_map(size, f)
                                                            for f in range(n)]))
        rows.append(f"{name},{v % 2},{(v + 1) % 2}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_video_file_source(tmp_path):
    root = _write_videos(tmp_path / "vids", {"a": 20, "b": 9})
    src = VideoFileSource(str(root), "train")
    assert len(src) == 2 and src.has_labels
    rec = src[0]
    assert rec.name == "a.mp4" and rec.num_frames == 20
    np.testing.assert_array_equal(rec.labels, [0, 1])
    idx = [7, 2, 2, 19]
    full = read_frames(root / "videos/a.mp4")
    np.testing.assert_array_equal(rec.read_frames(idx), full[idx])
    np.testing.assert_array_equal(rec.read_parsing([4])[0], parsing_map(32, 4))
    (root / "val.txt").write_text("b\n")
    assert [VideoFileSource(str(root), "val")[0].name] == ["b.mp4"]
    with pytest.raises(FileNotFoundError, match="test.txt"):
        VideoFileSource(str(root), "test")


def test_video_file_source_reads_its_parsing_maps_once_as_patch_coverage(tmp_path):
    root = _write_videos(tmp_path / "vids", {"a": 20})
    src = VideoFileSource(str(root), "train")
    idx = [7, 2, 2, 19]
    want = parsing_patch_labels(src[0].read_parsing(idx), 64, 16)
    np.testing.assert_array_equal(src[0].read_patch_labels(idx, 64, 16), want)
    for npy in root.rglob("*.npy"):
        npy.unlink()  # cached for the whole video (every frame, for every record of it): not read again
    np.testing.assert_array_equal(src[0].read_patch_labels(idx[::-1], 64, 16), want[::-1])
    np.testing.assert_array_equal(src[0].read_patch_labels([0, 13], 64, 16),
                                  parsing_patch_labels([parsing_map(32, f) for f in (0, 13)], 64, 16))


def test_video_file_source_bad_files_name_the_file(tmp_path):
    root = _write_videos(tmp_path / "vids", {"a": 10})
    (root / "videos" / "broken.mp4").write_bytes(b"\x00" * 64)
    src = VideoFileSource(str(root), "all")
    with pytest.raises(BadRecordError, match="broken.mp4"):
        src[1]
    with pytest.raises(BadRecordError, match="a.mp4: cannot decode frame 30"):
        read_video_frames(str(root / "videos/a.mp4"), [30])
    np.save(root / "parsing" / "a.npy", np.zeros((3, 32, 32), np.uint8))  # wrong length
    with pytest.raises(BadRecordError, match=r"a.npy: parsing maps must be \(T=10"):
        src[0].read_parsing([0])


def test_video_file_source_skips_a_video_without_its_parsing_map_like_ytf(tmp_path, caplog):
    """The ytf rule: a dataset with parsing maps skips (BadRecordError where maps are read) a video
    whose map is missing, with a WARNING naming it and a counter; it never falls back silently."""
    root = _write_videos(tmp_path / "vids", {"a": 10, "b": 10, "c": 10})
    (root / "parsing" / "b.npy").unlink()
    with caplog.at_level(logging.WARNING, logger="marlin_jax.data.videos"):
        src = VideoFileSource(str(root), "all")
    assert src.missing_parsing == ["b.mp4"] and src.num_missing_parsing == 1
    assert "b.mp4: no parsing map" in caplog.text and "a.mp4" not in caplog.text
    np.testing.assert_array_equal(src[0].read_parsing([4])[0], parsing_map(32, 4))
    with pytest.raises(BadRecordError, match=r"videos/b.mp4: no parsing map \(.*parsing/b.npy or .*videos/b.npy "
                                             r"not found\); the video is skipped"):
        src[1].read_parsing([0])
    # through the pipeline with fasking: skipped and counted like any bad record, never a random mask
    from marlin_jax.data import default_data_config, make_dataset

    c = default_data_config()
    c.update(source="videos", root_dir=str(root), clip_frames=4, img_size=32, patch_size=16, tubelet_size=2,
             mask_ratio=0.5, num_threads=1, prefetch=2, mask_strategy="fasking", error_budget=10)
    it = iter(make_dataset(c, split="all", global_batch_size=2, shuffle=False, repeat=False))
    batches = list(it)
    assert sum(len(b["video"]) for b in batches) == 2
    assert it.stats["no_parsing"] == 0 and it.stats["skipped"] == 1
    assert list(it.bad_records) == [1] and "b.mp4: no parsing map" in it.bad_records[1]
    # without any parsing maps there is nothing missing: read_parsing is None (random masks)
    for f in (root / "parsing").glob("*.npy"):
        f.unlink()
    (root / "parsing").rmdir()
    bare = VideoFileSource(str(root), "all")
    assert bare.missing_parsing == [] and bare[0].read_parsing is None
    with pytest.raises(FileNotFoundError, match="nowhere: parsing map folder not found"):
        VideoFileSource(str(root), "all", parsing_dir=str(tmp_path / "nowhere"))


def test_video_file_source_reports_a_truncated_video_and_strict_skips_it(tmp_path, caplog):
    from tests.test_faults_extract import flat_frames, write_truncated_mp4

    (tmp_path / "vids").mkdir()
    path = write_truncated_mp4(tmp_path / "vids" / "cut.mp4", flat_frames(48, 64))
    decoded = len(read_frames(path))
    assert 0 < decoded < 48
    with caplog.at_level(logging.WARNING, logger="marlin_jax.video_io"):
        rec = VideoFileSource(str(tmp_path / "vids"), "all")[0]
    assert rec.num_frames == decoded  # sampling stays within the decodable frames
    assert f"cut.mp4: the container declares 48 frames but only {decoded} could be decoded" in caplog.text
    src = VideoFileSource(str(tmp_path / "vids"), "all")
    src[0]
    assert {k: (v.declared, v.decoded) for k, v in src.incomplete.items()} == {"cut.mp4": (48, decoded)}
    with pytest.raises(BadRecordError, match=f"cut.mp4: the container declares 48 frames but only {decoded}"):
        VideoFileSource(str(tmp_path / "vids"), "all", strict=True)[0]
    # the training config reaches it: data.strict_videos
    from marlin_jax.data.pipeline import default_data_config, make_source

    config = default_data_config()
    config.source, config.root_dir = "videos", str(tmp_path / "vids")
    assert not make_source(config, "all").strict
    config.strict_videos = True
    with pytest.raises(BadRecordError, match="cut.mp4"):
        make_source(config, "all")[0]


@pytest.mark.samples
def test_video_file_source_on_samples(samples_dir):
    src = VideoFileSource(str(samples_dir), "all")
    names = [src[i].name for i in range(len(src))]
    assert names == ["cropped01.mp4", "cropped04.mp4", "video01.mp4", "video05.mp4"]
    rec = src[1]
    assert rec.num_frames == 15 and rec.read_parsing is None and not src.has_labels
    frames = rec.read_frames([0, 14])
    assert frames.shape == (2, 224, 224, 3)
    np.testing.assert_array_equal(frames, read_frames(samples_dir / "cropped04.mp4")[[0, 14]])


# --------------------------------------------------------------------------- synthetic


def test_synthetic_source_records():
    pytest.importorskip("marlin_jax.data.synthetic")
    from marlin_jax.data.synthetic_source import SyntheticSource

    src = SyntheticSource(4, "train", num_frames=8, size=32, seed=0)
    rec = src[2]
    assert rec.num_frames == 8 and src.has_labels
    frames = rec.read_frames([1, 3])
    assert frames.shape == (2, 32, 32, 3) and frames.dtype == np.uint8
    parsing = rec.read_parsing([1, 3])
    assert parsing[0].shape == (32, 32) and parsing[0].max() <= 10
    assert rec.labels.dtype == np.int32
    again = SyntheticSource(4, "train", num_frames=8, size=32, seed=0)[2]
    np.testing.assert_array_equal(again.read_frames([1, 3]), frames)
    val = SyntheticSource(4, "val", num_frames=8, size=32, seed=0)[2]
    assert val.name != rec.name
    with pytest.raises(IndexError):
        src[4]


def test_video_file_source_reads_the_synthetic_video_dataset(tmp_path):
    synthetic = pytest.importorskip("marlin_jax.data.synthetic")
    root = synthetic.write_video_dataset(tmp_path / "synth", 3, num_frames=10, size=32)
    src = VideoFileSource(str(root), "train")
    assert len(src) == 3 and src.has_labels
    for i in range(3):
        rec, want = src[i], synthetic.render_video(i, num_frames=10, size=32)
        assert rec.name == want["name"] + ".mp4" and rec.num_frames == 10
        np.testing.assert_array_equal(rec.labels, want["labels"])
        np.testing.assert_array_equal(rec.read_parsing([2, 7]), want["parsing"][[2, 7]])


def test_ytf_source_reads_the_synthetic_ytf_layout(tmp_path):
    synthetic = pytest.importorskip("marlin_jax.data.synthetic")
    root = synthetic.write_ytf_layout(tmp_path / "ytf", 4, num_frames=12, size=32)
    train, val = YtfSource(str(root), "train"), YtfSource(str(root), "val")
    assert len(train) == 3 and len(val) == 1
    rec, want = train[1], synthetic.render_video(1, num_frames=12, size=32)
    assert rec.num_frames == 12
    np.testing.assert_array_equal(np.stack(rec.read_parsing(range(12))), want["parsing"])
    # JPEG is lossy: frames in temporal order match the render closely
    err = np.abs(rec.read_frames(range(12)).astype(int) - want["frames"]).mean()
    assert err < 8


@pytest.mark.parametrize("strategy", ["fasking", "fasking_opp"])
def test_masks_from_stored_patch_coverage_equal_masks_from_the_maps(tmp_path, strategy):
    """On the synthetic YouTube-Faces writer's data: the mask from the full parsing maps (what the
    original computes), from the ytf source's cached coverage and from the records' stored
    coverage are the same for the same seed."""
    from marlin_jax.data.synthetic import write_ytf_layout
    from marlin_jax.data.tfds_source import TfdsSource, build_youtube_faces_marlin
    from marlin_jax.masking import make_mask

    root = write_ytf_layout(tmp_path / "ytf", 2, num_frames=16, size=224, val_fraction=0.0)
    build_youtube_faces_marlin(str(root), str(tmp_path / "tfds"))
    ytf, rec = YtfSource(str(root), "train"), TfdsSource(str(tmp_path / "tfds"), "train")
    for video in range(2):
        a, b = ytf[video], rec[video]
        for seed in range(4):
            idx = np.random.default_rng(seed).permutation(16)  # any 16 frames, any order
            maps = a.read_parsing(idx)
            want = make_mask(strategy, 0.9, np.random.default_rng(seed), parsing=maps)
            for record in (a, b):
                bits = record.read_patch_labels(idx, 224, 16)
                got = make_mask(strategy, 0.9, np.random.default_rng(seed), patch_labels=bits)
                np.testing.assert_array_equal(got, want)
