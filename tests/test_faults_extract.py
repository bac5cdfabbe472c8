"""Issue 14 ("nothing lost, nothing silent") for feature extraction: clashing output names,
partly decodable videos, faces that appear late, frames too small for a face."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from marlin_jax import extract
from marlin_jax.extract import Marlin, main, plan_outputs
from marlin_jax.models import MarlinModel, get_config
from marlin_jax.video_io import (
    IncompleteVideoError,
    VideoReadError,
    count_frames,
    iter_frames,
    read_frames,
    write_video,
)

TINY = "marlin_vit_tiny"


# ------------------------------------------------------------------------------------ helpers


def _atoms(data: bytes | bytearray, start: int, end: int):
    """Top-level (or nested, between ``start`` and ``end``) ISO-BMFF boxes: (type, pos, size, header)."""
    pos = start
    while pos < end:
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", data[pos + 8:pos + 16])[0], 16
        elif size == 0:
            size = end - pos
        yield kind, pos, size, header
        pos += size


def _shift_chunk_offsets(moov: bytearray, start: int, end: int, shift: int) -> None:
    for kind, pos, size, header in _atoms(moov, start, end):
        if kind in (b"trak", b"mdia", b"minf", b"stbl"):
            _shift_chunk_offsets(moov, pos + header, pos + size, shift)
        elif kind in (b"stco", b"co64"):
            fmt, width = (">I", 4) if kind == b"stco" else (">Q", 8)
            for i in range(struct.unpack(">I", moov[pos + 12:pos + 16])[0]):
                at = pos + 16 + i * width
                moov[at:at + width] = struct.pack(fmt, struct.unpack(fmt, moov[at:at + width])[0] + shift)


def faststart(data: bytes) -> bytes:
    """An mp4 with its ``moov`` (the index: frame count, sample table) moved before ``mdat``, as
    ``ffmpeg -movflags faststart`` writes it, so a truncated copy still opens and declares every
    frame."""
    atoms = list(_atoms(data, 0, len(data)))
    moov = next(bytearray(data[p:p + s]) for kind, p, s, _ in atoms if kind == b"moov")
    _shift_chunk_offsets(moov, 8, len(moov), len(moov))
    out = bytearray()
    for kind, p, s, _ in atoms:
        if kind == b"mdat":
            out += moov
        if kind != b"moov":
            out += data[p:p + s]
    return bytes(out)


def write_truncated_mp4(path: Path, frames: np.ndarray, keep: float = 0.3) -> Path:
    """A moov-first mp4 of ``frames`` cut to its first ``keep`` of bytes: it opens, declares
    ``len(frames)`` frames and decodes only some."""
    full = path.with_name(path.stem + ".full.mp4")
    write_video(full, frames)
    data = faststart(full.read_bytes())
    full.unlink()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def flat_frames(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Cheap-to-encode frames: a flat colour per frame plus a moving bar, uint8 (n, size, size, 3)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    out[:] = rng.integers(30, 220, (n, 1, 1, 3), dtype=np.uint8)
    for t in range(n):
        out[t, :, (3 * t) % size] = 255
    return out


def fade_in_video(path: Path, black: int, face: int, size: int = 64) -> Path:
    """``black`` black frames, then ``face`` frames of a synthetic face (MJPG avi)."""
    from marlin_jax.data.synthetic import render_video

    faces = render_video(1, num_frames=face, size=size)["frames"]
    write_video(path, np.concatenate([np.zeros((black, size, size, 3), np.uint8), faces]))
    return path


@pytest.fixture(scope="module")
def tiny() -> Marlin:
    return Marlin(MarlinModel(get_config(TINY), rngs=nnx.Rngs(0), with_decoder=False), TINY, batch_size=2)


@pytest.fixture
def cli(tiny, monkeypatch, tmp_path):
    """``main`` with the tiny model (compiled once per module) instead of loading a checkpoint."""
    monkeypatch.setattr(extract.Marlin, "from_file", classmethod(lambda cls, *a, **k: tiny))

    def run(*args: str) -> int:
        return main([*args, "--checkpoint", str(tmp_path / "unused.pt"), "--model", TINY])

    return run


# ------------------------------------------------------------- 1. outputs named without clashes


def test_cli_mirrors_folders_keeps_extensions_of_clashing_names_and_counts(cli, tiny, tmp_path, capsys):
    root = tmp_path / "F"
    videos = {
        "cropped02.mp4": flat_frames(9, 224, seed=1),
        "sub/cropped02.mp4": flat_frames(9, 224, seed=2),
        "x.mp4": flat_frames(9, 224, seed=3),
        "x.avi": flat_frames(9, 224, seed=4),
    }
    for rel, frames in videos.items():
        write_video(root / rel, frames)
    out = tmp_path / "out"
    assert cli(str(root), "--output_dir", str(out)) == 0
    stdout = capsys.readouterr().out
    assert "4 written, 0 skipped (output existed before this run), 0 failed, of 4 videos" in stdout
    assert f"{root / 'x.mp4'} -> {out / 'x.mp4.npy'}" in stdout  # the renaming is reported
    targets = {"cropped02.mp4": "cropped02.npy", "sub/cropped02.mp4": "sub/cropped02.npy",
               "x.mp4": "x.mp4.npy", "x.avi": "x.avi.npy"}
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(targets.values())
    for rel, target in targets.items():
        np.testing.assert_allclose(np.load(out / target), tiny.extract_video(root / rel), atol=1e-5)
    assert not np.allclose(np.load(out / "cropped02.npy"), np.load(out / "sub/cropped02.npy"))
    # resuming: every output existed before the second run
    assert cli(str(root), "--output_dir", str(out)) == 0
    assert "0 written, 4 skipped (output existed before this run), 0 failed, of 4 videos" in capsys.readouterr().out


def test_cli_resume_skips_only_outputs_that_existed_before_the_run(cli, tmp_path, capsys):
    root = tmp_path / "F"
    write_video(root / "a.mp4", flat_frames(9, 224, seed=1))
    write_video(root / "b.mp4", flat_frames(9, 224, seed=2))
    out = tmp_path / "out"
    out.mkdir()
    np.save(out / "a.npy", np.full((1, 192), 7.0, np.float32))  # from an earlier run
    assert cli(str(root), "--output_dir", str(out)) == 0
    assert "1 written, 1 skipped (output existed before this run), 0 failed, of 2 videos" in capsys.readouterr().out
    assert (np.load(out / "a.npy") == 7).all() and np.load(out / "b.npy").shape == (1, 192)
    assert cli(str(root), "--output_dir", str(out), "--overwrite") == 0
    assert "2 written, 0 skipped" in capsys.readouterr().out and not (np.load(out / "a.npy") == 7).all()


def test_outputs_that_would_still_coincide_are_refused_before_any_work(cli, tmp_path, capsys):
    for folder in ("A", "B"):
        write_video(tmp_path / folder / "x.avi", flat_frames(2, 32))
    with pytest.raises(ValueError, match=r"A/x.avi, .*B/x.avi -> .*x.npy"):
        plan_outputs([tmp_path / "A", tmp_path / "B"], tmp_path / "out")
    assert cli(str(tmp_path / "A"), str(tmp_path / "B"), "--output_dir", str(tmp_path / "out")) == 2
    assert "would write the same output file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # the same file reached twice (as a file and inside its folder) is planned once
    plan, renamed = plan_outputs([tmp_path / "A" / "x.avi", tmp_path / "A"], tmp_path / "out")
    assert plan == [(tmp_path / "A" / "x.avi", tmp_path / "out" / "x.npy")] and renamed == []


# ------------------------------------------------------------------ 2. partly decodable videos


@pytest.fixture(scope="module")
def truncated(tmp_path_factory) -> tuple[Path, int]:
    """A 224x224 moov-first mp4 declaring 48 frames, cut to 30 % of its bytes; its decodable count."""
    path = write_truncated_mp4(tmp_path_factory.mktemp("trunc") / "cut.mp4", flat_frames(48, 224))
    decoded = len(read_frames(path))
    assert 0 < decoded < 48
    return path, decoded


def test_truncated_video_is_a_warning_naming_both_counts_or_a_strict_error(truncated, caplog):
    path, decoded = truncated
    with caplog.at_level(logging.WARNING, logger="marlin_jax.video_io"):
        assert count_frames(path) == decoded
        seen = []
        assert len(list(iter_frames(path, step=2, on_incomplete=seen.append))) == (decoded + 1) // 2
    assert caplog.text.count(f"{path}: the container declares 48 frames but only {decoded} could be decoded") == 2
    assert [(s.declared, s.decoded) for s in seen] == [(48, decoded)]
    for read in (lambda: count_frames(path, strict=True), lambda: list(iter_frames(path, strict=True))):
        with pytest.raises(IncompleteVideoError, match=f"cut.mp4: the container declares 48 frames but only {decoded}"):
            read()
    # a complete file says nothing
    caplog.clear()
    write_video(path.with_name("whole.mp4"), flat_frames(10, 32))
    with caplog.at_level(logging.WARNING, logger="marlin_jax.video_io"):
        assert count_frames(path.with_name("whole.mp4")) == 10
    assert caplog.text == ""


def test_a_second_read_that_decodes_another_count_is_an_error(truncated, caplog):
    """``expect``: the second pass of a two-pass reader (face cropping) reads as many frames as
    the first decoded, never warns again, and names the file when it decodes fewer."""
    path, decoded = truncated
    with caplog.at_level(logging.WARNING, logger="marlin_jax.video_io"):
        assert len(list(iter_frames(path, expect=decoded))) == decoded
        assert len(list(iter_frames(path, expect=2))) == 2
    assert caplog.text == ""
    with pytest.raises(VideoReadError, match=f"cut.mp4: decoded {decoded + 5} frames, then {decoded} when read"):
        list(iter_frames(path, expect=decoded + 5))


def test_extraction_of_a_truncated_video_is_reported_and_strict_fails_it(truncated, tiny, cli, tmp_path, capsys):
    path, decoded = truncated
    with pytest.raises(IncompleteVideoError, match="cut.mp4: the container declares 48"):
        tiny.extract_video(path, strict=True)
    good = tmp_path / "good.mp4"
    write_video(good, flat_frames(9, 224))
    out = tmp_path / "out"
    assert cli(str(path), str(good), "--output_dir", str(out)) == 0
    captured = capsys.readouterr()
    assert "2 written (1 of them partly decodable), 0 skipped" in captured.out
    assert f"{path}: the container declares 48 frames but only {decoded} could be decoded" in captured.err
    assert (out / "cut.npy").exists()
    assert cli(str(path), str(good), "--output_dir", str(tmp_path / "strict"), "--strict") == 1
    captured = capsys.readouterr()
    assert "1 written, 0 skipped (output existed before this run), 1 failed, of 2 videos" in captured.out
    assert f"{path}: the container declares 48 frames but only {decoded}" in captured.err
    assert not (tmp_path / "strict" / "cut.npy").exists()


# ----------------------------------------------------------- 3. faces found across the video


def test_crop_face_keeps_windows_before_the_first_face(tiny, tmp_path):
    """40 black frames, then a face: the first window (frames 0-30) holds no face and takes the
    box of the nearest frame with one, as the original keeps such windows."""
    video = fade_in_video(tmp_path / "fade.avi", black=40, face=40)
    feats = tiny.extract_video(video, crop_face=True)
    assert feats.shape == (2, 192) and np.isfinite(feats).all()  # windows at frames 0 and 32


def test_crop_face_error_says_what_was_searched(tiny, tmp_path):
    blank = tmp_path / "blank.avi"
    write_video(blank, np.zeros((40, 64, 64, 3), np.uint8))
    with pytest.raises(VideoReadError, match=r"blank.avi: no face found in any of 28 frames searched "
                                             r"\(of the 40 in the video\)"):
        tiny.extract_video(blank, crop_face=True)  # 20 even frames + 8 odd ones among the first 16


# -------------------------------------------------------------------- 4. frames too small


def test_crop_face_on_a_one_pixel_video_names_the_file_and_the_minimum(tiny, tmp_path):
    dot = tmp_path / "dot.avi"
    write_video(dot, np.full((5, 1, 1, 3), 128, np.uint8))
    with pytest.raises(VideoReadError, match=r"dot.avi: frames are 1x1 pixels, too small to hold a face "
                                             r"\(face detection needs at least 8x8\)"):
        tiny.extract_video(dot, crop_face=True)


def test_heatmap_clips_of_a_fade_in_are_face_cropped_like_extraction(tiny, tmp_path):
    """Grad-CAM's clip loader crops faces through the same whole-video track as extraction: the
    first window (40 black frames before the face) is kept, not refused."""
    from marlin_jax.analysis.heatmap import load_clips

    video = fade_in_video(tmp_path / "fade.avi", black=40, face=40)
    clips = list(load_clips(video, tiny.config, windows="all", crop_face=True))
    size = tiny.config.img_size
    assert len(clips) == 2 and all(c.shape == (16, size, size, 3) for c in clips)
    assert clips[0].max() == 0 and clips[1].max() > 0  # frames 0-30 black (kept); 32-62 the face
