"""Attention implementations: splash (the Pallas TPU kernel, interpreted on CPU) against the XLA
path, forward and gradients; the same under a device mesh; ``"auto"`` resolution."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from marlin_jax.extract import resolve_attention_impl
from marlin_jax.models import MarlinModel, get_config
from marlin_jax.models.layers import Attention, Block, fused_attention, splash_attention, splash_block_size

ROOT = Path(__file__).resolve().parent.parent
ATOL = 1e-5


def _max_diff(a, b) -> float:
    """max |a - b| over the leaves, each relative to max(1, max |b|) of its leaf (float32 sums of
    gradients of size ~100 are only exact to ~1e-5 absolute)."""
    return max(float(jnp.max(jnp.abs(x - y)) / jnp.maximum(1.0, jnp.max(jnp.abs(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _value_and_grads(module: nnx.Module, x: jax.Array, fn):
    """fn(module, x) -> scalar; its value and gradients w.r.t. the parameters and ``x``."""
    graphdef, state = nnx.split(module)
    loss = jax.jit(jax.value_and_grad(lambda s, x: fn(nnx.merge(graphdef, s), x), argnums=(0, 1)))
    return loss(state, x)


def test_splash_block_sizes_divide_the_padded_length():
    assert splash_block_size(1664) == 128  # 1568 decoder tokens
    assert splash_block_size(256) == 256  # 156 visible encoder tokens
    assert splash_block_size(1536) == 512


@pytest.mark.parametrize("n", [128, 156])
def test_splash_kernel_pads_and_masks_the_sequence(n):
    """Tokens padded to a multiple of 128 never receive attention; padded queries are dropped."""
    q, k, v = jax.random.normal(jax.random.key(n), (3, 2, 2, n, 64))
    out = jax.jit(lambda q, k, v: splash_attention(q, k, v, interpret=True))(q, k, v)
    weights = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k), axis=-1)
    want = jnp.einsum("bhqk,bhkd->bhqd", weights, v)
    assert out.shape == (2, 2, n, 64)
    assert float(jnp.max(jnp.abs(out - want))) < ATOL


@pytest.mark.parametrize("n", [3, 156])
def test_fused_attention_pads_odd_lengths(n):
    """cuDNN's training kernel needs an even length: an odd one is padded by a masked key and a
    dropped query, which changes nothing (run here with the same padding through XLA)."""
    q, k, v = jax.random.normal(jax.random.key(n), (3, 2, n, 2, 64))

    def loss(q, k, v, fused):
        out = fused_attention(q, k, v, scale=0.125, implementation="xla") if fused else \
            jax.nn.dot_product_attention(q, k, v, scale=0.125)
        return jnp.sum(out * jnp.cos(out)), out

    (_, got), got_grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, True)
    (_, want), want_grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, False)
    assert got.shape == (2, n, 2, 64)
    assert _max_diff(got, want) < ATOL and _max_diff(got_grads, want_grads) < ATOL


@pytest.mark.parametrize("cls", [Attention, Block])
def test_splash_matches_xla_forward_and_gradients(cls):
    dim, heads, n = 128, 2, 150  # head_dim 64 as in MARLIN; 150 tokens pad to 256
    modules = {impl: cls(dim, heads, attention_impl=impl, rngs=nnx.Rngs(0)) for impl in (None, "splash")}
    for module in modules.values():  # non-zero q/v biases
        attn = module if cls is Attention else module.attn
        attn.q_bias.set_value(0.5 * jax.random.normal(jax.random.key(1), (dim,)))
        attn.v_bias.set_value(0.5 * jax.random.normal(jax.random.key(2), (dim,)))
    x = jax.random.normal(jax.random.key(3), (2, n, dim))
    ct = jax.random.normal(jax.random.key(4), (2, n, dim))
    # parameter trees (hence checkpoints) do not depend on the implementation
    assert (jax.tree.structure(nnx.state(modules[None])) == jax.tree.structure(nnx.state(modules["splash"])))
    results = {impl: _value_and_grads(m, x, lambda m, x: jnp.sum(m(x) * ct)) for impl, m in modules.items()}
    np.testing.assert_allclose(modules["splash"](x), modules[None](x), atol=ATOL, rtol=0)
    (ref, (ref_params, ref_x)), (got, (got_params, got_x)) = results[None], results["splash"]
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert _max_diff(got_x, ref_x) < ATOL
    assert _max_diff(got_params, ref_params) < ATOL
    assert float(jnp.max(jnp.abs(ref_x))) > 1e-2  # the comparison is not vacuous


def test_splash_with_bf16_matmuls_is_close_to_xla():
    x = jax.random.normal(jax.random.key(0), (2, 100, 128))
    outs = [Attention(128, 2, matmul_dtype=jnp.bfloat16, attention_impl=impl, rngs=nnx.Rngs(0))(x)
            for impl in (None, "splash")]
    assert outs[1].dtype == jnp.float32
    np.testing.assert_allclose(outs[1], outs[0], atol=3e-2, rtol=0)


def test_splash_refuses_attention_dropout():
    with pytest.raises(ValueError, match="dropout"):
        Attention(64, 2, attn_drop=0.1, attention_impl="splash", rngs=nnx.Rngs(0))


@pytest.mark.slow  # ~13 s: two models built eagerly, the kernel interpreted
def test_full_model_with_splash_matches_xla():
    """MarlinModel forward (encoder on k visible tokens, decoder on all) and a loss gradient."""
    config = get_config("marlin_vit_tiny").replace(img_size=32, n_frames=4, encoder_depth=2, decoder_depth=1)
    models = {impl: MarlinModel(config, rngs=nnx.Rngs(0), attention_impl=impl) for impl in (None, "splash")}
    assert (jax.tree.structure(nnx.state(models[None])) == jax.tree.structure(nnx.state(models["splash"])))
    rng = np.random.default_rng(0)
    video = jnp.asarray(rng.random((2, 4, 32, 32, 3), dtype=np.float32))
    mask = np.zeros((2, config.num_tokens), bool)
    for row in mask:
        row[rng.choice(config.num_tokens, 3, replace=False)] = True
    mask = jnp.asarray(mask)

    def loss(model, video):
        return jnp.mean(model(video, mask, 3) ** 2)

    (ref, (ref_params, ref_video)) = _value_and_grads(models[None], video, loss)
    (got, (got_params, got_video)) = _value_and_grads(models["splash"], video, loss)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert _max_diff(got_params, ref_params) < ATOL
    assert _max_diff(got_video, ref_video) < ATOL
    np.testing.assert_allclose(models["splash"].extract_features(video, keep_seq=True),
                               models[None].extract_features(video, keep_seq=True), atol=ATOL, rtol=0)


_MESH = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding
    from marlin_jax import sharding as shd
    from marlin_jax.models.layers import Block

    assert jax.device_count() == 4, jax.devices()
    mesh = shd.make_mesh({"data": 2, "tensor": 2})
    dim, heads = 128, 4
    graphdef, state = nnx.split(Block(dim, heads, attention_impl="splash", rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (4, 140, dim))

    def loss(state, x):
        return jnp.mean(nnx.merge(graphdef, state)(x) ** 2)

    def run(state, x):
        return nnx.merge(graphdef, state)(x), jax.grad(loss, argnums=(0, 1))(state, x)

    ref = jax.jit(run)(state, x)
    with jax.set_mesh(mesh):
        shardings = jax.tree_util.tree_map_with_path(  # nnx.State paths end in /value
            lambda p, v: NamedSharding(mesh, shd.spec_for(shd.path_str(p).removesuffix("/value"),
                                                          v.shape, mesh)), state)
        sharded_state = jax.device_put(state, shardings)
        xs = jax.device_put(x, shd.batch_sharding(mesh, 3))
        fn = jax.jit(run)
        text = fn.lower(sharded_state, xs).as_text()
        assert "manual_computation" in text or "SPMDFullToShardShape" in text  # the shard_map
        got = fn(sharded_state, xs)
    qkv = sharded_state["attn"]["qkv"]["kernel"][...]
    assert tuple(qkv.sharding.spec) == (None, None, "tensor"), qkv.sharding.spec  # heads split
    err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)))
    assert err < 1e-5, err
    print("OK", err)
""")


