"""Model configs, registry and the pure helpers of the Flax model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from marlin_jax.models import (
    MarlinConfig,
    MarlinModel,
    config_from_yaml,
    get_config,
    model_names,
    patchify,
    register_model,
    register_model_from_config,
    register_model_from_yaml,
    sincos_table,
    split_by_mask,
    unpatchify,
)

TINY = get_config("marlin_vit_tiny").replace(img_size=32, n_frames=4, encoder_depth=2, decoder_depth=1)

ORIGINAL_YAML = """
model_name: "marlin_vit_base"
img_size: 224
patch_size: 16
clip_frames: 16
tubelet_size: 2
mask_strategy: "fasking"
temporal_sample_rate: 2
mask_percentage_target: 0.9
mlp_ratio: 4.0
qkv_bias: true
qk_scale: null
drop_rate: 0.0
attn_drop_rate: 0.0
norm_layer: "LayerNorm"
init_values: 0.0
adv_loss: true
adv_weight: 0.01
gp_weight: 0.0
encoder:
  embed_dim: 768
  depth: 12
  num_heads: 12
decoder:
  embed_dim: 384
  depth: 4
  num_heads: 6
"""


def test_released_sizes():
    expected = {"marlin_vit_small_ytf": (384, 12, 6, 192, 4, 3), "marlin_vit_base_ytf": (768, 12, 12, 384, 4, 6),
                "marlin_vit_large_ytf": (1024, 24, 16, 512, 12, 8)}
    for name, dims in expected.items():
        c = get_config(name)
        assert (c.encoder_embed_dim, c.encoder_depth, c.encoder_num_heads, c.decoder_embed_dim, c.decoder_depth,
                c.decoder_num_heads) == dims
        assert c.grid == (8, 14, 14) and c.num_tokens == 1568 and c.patch_dim == 1536 and c.downloadable
    assert set(expected) <= set(model_names())
    with pytest.raises(ValueError, match="unknown model 'nope'.*marlin_vit_base_ytf"):
        get_config("nope")


def test_register_from_yaml_and_ml_collections(tmp_path):
    path = tmp_path / "marlin_vit_base.yaml"
    path.write_text(ORIGINAL_YAML)
    assert register_model_from_yaml("from_yaml", path) == get_config("marlin_vit_base_ytf").replace(downloadable=False)
    cfg = ml_collections.ConfigDict({"name": "marlin_vit_small_ytf", "encoder_depth": 6})
    assert register_model_from_config("from_cd", cfg).encoder_depth == 6
    assert get_config("from_cd").encoder_embed_dim == 384
    with pytest.raises(ValueError, match="unknown model config fields: \\['depth'\\]"):
        register_model_from_config("bad", {"depth": 3})
    (tmp_path / "broken.yaml").write_text("img_size: 224\n")
    with pytest.raises(ValueError, match="broken.yaml: missing key 'patch_size'"):
        config_from_yaml(tmp_path / "broken.yaml")
    with pytest.raises(ValueError, match="already registered"):
        register_model("marlin_vit_base_ytf", get_config("marlin_vit_small_ytf"))
    with pytest.raises(ValueError, match="not divisible"):
        MarlinConfig(encoder_embed_dim=100, encoder_num_heads=3)


@pytest.mark.oracle
def test_sincos_table_equals_reference(marlin_pytorch):
    from marlin_pytorch.model.positional_embedding import SinCosPositionalEmbedding

    ref = SinCosPositionalEmbedding((1568, 768), dropout_rate=0.0).emb.numpy()[0]
    # the reference rounds its angles to float32 (see sincos_table); early positions agree closely
    np.testing.assert_allclose(sincos_table(1568, 768), ref, atol=3e-4, rtol=0)
    np.testing.assert_allclose(sincos_table(1568, 768)[:64], ref[:64], atol=1e-5, rtol=0)


def test_patchify_round_trip_and_order():
    video = jnp.asarray(np.random.default_rng(0).random((2, 4, 32, 32, 3), np.float32))
    patches = patchify(video)
    assert patches.shape == (2, 2 * 2 * 2, 1536)
    np.testing.assert_array_equal(unpatchify(patches, (2, 2, 2)), video)
    # token 1 is (t=0, h=0, w=1); its first pixel values are channel 0 of frame 0, row 0, cols 16..
    np.testing.assert_array_equal(patches[0, 1, :16], video[0, 0, 0, 16:32, 0])


def test_masked_forward_shapes_and_mask_errors():
    model = MarlinModel(TINY, rngs=nnx.Rngs(0), with_discriminator=True)
    video = jnp.zeros((2, 4, 32, 32, 3))
    mask = np.zeros((2, TINY.num_tokens), bool)
    mask[:, [1, 5]] = True
    pred = model(video, jnp.asarray(mask))
    assert pred.shape == (2, TINY.num_tokens - 2, TINY.patch_dim)
    assert model.discriminator(pred).shape == (2, TINY.num_tokens - 2, 1)
    vis, masked = split_by_mask(jnp.asarray(mask), 2)
    np.testing.assert_array_equal(vis, [[1, 5], [1, 5]])
    assert masked.shape == (2, 6) and list(masked[0]) == [0, 2, 3, 4, 6, 7]
    uneven = mask.copy()
    uneven[0, 0] = True
    with pytest.raises(ValueError, match="same number of visible tokens"):
        model(video, jnp.asarray(uneven))
    with pytest.raises(ValueError, match="pass num_visible"):
        nnx.jit(lambda m, v, k: m(v, k))(model, video, jnp.asarray(mask))
    encoder_only = MarlinModel(TINY, rngs=nnx.Rngs(0), with_decoder=False)
    with pytest.raises(ValueError, match="no decoder"):
        encoder_only(video, jnp.asarray(mask))


def test_bf16_compute_and_remat_stay_close():
    model = MarlinModel(TINY, rngs=nnx.Rngs(0))
    video = jnp.asarray(np.random.default_rng(0).random((1, 4, 32, 32, 3), np.float32))
    ref = model.extract_features(video, keep_seq=False)
    state = nnx.state(model)
    bf16 = MarlinModel(TINY, rngs=nnx.Rngs(1), dtype=jnp.bfloat16)
    nnx.update(bf16, state)
    assert np.max(np.abs(np.asarray(bf16.extract_features(video, keep_seq=False), np.float32) - ref)) < 0.1
    remat = MarlinModel(TINY, rngs=nnx.Rngs(1), remat_policy="full")
    nnx.update(remat, state)
    grads = [jax.grad(lambda v, m=m: m.extract_features(v, keep_seq=False).sum())(video) for m in (model, remat)]
    np.testing.assert_allclose(grads[0], grads[1], atol=1e-5)


def test_bf16_matmul_mode_keeps_float32_activations():
    model = MarlinModel(TINY, rngs=nnx.Rngs(0), with_discriminator=True)
    fast = MarlinModel(TINY, rngs=nnx.Rngs(1), with_discriminator=True, matmul_dtype=jnp.bfloat16)
    nnx.update(fast, nnx.state(model))
    video = jnp.asarray(np.random.default_rng(0).random((1, 4, 32, 32, 3), np.float32))
    ref, out = model.extract_features(video), fast.extract_features(video)
    assert out.dtype == jnp.float32
    assert 0 < float(jnp.max(jnp.abs(out - ref))) < 0.1
    mask = jnp.asarray(np.arange(TINY.num_tokens)[None] < 3)
    assert fast(video, mask, 3).dtype == jnp.float32


def test_per_head_attention_equals_batched_attention_and_gradients():
    model = MarlinModel(TINY, rngs=nnx.Rngs(0), with_discriminator=False)
    looped = MarlinModel(TINY, rngs=nnx.Rngs(1), with_discriminator=False, attention_impl="per_head")
    nnx.update(looped, nnx.state(model))
    video = jnp.asarray(np.random.default_rng(0).random((2, 4, 32, 32, 3), np.float32))
    mask = jnp.asarray(np.stack([np.arange(TINY.num_tokens) < 3, np.arange(TINY.num_tokens) >= TINY.num_tokens - 3]))
    for m in (model, looped):
        assert m(video, mask, 3).shape == (2, TINY.num_tokens - 3, TINY.patch_dim)
    np.testing.assert_allclose(looped(video, mask, 3), model(video, mask, 3), atol=1e-6)
    np.testing.assert_allclose(looped.extract_features(video), model.extract_features(video), atol=1e-6)
    grads = [jax.grad(lambda v, m=m: (m(v, mask, 3) ** 2).sum())(video) for m in (model, looped)]
    np.testing.assert_allclose(grads[1], grads[0], atol=1e-6)


def test_unknown_attention_impl_is_refused():
    with pytest.raises(ValueError, match="attention_impl"):
        MarlinModel(TINY, rngs=nnx.Rngs(0), attention_impl="flash")
