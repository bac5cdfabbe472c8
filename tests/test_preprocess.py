"""The preprocessing CLIs (scripts/preprocess_ytf.py, scripts/preprocess_celebvhq.py) end to end
on small trees made from the sample videos."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from marlin_jax.face import FaceParser
from marlin_jax.face.preprocess import INFO_FILE, write_ytf_splits
from marlin_jax.video_io import count_frames, read_frames, write_video

ROOT = Path(__file__).resolve().parent.parent


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_frames(folder: Path, frames: np.ndarray, start: int = 0) -> None:
    """A YouTube Faces frame folder: ``<i>.<frame>.jpg`` names, as the dataset's."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"1.{start + i}.jpg"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))


def _read_csv(path: Path) -> list[tuple[str, int]]:
    with open(path, newline="") as f:
        return [(r["path"], int(r["len"])) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def ytf_tree(samples_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ytf")
    db = root / "frame_images_DB"
    video01 = read_frames(samples_dir / "video01.mp4", step=10, max_frames=12)
    video05 = read_frames(samples_dir / "video05.mp4", step=2, max_frames=10)  # starts black
    _write_frames(db / "Alice_Anders" / "0", video01, start=95)  # 95..106: numeric order matters
    _write_frames(db / "Bob_Brown" / "1", video05)
    _write_frames(db / "Carl_Cole" / "0", np.zeros((5, 120, 160, 3), np.uint8))  # no face
    _write_frames(db / "Dora_Dunn" / "2", video01[:6])
    (db / "Dora_Dunn" / "2" / "1.3.jpg").write_bytes(b"not a jpeg")  # 1 of 6 frames corrupt
    return root


@pytest.mark.samples
def test_preprocess_ytf_end_to_end_and_resume(ytf_tree, capsys):
    script = _load_script("preprocess_ytf")
    assert script.main(["--data_dir", str(ytf_tree), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert f"face parser: {FaceParser().method}" in out
    assert "4 videos: 3 processed, 0 already done, 1 failed" in out
    assert "FAILED Carl_Cole/0: no face" in out and "no face found in any of 5 frames" in out

    crops = ytf_tree / "crop_images_DB"
    parsing = ytf_tree / "face_parsing_images_DB"
    alice = sorted(os.listdir(crops / "Alice_Anders" / "0"))
    assert len(alice) == 12 and not (crops / "Carl_Cole").exists()
    for name in alice:
        img = cv2.imread(str(crops / "Alice_Anders" / "0" / name))
        assert img.shape == (224, 224, 3)
        maps = np.load(parsing / "Alice_Anders" / "0" / name.replace(".jpg", ".npy"))
        assert maps.shape == (1, 224, 224) and maps.dtype == np.uint8
        assert set(np.unique(maps)) <= set(range(11)) and (maps == 1).mean() > 0.2
    # black fade-in frames: a crop (first good box) but no face map, as the original's (0, H, W)
    bob = parsing / "Bob_Brown" / "1"
    assert np.load(bob / "1.0.npy").shape == (0, 224, 224)
    assert np.load(bob / "1.9.npy").shape == (1, 224, 224)
    assert len(os.listdir(crops / "Bob_Brown" / "1")) == 10
    # the corrupt frame is left out and named
    lines = (ytf_tree / "preprocess_ytf_report.jsonl").read_text().splitlines()
    report = [json.loads(x) for x in lines]
    dora = next(r for r in report if r["key"] == "Dora_Dunn/2")
    assert dora["status"] == "done" and "1.3.jpg" in dora["message"] and dora["frames"] == 5

    rows = _read_csv(ytf_tree / "train_set.csv") + _read_csv(ytf_tree / "val_set.csv")
    assert sorted(rows) == [("Alice_Anders/0", 12), ("Bob_Brown/1", 10), ("Dora_Dunn/2", 5)]
    info = json.loads((ytf_tree / INFO_FILE).read_text())
    assert info["parser"] == FaceParser().method and info["cropper"]["size"] == 224

    # resumable: a second run skips what is done; a deleted output is redone
    os.remove(crops / "Alice_Anders" / "0" / alice[0])
    before = (parsing / "Bob_Brown" / "1" / "1.5.npy").stat().st_mtime_ns
    assert script.main(["--data_dir", str(ytf_tree), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "4 videos: 1 processed, 2 already done, 1 failed" in out
    assert "FAILED Carl_Cole/0: no face" in out and "(earlier run)" in out
    assert (crops / "Alice_Anders" / "0" / alice[0]).exists()
    assert (parsing / "Bob_Brown" / "1" / "1.5.npy").stat().st_mtime_ns == before


@pytest.mark.samples
def test_preprocess_ytf_output_is_read_by_the_data_loader(ytf_tree):
    ytf = pytest.importorskip("marlin_jax.data.ytf")
    if not (ytf_tree / "train_set.csv").exists():
        _load_script("preprocess_ytf").main(["--data_dir", str(ytf_tree), "--workers", "1"])
    rows = ytf.read_split_csv(str(ytf_tree), "train") + ytf.read_split_csv(str(ytf_tree), "val")
    assert len(rows) == 3
    from marlin_jax.data.records import load_frame_parsing

    m = load_frame_parsing(str(ytf_tree / "face_parsing_images_DB" / "Alice_Anders/0/1.95.npy"))
    assert m.shape == (224, 224)


def test_ytf_splits_by_identity_and_from_the_original_csvs(tmp_path):
    rows = [(f"Person_{i}/{v}", 50 + v) for i in range(200) for v in range(3)]
    counts = write_ytf_splits(str(tmp_path), rows, val_fraction=0.2)
    train, val = _read_csv(tmp_path / "train_set.csv"), _read_csv(tmp_path / "val_set.csv")
    assert counts == {"train": len(train), "val": len(val)} and len(train) + len(val) == 600
    assert 0.12 < len(val) / 600 < 0.28
    assert not {p.split("/")[0] for p, _ in train} & {p.split("/")[0] for p, _ in val}
    assert write_ytf_splits(str(tmp_path / "again"), rows, 0.2) == counts  # deterministic

    orig = tmp_path / "orig"
    orig.mkdir()
    (orig / "train_set.csv").write_text("path,len\nPerson_1/0,1\nPerson_2/1,1\nGone/0,9\n")
    (orig / "val_set.csv").write_text("path,len\nPerson_3/2,1\n")
    out = tmp_path / "out"
    assert write_ytf_splits(str(out), rows, split_dir=str(orig)) == {"train": 2, "val": 1}
    assert _read_csv(out / "train_set.csv") == [("Person_1/0", 50), ("Person_2/1", 51)]


@pytest.mark.samples
def test_preprocess_celebvhq_end_to_end_and_resume(samples_dir, tmp_path, capsys):
    down = tmp_path / "downloaded"
    down.mkdir()
    write_video(down / "a.mp4", read_frames(samples_dir / "video01.mp4", max_frames=20), fps=30)
    write_video(down / "b.mp4", read_frames(samples_dir / "video05.mp4", max_frames=24), fps=30)
    write_video(down / "c.mp4", np.zeros((6, 96, 128, 3), np.uint8), fps=30)  # no face
    (down / "d.mp4").write_bytes(b"\x00corrupt" * 50)
    script = _load_script("preprocess_celebvhq")
    assert script.main(["--data_dir", str(tmp_path), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "4 videos: 2 processed, 0 already done, 2 failed" in out
    assert "FAILED c.mp4: no face" in out and "FAILED d.mp4:" in out
    assert sorted(os.listdir(tmp_path / "cropped")) == ["a.mp4", "b.mp4"]
    a = read_frames(tmp_path / "cropped" / "a.mp4")
    assert a.shape == (20, 224, 224, 3)
    assert count_frames(tmp_path / "cropped" / "b.mp4") == 24
    splits = {s: (tmp_path / f"{s}.txt").read_text().split() for s in ("train", "val", "test")}
    assert splits == {"train": ["a"], "val": [], "test": ["b"]}  # int(2 * .8), int(2 * .9)

    assert script.main(["--data_dir", str(tmp_path), "--workers", "1"]) == 0
    assert "4 videos: 0 processed, 2 already done, 2 failed" in capsys.readouterr().out


@pytest.mark.samples
def test_preprocess_with_worker_processes(ytf_tree, tmp_path, capsys):
    """The process pool path (spawned workers, one onnxruntime thread each)."""
    import shutil

    root = tmp_path / "ytf"
    shutil.copytree(ytf_tree / "frame_images_DB", root / "frame_images_DB")
    script = _load_script("preprocess_ytf")
    assert script.main(["--data_dir", str(root), "--workers", "2"]) == 0
    assert "4 videos: 3 processed, 0 already done, 1 failed" in capsys.readouterr().out
    assert len(os.listdir(root / "crop_images_DB" / "Alice_Anders" / "0")) == 12
