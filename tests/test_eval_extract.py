"""scripts/extract_dataset.py: batched, resumable, failures recorded (never empty arrays)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from marlin_jax.evaluation.datasets import DatasetError, LabelSet, load_features
from marlin_jax.models import MarlinModel, get_config
from marlin_jax.video_io import write_video
from tests.script_utils import load_script

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def marlin():
    from marlin_jax.extract import Marlin

    cfg = get_config("marlin_vit_tiny").replace(img_size=32, n_frames=4, encoder_depth=1)
    model = MarlinModel(cfg, rngs=nnx.Rngs(0), with_decoder=False, with_discriminator=False)
    return Marlin(model, batch_size=2)


def test_extract_dataset_matches_extract_video_and_resumes(tmp_path, marlin):
    ext = load_script("extract_dataset")
    rng = np.random.default_rng(0)
    videos = tmp_path / "videos"
    for name, t in [("a", 3), ("b", 20), ("sub/c", 9)]:  # 1, 2 and 1 windows (stride 4, rate 2)
        write_video(videos / f"{name}.mp4", rng.integers(0, 255, (t, 32, 32, 3), dtype=np.uint8))
    (videos / "broken.mp4").write_bytes(b"not a video")
    write_video(videos / "wrong_size.mp4", np.zeros((5, 16, 16, 3), np.uint8))
    listed = ext.list_videos(videos)
    assert [k for k, _ in listed] == ["a", "b", "broken", "sub/c", "wrong_size"]

    out = tmp_path / "feats"
    calls = []

    def features(clips):
        calls.append(clips.shape)
        return marlin.extract_features(clips, keep_seq=False)

    kw = dict(clip_frames=4, size=32, sample_rate=2, stride=4, batch_size=3, progress=False)
    summary = ext.extract_dataset(features, listed, out, **kw)
    assert sorted(summary["written"]) == ["a", "b", "sub/c"]
    assert sorted(summary["failed"]) == ["broken", "wrong_size"]
    assert "needs 32x32" in summary["failed"]["wrong_size"]
    assert set(calls) == {(3, 4, 32, 32, 3)}  # windows of several videos share fixed batches
    for key in ("a", "b", "sub/c"):
        got = np.load(out / f"{key}.npy")
        want = marlin.extract_video(videos / f"{key}.mp4", sample_rate=2, stride=4)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.load(out / "b.npy").shape[0] == 2
    # failures: a marker + the summary, never an (empty) array
    assert not (out / "broken.npy").exists()
    marker = json.loads((out / "broken.error.json").read_text())
    assert marker["video"].endswith("broken.mp4") and marker["error"]
    recorded = json.loads((out / ext.SUMMARY_FILE).read_text())
    assert sorted(recorded["failed"]) == ["broken", "wrong_size"]
    # the evaluation side reports them clearly, or counts them as skips
    ls = LabelSet(("a", "broken"), np.array([True, False]), "binary", ("y",),
                  ("a.mp4", "broken.mp4"), source="test")
    with pytest.raises(DatasetError, match="broken.npy: extraction failed"):
        load_features(out, ls)
    assert list(load_features(out, ls, on_error="skip").skipped) == ["broken"]

    # resumable: nothing is recomputed, failures are not retried unless asked
    calls.clear()
    again = ext.extract_dataset(features, listed, out, **kw)
    assert calls == [] and sorted(again["existing"]) == ["a", "b", "sub/c"]
    assert sorted(again["previously_failed"]) == ["broken", "wrong_size"]
    write_video(videos / "broken.mp4", rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8))
    retry = ext.extract_dataset(features, listed, out, retry_failed=True, **kw)
    assert retry["written"] == ["broken"] and list(retry["failed"]) == ["wrong_size"]
    assert not (out / "broken.error.json").exists()
    recorded = json.loads((out / ext.SUMMARY_FILE).read_text())
    assert list(recorded["failed"]) == ["wrong_size"]


def test_token_features_for_a_token_level_probe(tmp_path, marlin):
    """``keep_seq`` extraction writes (T, N, D) files that load as flattened token features."""
    ext = load_script("extract_dataset")
    rng = np.random.default_rng(1)
    videos = tmp_path / "videos"
    for name, t in [("a", 3), ("b", 20)]:
        write_video(videos / f"{name}.mp4", rng.integers(0, 255, (t, 32, 32, 3), dtype=np.uint8))
    out = tmp_path / "tokens"
    summary = ext.extract_dataset(lambda c: marlin.extract_features(c, keep_seq=True), ext.list_videos(videos),
                                  out, clip_frames=4, size=32, sample_rate=2, stride=4, batch_size=3,
                                  progress=False)
    assert sorted(summary["written"]) == ["a", "b"]
    n, d = marlin.config.num_tokens, marlin.config.encoder_embed_dim
    seq = np.load(out / "b.npy")
    assert seq.shape == (2, n, d)
    labels = LabelSet(("a", "b"), np.array([True, False]), "binary", ("x",),
                      tuple(str(videos / f"{k}.mp4") for k in "ab"), source="test")
    fs = load_features(out, labels)
    assert fs.x.shape == (2, n * d)
    np.testing.assert_allclose(fs.x[1], seq.mean(0).reshape(-1), rtol=1e-6)


def test_list_videos_errors(tmp_path):
    ext = load_script("extract_dataset")
    with pytest.raises(FileNotFoundError, match="video folder not found"):
        ext.list_videos(tmp_path / "none")
    (tmp_path / "x.mp4").write_bytes(b"")
    (tmp_path / "x.avi").write_bytes(b"")
    with pytest.raises(ValueError, match="share a name"):
        ext.list_videos(tmp_path)
