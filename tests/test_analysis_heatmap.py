"""Grad-CAM heat maps of feature dimensions: definition, a constructed ground truth, the CLIs."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from matplotlib.image import imread

from marlin_jax.analysis import compare, visualize
from marlin_jax.analysis.heatmap import (
    MODES,
    FeatureGradCam,
    grad_relevance,
    normalise,
    overlay,
    upsample,
)
from marlin_jax.models import MarlinEncoder, MarlinModel, get_config, register_model
from marlin_jax.video_io import count_frames, read_frames, video_info, write_video

SMALL = get_config("marlin_vit_tiny").replace(img_size=64, n_frames=4)  # token grid (2, 4, 4)


def _readout_encoder(channel: int = 0, gain: float = 5.0) -> MarlinEncoder:
    """An encoder whose feature ``channel`` is a linear read-out of pixel brightness.

    Every block's residual branches are zeroed (blocks are the identity), the patch embedding
    maps each patch to ``gain * mean pixel`` in ``channel`` and to nothing elsewhere, plus a
    random bias: on a black clip with one bright patch, only that patch changes the feature."""
    enc = MarlinEncoder(SMALL, rngs=nnx.Rngs(0))
    for block in enc.blocks:
        for linear in (block.attn.proj, block.mlp.fc2):
            linear.kernel[...] = jnp.zeros_like(linear.kernel[...])
            linear.bias[...] = jnp.zeros_like(linear.bias[...])
    proj = enc.patch_embedding.projection
    kernel = np.zeros(proj["kernel"][...].shape, np.float32)
    kernel[..., channel] = gain / SMALL.patch_dim
    proj["kernel"][...] = jnp.asarray(kernel)
    bias = np.random.default_rng(0).normal(0, 3, SMALL.encoder_embed_dim).astype(np.float32)
    proj["bias"][...] = jnp.asarray(bias)
    return enc


@pytest.mark.parametrize("mode", MODES)
def test_heatmap_peaks_at_the_patch_the_feature_reads(mode):
    """Three clips (one batch), each black but for one bright patch at a different place."""
    places = [(0, 1, 2), (1, 3, 0), (1, 0, 3)]
    p = SMALL.patch_size
    clips = np.zeros((len(places), SMALL.n_frames, SMALL.img_size, SMALL.img_size, 3), np.float32)
    for b, (t, i, j) in enumerate(places):
        clips[b, 2 * t : 2 * t + 2, p * i : p * (i + 1), p * j : p * (j + 1)] = 1.0
    cam = FeatureGradCam(_readout_encoder(channel=0), mode=mode)
    rel, _ = cam.relevance(clips, [0, 7])
    heat = upsample(normalise(rel), SMALL)  # (B, F, T, H, W)
    for b, (t, i, j) in enumerate(places):
        tokens = rel[b, 0]
        assert tokens.shape == SMALL.grid
        assert np.unravel_index(tokens.argmax(), tokens.shape) == (t, i, j)
        assert tokens.max() > 3 * np.sort(tokens.ravel())[-2]  # a clear peak, not a tie
        ft, fy, fx = np.unravel_index(heat[b, 0].argmax(), heat[b, 0].shape)
        assert ft // 2 == t and fy // p == i and fx // p == j
        assert heat[b, 0].max() > 0.9  # bilinear resampling between token centres


def test_grad_relevance_definitions_on_a_token_readout():
    """A head reading one token linearly: 'hires' puts all relevance on that token;
    'gradcam' weights every token with the token-averaged gradient."""
    rng = np.random.default_rng(0)
    acts = jnp.asarray(rng.normal(size=(2, 10, 6)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    k = 7

    def head(a):
        return a[:, k] @ v

    idx = jnp.array([1, 3])
    rel, vals = grad_relevance(head, acts, idx, "hires")
    expect = np.zeros((2, 2, 10))
    expect[:, :, k] = np.asarray(acts[:, k] @ v[:, idx])
    np.testing.assert_allclose(rel, expect, atol=1e-5)
    np.testing.assert_allclose(vals, head(acts)[:, idx], atol=1e-6)
    rel, _ = grad_relevance(head, acts, idx, "gradcam")
    np.testing.assert_allclose(rel, np.einsum("bnd,df->bfn", acts, v[:, idx]) / 10, atol=1e-5)


@pytest.fixture(scope="module")
def random_encoder():
    return MarlinEncoder(SMALL, rngs=nnx.Rngs(1))


def test_hires_relevance_is_the_directional_derivative_per_token(random_encoder):
    """At an inner layer, 'hires' relevance of token n = d/de F(A with A_n scaled by 1 + e),
    checked with forward-mode jvp through the real blocks; a batch gives per-clip results."""
    enc = random_encoder
    layer = 1
    cam = FeatureGradCam(enc, layer=layer, mode="hires")
    clips = jax.random.uniform(jax.random.key(0), (2, 4, 64, 64, 3))
    rel, vals = cam.relevance(clips, [5, 9], signed=True)
    pooled = jax.jit(lambda x: enc.extract_features(x, keep_seq=False))(clips)
    np.testing.assert_allclose(vals, pooled[:, [5, 9]], atol=1e-5)

    @jax.jit
    def trunk(x):
        a = enc.embed(x)
        for block in enc.blocks[: layer + 1]:
            a = block(a)
        return a

    acts = trunk(clips)

    def feature(a):
        for block in enc.blocks[layer + 1 :]:
            a = block(a)
        return enc.pool_and_norm(a, keep_seq=False)[:, [5, 9]]

    flat = rel.reshape(2, 2, -1)
    tokens = jnp.array([0, 13, 31])
    tangents = jax.vmap(lambda n: jnp.zeros_like(acts).at[:, n].set(acts[:, n]))(tokens)
    derivs = jax.jit(jax.vmap(lambda t: jax.jvp(feature, (acts,), (t,))[1]))(tangents)
    for k, n in enumerate(tokens.tolist()):
        np.testing.assert_allclose(flat[:, :, n], derivs[k], rtol=2e-3, atol=2e-5)
    swapped, _ = cam.relevance(clips[::-1], [5, 9], signed=True)  # same shape: no recompile
    np.testing.assert_allclose(swapped[::-1], rel, rtol=1e-4, atol=1e-6)


def test_upsample_normalise_overlay():
    cfg = SMALL
    maps = np.zeros((3,) + cfg.grid, np.float32)
    maps[0, 1, 2, 3] = 4.0
    maps[1] = -1.0  # no positive evidence
    maps[2, 0, 0, 0] = 2.0
    n = normalise(maps)
    assert n[0].max() == 1.0 and n[1].max() == 0.0 and n[2].max() == 1.0
    shared = normalise(maps, scale=4.0)
    assert shared[2].max() == 0.5
    up = upsample(n, cfg)
    assert up.shape == (3, cfg.n_frames, cfg.img_size, cfg.img_size)
    t, y, x = np.unravel_index(up[0].argmax(), up[0].shape)
    assert t in (2, 3) and y // 16 == 2 and x // 16 == 3
    assert np.all(up[0, :2] == 0)  # the other tubelet stays cold
    frames = np.random.default_rng(0).integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)
    heat = np.random.default_rng(1).uniform(size=(4, 8, 8))
    np.testing.assert_array_equal(overlay(frames, heat, alpha=0.0), frames)
    full = overlay(frames, np.ones((4, 8, 8)), alpha=1.0, cmap="jet")
    assert full.dtype == np.uint8 and np.all(full == full[0, 0, 0])  # one colour: jet(1.0)


def test_gradcam_rejects_bad_arguments(random_encoder):
    enc = random_encoder
    with pytest.raises(ValueError, match=r"out of range.*192 dimensions"):
        FeatureGradCam(enc).relevance(np.zeros((1, 4, 64, 64, 3), np.float32), [3, 192])
    with pytest.raises(ValueError, match="layer 4 out of range"):
        FeatureGradCam(enc, layer=4)
    with pytest.raises(ValueError, match="mode"):
        FeatureGradCam(enc, mode="cam++")
    with pytest.raises(ValueError, match="expected video"):
        FeatureGradCam(enc).relevance(np.zeros((1, 4, 32, 32, 3), np.float32), [0])


# ----------------------------------------------------------------------------- CLIs
CLI_MODEL = "analysis_test_vit_tiny_112"  # 16 frames at 112 px: token grid (8, 7, 7)


def _save_encoder(path, name):
    from marlin_jax.interop import save_torch_checkpoint

    model = MarlinModel(get_config(name), rngs=nnx.Rngs(0), with_decoder=False,
                        with_discriminator=False)
    save_torch_checkpoint(path, model, encoder_only=True)
    return path


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A random ViT-tiny at 112 px registered as CLI_MODEL, saved as an encoder-only `.pt`
    (the CLIs centre-crop and resize the 224 px videos to it)."""
    register_model(CLI_MODEL, get_config("marlin_vit_tiny").replace(img_size=112), overwrite=True)
    return _save_encoder(tmp_path_factory.mktemp("ckpt") / "small.encoder.pt", CLI_MODEL)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random ViT-tiny (224 px, 16 frames) saved as an encoder-only `.pt`."""
    return _save_encoder(tmp_path_factory.mktemp("ckpt") / "tiny.encoder.pt", "marlin_vit_tiny")


@pytest.fixture(scope="module")
def synthetic_videos(tmp_path_factory):
    from marlin_jax.data.synthetic import write_video_dataset

    root = write_video_dataset(tmp_path_factory.mktemp("synth"), 2, num_frames=72,
                               with_parsing=False)
    return sorted((root / "videos").glob("*.mp4"))


def _png_size(path):
    return imread(path).shape[:2]


def test_visualize_cli_synthetic_all_windows_with_video(small_checkpoint, synthetic_videos, tmp_path,
                                                        capsys):
    video = synthetic_videos[0]  # 72 frames, sample rate 2: windows start at frames 0 and 32
    short = tmp_path / "short.mp4"  # 5 frames: padded to one clip
    write_video(short, read_frames(video, max_frames=5), fps=25)
    out = tmp_path / "out"
    rc = visualize.main([
        "--checkpoint", str(small_checkpoint), "--model", CLI_MODEL,
        "--video", str(video), str(short), "--features", "3", "100", "--output_dir", str(out),
        "--windows", "all", "--save_video", "--fps", "5", "--dpi", "60", "--batch_size", "1",
    ])  # fmt: skip  (batch size 1: one compiled shape for both videos)
    assert rc == 0
    assert "is 224x224; its frames are centre-cropped and resized to 112x112" in capsys.readouterr().err
    for stem, n_windows in ((video.stem, 2), (short.stem, 1)):
        rel = np.load(out / f"{stem}_relevance.npz")
        assert rel["relevance"].shape == (n_windows, 2, 8, 7, 7)
        for f in (3, 100):
            png = out / f"{stem}_feature{f}_window000.png"
            h, w = _png_size(png)
            assert w > 5 * h  # 2 rows x 16 frames
            mp4 = out / f"{stem}_feature{f}.mp4"
            assert count_frames(mp4) == 16 * n_windows
            assert (video_info(mp4)["width"], video_info(mp4)["height"]) == (224, 112)


def test_visualize_video_streams_long_videos(small_checkpoint, synthetic_videos, tmp_path):
    """Reading the windows a second time (a long video: clips not kept in memory) gives the
    same relevance and the same movie as keeping them; --max_windows caps the windows."""
    cam = visualize.build_gradcam(CLI_MODEL, small_checkpoint)
    outputs = {}
    for keep in (16, 0):
        out = tmp_path / f"keep{keep}"
        paths = visualize.visualize_video(cam, synthetic_videos[0], [11], out, windows="all",
                                          save_png=False, save_video=True, keep_clips=keep)
        assert sorted(p.name for p in paths) == [f"{synthetic_videos[0].stem}_feature11.mp4",
                                                 f"{synthetic_videos[0].stem}_relevance.npz"]
        outputs[keep] = (np.load(paths[0])["relevance"], read_frames(paths[1]))
    np.testing.assert_array_equal(outputs[16][0], outputs[0][0])
    np.testing.assert_array_equal(outputs[16][1], outputs[0][1])
    assert outputs[0][1].shape[0] == 32  # 2 windows x 16 frames
    paths = visualize.visualize_video(cam, synthetic_videos[0], [11], tmp_path / "cap",
                                      windows="all", max_windows=1, dpi=40)
    assert np.load(paths[0])["relevance"].shape[0] == 1
    assert [p.name for p in paths[1:]] == [f"{synthetic_videos[0].stem}_feature11_window000.png"]


def test_visualize_cli_errors(small_checkpoint, synthetic_videos, tmp_path, capsys):
    with pytest.raises(SystemExit):
        visualize.main(["--checkpoint", str(small_checkpoint), "--model", CLI_MODEL,
                        "--video", str(synthetic_videos[0]), "--features", "999",
                        "--output_dir", str(tmp_path)])
    assert "out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        visualize.main(["--checkpoint", str(tmp_path / "none.pt"), "--model", CLI_MODEL,
                        "--video", "x.mp4", "--features", "1", "--output_dir", str(tmp_path)])
    assert "cannot load the model" in capsys.readouterr().err
    missing = tmp_path / "missing.mp4"
    rc = visualize.main(["--checkpoint", str(small_checkpoint), "--model", CLI_MODEL,
                         "--video", str(missing), "--features", "1", "--output_dir", str(tmp_path)])
    assert rc == 1 and "missing.mp4: no such file" in capsys.readouterr().err


def test_compare_cli_synthetic(small_checkpoint, synthetic_videos, tmp_path):
    out = tmp_path / "cmp"
    rc = compare.main([
        "--checkpoint", str(small_checkpoint), "--model", CLI_MODEL,
        "--pre", str(synthetic_videos[0]), "--post", str(synthetic_videos[1]),
        "--features", "7", "42", "--output_dir", str(out), "--dpi", "60", "--frames_shown", "8",
    ])  # fmt: skip
    assert rc == 0
    data = np.load(out / "compare_relevance.npz")
    assert data["relevance"].shape == (2, 2, 8, 7, 7) and data["values"].shape == (2, 2)
    for f in (7, 42):
        h, w = _png_size(out / f"compare_feature{f}.png")
        assert 1.5 < w / h < 2.5  # 4 rows x 8 frames
    summary = tmp_path / "summary.json"  # as written by the statistics CLI
    summary.write_text(json.dumps({"levels": {"clip": {"top_features": [9, 1, 4]},
                                              "video": {"top_features": [7, 42, 3]}}}))
    assert visualize.top_features_from_summary(summary, 2) == [7, 42]
    assert compare.main([
        "--checkpoint", str(small_checkpoint), "--model", CLI_MODEL,
        "--pre", str(synthetic_videos[0]), "--post", str(synthetic_videos[1]),
        "--top_features_from", str(summary), "--output_dir", str(out), "--window", "5",
    ]) == 1  # fmt: skip  (the 72-frame videos have windows 0 and 1 only)
    summary.write_text("{}")
    with pytest.raises(ValueError, match="not a statistics summary"):
        visualize.top_features_from_summary(summary, 2)


@pytest.mark.samples
@pytest.mark.slow
def test_heatmap_clis_on_sample_videos(tiny_checkpoint, samples_dir, tmp_path):
    """Real videos: a short crop (padded), a long crop (all windows), an in-the-wild 480x360
    video (centre-cropped), and a pre/post comparison at 300 dpi."""
    out = tmp_path / "vis"
    rc = visualize.main([
        "--checkpoint", str(tiny_checkpoint), "--model", "marlin_vit_tiny",
        "--video", str(samples_dir / "cropped04.mp4"), str(samples_dir / "cropped01.mp4"),
        str(samples_dir / "video01.mp4"), "--features", "5", "--output_dir", str(out),
        "--windows", "all", "--dpi", "100",
    ])  # fmt: skip
    assert rc == 0
    # cropped01: 143 frames -> marlin-pytorch windows range(0, 143 - 32, 32) = 4
    assert np.load(out / "cropped01_relevance.npz")["relevance"].shape[0] == 4
    assert np.load(out / "cropped04_relevance.npz")["relevance"].shape[0] == 1
    assert (out / "video01_feature5_window000.png").exists()
    rc = compare.main([
        "--checkpoint", str(tiny_checkpoint), "--model", "marlin_vit_tiny",
        "--pre", str(samples_dir / "cropped01.mp4"), "--post", str(samples_dir / "cropped04.mp4"),
        "--features", "5", "--output_dir", str(tmp_path / "cmp"),
    ])  # fmt: skip
    assert rc == 0
    h, w = _png_size(tmp_path / "cmp" / "compare_feature5.png")
    assert w >= 4000  # 16 one-inch tiles at 300 dpi
