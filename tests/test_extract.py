"""Feature extraction API and CLI: windows, batching, errors, and parity with marlin-pytorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from marlin_jax.extract import Marlin, iter_windows, main
from marlin_jax.interop import save_torch_checkpoint
from marlin_jax.models import MarlinModel, get_config
from marlin_jax.video_io import VideoReadError, write_video
from tests.oracle_utils import build_torch_marlin

TINY = "marlin_vit_tiny"


@pytest.fixture(scope="module")
def tiny_marlin() -> Marlin:
    return Marlin(MarlinModel(get_config(TINY), rngs=nnx.Rngs(0), with_decoder=False), TINY, batch_size=3)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    out = {}
    for name, frames, size in (("long", 75, 224), ("short", 9, 224), ("mid", 24, 224), ("small", 40, 112)):
        path = root / f"{name}.avi"  # MJPG: lossy but deterministic to decode
        write_video(path, rng.integers(0, 255, (frames, size, size, 3), dtype=np.uint8), fps=25)
        out[name] = path
    (root / "not_a_video.mp4").write_text("hello")
    out["text"] = root / "not_a_video.mp4"
    return out


def test_extract_video_windows_and_reductions(tiny_marlin, videos):
    feats = tiny_marlin.extract_video(videos["long"])  # 75 frames: starts 0, 32 -> 2 windows
    assert feats.shape == (2, 192) and feats.dtype == np.float32
    np.testing.assert_allclose(tiny_marlin.extract_video(videos["long"], reduction="mean"), feats.mean(0), rtol=1e-6)
    np.testing.assert_allclose(tiny_marlin.extract_video(videos["long"], reduction="max"), feats.max(0), rtol=1e-6)
    assert tiny_marlin.extract_video(videos["long"], keep_seq=True).shape == (2, 1568, 192)
    assert tiny_marlin.extract_video(videos["long"], stride=4).shape == (6, 192)  # range(0, 43, 8)
    assert tiny_marlin.extract_video(videos["short"]).shape == (1, 192)
    assert tiny_marlin.extract_video(videos["mid"]).shape == (1, 192)


def test_windows_follow_marlin_pytorch_rules():
    def windows(total: int, sample_rate: int = 2, stride: int = 4) -> list[list[int]]:
        return [w.tolist() for w in iter_windows(iter(np.arange(total)), 4, sample_rate, stride)]

    assert windows(3) == [[0, 1, 2, 2]]  # <= clip_frames: all, the last repeated
    assert windows(7) == [[0, 1, 2, 3]]  # <= clip_frames * sample_rate: the first clip_frames
    assert windows(20, stride=2) == [[0, 2, 4, 6], [4, 6, 8, 10], [8, 10, 12, 14]]  # range(0, 20 - 8, 2 * 2)
    assert windows(9, sample_rate=1, stride=9) == [[0, 1, 2, 3]]  # range(0, 9 - 4, 9)


def test_batching_does_not_change_features(tiny_marlin, videos):
    one_at_a_time = Marlin(tiny_marlin.model, batch_size=1)
    np.testing.assert_allclose(one_at_a_time.extract_video(videos["long"], stride=4),
                               tiny_marlin.extract_video(videos["long"], stride=4), atol=1e-5)


def test_channels_first_input_mirrors_marlin_pytorch(tiny_marlin):
    x = np.random.default_rng(0).random((2, 16, 224, 224, 3), dtype=np.float32)
    np.testing.assert_allclose(tiny_marlin.extract_features(np.moveaxis(x, -1, 1), channels_first=True),
                               tiny_marlin.extract_features(x), atol=1e-6)
    u8 = (x * 255).astype(np.uint8)
    np.testing.assert_allclose(tiny_marlin.extract_features(u8, keep_seq=False),
                               tiny_marlin.extract_features(u8.astype(np.float32) / 255, keep_seq=False), atol=1e-6)


def test_from_file_speed_options(tiny_marlin, tmp_path):
    """auto attention is per_head on CPU (same features); bf16 matmuls: kernels stored in bf16
    once, everything else float32, features close to float32."""
    import jax
    import jax.numpy as jnp

    path = save_torch_checkpoint(tmp_path / "tiny.encoder.pt", tiny_marlin.model, encoder_only=True)
    clips = np.random.default_rng(0).random((2, 16, 224, 224, 3), dtype=np.float32)
    ref = np.asarray(tiny_marlin.extract_features(clips, keep_seq=False))
    auto = Marlin.from_file(TINY, path)
    assert auto.model.encoder.blocks[0].attn.attention_impl == "per_head"
    np.testing.assert_allclose(np.asarray(auto.extract_features(clips, keep_seq=False)), ref, atol=1e-5)
    fast = Marlin.from_file(TINY, path, matmul_dtype="bfloat16")
    dtypes = {(str(leaf.dtype), leaf.ndim) for leaf in jax.tree.leaves(fast._encoder_state)}
    # kernels: 2-D Linear, 4-D per-head qkv, 5-D patch embedding; 3-D float32: positions
    assert dtypes == {("bfloat16", 2), ("bfloat16", 4), ("bfloat16", 5), ("float32", 1), ("float32", 3)}
    out = np.asarray(fast.extract_features(clips, keep_seq=False))
    assert out.dtype == jnp.float32 and 0 < np.abs(out - ref).max() < 0.1


def test_bad_inputs_are_clear_errors(tiny_marlin, videos, tmp_path):
    with pytest.raises(VideoReadError, match="no such file"):
        tiny_marlin.extract_video(tmp_path / "missing.mp4")
    with pytest.raises(VideoReadError, match="not_a_video.mp4"):
        tiny_marlin.extract_video(videos["text"])
    empty = tmp_path / "empty.avi"
    write_video(empty, np.zeros((0, 224, 224, 3), np.uint8))
    with pytest.raises(VideoReadError, match="empty.avi"):
        tiny_marlin.extract_video(empty)
    with pytest.raises(VideoReadError, match=r"frames are 112x112 .* crop_face=True"):
        tiny_marlin.extract_video(videos["small"])
    with pytest.raises(ValueError, match="reduction"):
        tiny_marlin.extract_video(videos["long"], reduction="median")
    with pytest.raises(ValueError, match=r"expected video \(B, 16, 224, 224, 3\)"):
        tiny_marlin.extract_features(np.zeros((1, 8, 224, 224, 3), np.float32))


def test_cli_writes_one_npy_per_video_and_lists_failures(tiny_marlin, videos, tmp_path, capsys):
    checkpoint = tmp_path / "tiny.encoder.pt"
    save_torch_checkpoint(checkpoint, tiny_marlin.model, encoder_only=True)
    out = tmp_path / "features"
    code = main([str(videos["long"]), str(videos["text"]), "--model", TINY, "--checkpoint", str(checkpoint),
                 "--output_dir", str(out)])
    assert code == 1
    assert "not_a_video.mp4" in capsys.readouterr().err
    saved = np.load(out / "long.npy")
    np.testing.assert_allclose(saved, tiny_marlin.extract_video(videos["long"]), atol=1e-5)
    assert not (out / "not_a_video.npy").exists()


@pytest.mark.oracle
@pytest.mark.samples
@pytest.mark.parametrize("video", ["cropped01.mp4", "cropped04.mp4"])
def test_extract_video_matches_marlin_pytorch_on_samples(marlin_pytorch, samples_dir, video, tmp_path):
    import torch

    config = get_config("marlin_vit_small_ytf")
    reference = build_torch_marlin(marlin_pytorch, config, full=False)
    torch.save(reference.state_dict(), tmp_path / "ref.encoder.pt")
    ours = Marlin.from_file("marlin_vit_small_ytf", tmp_path / "ref.encoder.pt")
    expected = reference.extract_video(str(samples_dir / video)).numpy()
    got = ours.extract_video(samples_dir / video)
    assert got.shape == expected.shape
    assert np.mean(np.abs(got - expected)) < 1.5e-4


@pytest.mark.samples
def test_extract_video_with_face_cropping_on_in_the_wild_video(tiny_marlin, samples_dir):
    feats = tiny_marlin.extract_video(samples_dir / "video05.mp4", crop_face=True)  # 90 frames, fades in
    assert feats.shape == (len(range(0, 90 - 32, 32)), 192)
    assert np.isfinite(feats).all()


def test_extract_video_with_face_cropping_reports_faceless_video(tiny_marlin, tmp_path):
    blank = tmp_path / "blank.avi"
    write_video(blank, np.zeros((20, 96, 128, 3), np.uint8))
    with pytest.raises(VideoReadError, match="blank.avi.*no face"):
        tiny_marlin.extract_video(blank, crop_face=True)


def test_a_checkpoint_with_its_own_architecture_is_used_as_saved(tmp_path, videos, capsys):
    """A marlin-jax checkpoint carries its marlin_config.json (as a trainer workdir does): the
    API without a model name and the CLI without --model use that architecture; naming another
    model is an error that says how to use the checkpoint's own."""
    import dataclasses

    from marlin_jax.interop import save_marlin_checkpoint

    custom = dataclasses.replace(get_config(TINY), encoder_embed_dim=96, encoder_num_heads=2,
                                 encoder_depth=1)  # registered under no name
    model = MarlinModel(custom, rngs=nnx.Rngs(1), with_decoder=False)
    ckpt = save_marlin_checkpoint(tmp_path / "run", model)
    marlin = Marlin.from_file(None, ckpt)
    assert marlin.config == custom and "marlin_config.json" in marlin.name
    clips = np.random.default_rng(0).random((1, 16, 224, 224, 3), dtype=np.float32)
    want = Marlin(model, "custom").extract_features(clips, keep_seq=False)
    np.testing.assert_allclose(np.asarray(marlin.extract_features(clips, keep_seq=False)),
                               np.asarray(want), atol=1e-5)
    with pytest.raises(ValueError, match="another architecture than 'marlin_vit_tiny'.*leave the model name out"):
        Marlin.from_file(TINY, ckpt)

    out = tmp_path / "features"
    assert main(["--checkpoint", str(ckpt), "--output_dir", str(out), str(videos["mid"])]) == 0
    assert np.load(out / "mid.npy").shape[-1] == 96
    capsys.readouterr()
    # A --model that disagrees: exit status 2 and the reason, not a traceback.
    assert main(["--checkpoint", str(ckpt), "--model", TINY, "--output_dir", str(out), str(videos["mid"])]) == 2
    assert "cannot load the model" in capsys.readouterr().err