def test_splash_under_a_data_x_tensor_mesh_matches_unsharded():
    """Under ``jax.set_mesh`` (data=2 x tensor=2 CPU devices) splash runs inside shard_map over
    batch and heads; forward and gradients equal the single-device result."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _MESH], env=env, cwd=ROOT, text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "OK" in proc.stdout


def test_auto_attention_impl_per_backend(monkeypatch):
    assert resolve_attention_impl("xla") == "xla"
    assert resolve_attention_impl(None) is None
    for backend, dtype, want in [("cpu", None, "per_head"), ("tpu", None, "splash"),
                                 ("gpu", jnp.bfloat16, "cudnn"), ("gpu", jnp.float32, "xla"),
                                 ("rocm", None, "xla")]:
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert resolve_attention_impl("auto", dtype) == want, backend
    # training picks through the same rule: batched XLA on CPU, no cuDNN for float32 activations
    from marlin_jax.train.program import attention_impl

    assert attention_impl("", "cpu", jnp.float32) is None
    assert attention_impl("", "tpu", jnp.bfloat16) == "splash"
    assert attention_impl("", "gpu", jnp.bfloat16) == "cudnn"
    assert attention_impl("", "gpu", jnp.float32) == "xla"
    assert attention_impl("per_head", "gpu", jnp.bfloat16) == "per_head"


@pytest.mark.slow  # ~8 s: libtpu topology + two TPU compiles
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu for TPU compiles")
def test_splash_compiles_the_real_kernel_for_a_tpu_mesh():
    """Under a mesh of (abstract) v5e devices the kernel is compiled for the TPU (a Mosaic custom
    call), not interpreted, forward and backward."""
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from marlin_jax import sharding as shd

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    mesh = Mesh(np.asarray(devices).reshape(2, 1, 2), ("data", "fsdp", "tensor"))
    for impl in ("xla", "splash"):
        graphdef, state = nnx.split(Attention(256, 4, dtype=jnp.bfloat16, attention_impl=impl,
                                              rngs=nnx.Rngs(0)))
        state = jax.tree_util.tree_map_with_path(lambda p, v: jax.ShapeDtypeStruct(
            v.shape, v.dtype, sharding=NamedSharding(mesh, shd.spec_for(
                "attn/" + shd.path_str(p).removesuffix("/value"), v.shape, mesh))), state)
        x = jax.ShapeDtypeStruct((8, 392, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P("data")))

        def loss(state, x, graphdef=graphdef):
            return jnp.mean(nnx.merge(graphdef, state)(x).astype(jnp.float32) ** 2)

        with jax.set_mesh(mesh):
            compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x).compile()
        assert ("tpu_custom_call" in compiled.as_text()) == (impl == "splash"), impl
