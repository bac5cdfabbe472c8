"""Mesh construction, partition rules, and the 8-simulated-device equivalence of the train step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from marlin_jax import sharding as shd

ROOT = Path(__file__).resolve().parent.parent


class _FakeMesh:
    """Enough of a Mesh for the rule functions (axis sizes only)."""

    def __init__(self, **shape):
        self.shape = {"data": 1, "fsdp": 1, "tensor": 1, **shape}


def test_resolve_mesh_shape():
    assert shd.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == {
        "data": 4, "fsdp": 2, "tensor": 1}
    with pytest.raises(ValueError, match="only one axis may be -1"):
        shd.resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="must be positive"):
        shd.resolve_mesh_shape({"data": 0, "fsdp": 8}, 8)
    with pytest.raises(ValueError, match="not divisible"):
        shd.resolve_mesh_shape({"data": -1, "fsdp": 3}, 8)
    with pytest.raises(ValueError, match="needs 4 devices"):
        shd.resolve_mesh_shape({"data": 2, "fsdp": 2}, 8)


def test_make_mesh_on_available_devices():
    mesh = shd.make_mesh({"data": -1})
    assert mesh.axis_names == shd.MESH_AXES
    assert mesh.shape["data"] == jax.device_count()
    with pytest.raises(ValueError, match="unknown axes"):
        shd.make_mesh({"model": 1})


@pytest.mark.parametrize("path, shape, want", [
    ("encoder/blocks/3/attn/qkv/kernel", (768, 3, 12, 64), P("fsdp", None, "tensor")),
    ("encoder/blocks/3/attn/q_bias", (768,), P("tensor")),
    ("encoder/blocks/3/attn/proj/kernel", (768, 768), P("tensor", "fsdp")),
    ("decoder/blocks/0/mlp/fc1/kernel", (384, 1536), P("fsdp", "tensor")),
    ("decoder/blocks/0/mlp/fc1/bias", (1536,), P("tensor")),
    ("encoder/blocks/0/mlp/fc2/kernel", (3072, 768), P("tensor", "fsdp")),
    ("encoder/patch_embedding/projection/kernel", (2, 16, 16, 3, 768),
     P(None, None, None, None, "fsdp")),
    ("encoder/norm/scale", (768,), P()),
    ("decoder/mask_token", (1, 1, 384), P()),
    ("discriminator/layers/0/kernel", (1536, 1536), P("fsdp", "tensor")),
    ("discriminator/layers/1/kernel", (1536, 1), P("tensor")),
    # optimizer states carry the parameter path as a suffix
    ("g_opt_state/inner_state/0/mu/encoder/blocks/0/attn/qkv/kernel", (768, 3, 12, 64),
     P("fsdp", None, "tensor")),
    ("g_opt_state/inner_state/0/count", (), P()),
])
def test_partition_rules(path, shape, want):
    assert shd.spec_for(path, shape, _FakeMesh(fsdp=4, tensor=2)) == want


def test_rules_fall_back_to_replication_when_axes_do_not_divide():
    mesh = _FakeMesh(fsdp=4, tensor=2)
    qkv = "encoder/blocks/0/attn/qkv/kernel"
    assert shd.spec_for(qkv, (6, 3, 3, 2), mesh) == P()
    assert shd.spec_for(qkv, (8, 3, 3, 2), mesh) == P("fsdp")  # 3 heads: no tensor split
    assert shd.spec_for(qkv, (6, 3, 4, 2), mesh) == P(None, None, "tensor")
    assert shd.spec_for(qkv, (8,), mesh) == P()
    assert shd.spec_for(qkv, (8, 24), mesh) == P()  # a flat (D, 3D) kernel is replicated
    # axes of size 1 are dropped so specs stay minimal
    assert shd.spec_for(qkv, (8, 3, 4, 2), _FakeMesh()) == P()


_EQUIVALENCE = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from marlin_jax import sharding as shd
    from marlin_jax.models import get_config
    from marlin_jax.train import state as st, steps

    assert jax.device_count() == 8, jax.devices()
    cfg = get_config("marlin_vit_tiny").replace(img_size=32, n_frames=4, encoder_depth=1,
                                                decoder_depth=1, encoder_num_heads=2,
                                                decoder_num_heads=2)
    tx = st.make_optimizer()
    sched = st.lr_schedule(1e-3, 1e-5, 1, 100)
    task = steps.Task(st.build_model_def(cfg), tx, tx, sched, sched,
                      steps.StepConfig(num_visible=2, gp_weight=1.0))
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(3):
        mask = np.zeros((8, 8), bool)
        for i in range(8):
            mask[i, rng.choice(8, 2, replace=False)] = True
        batches.append({"video": rng.integers(0, 256, (8, 4, 32, 32, 3), np.uint8),
                        "mask": mask})
    out = {}
    for name, axes, devices in [("one", {"data": 1}, jax.devices()[:1]),
                                ("data8", {"data": 8}, None),
                                ("2x2x2", {"data": 2, "fsdp": 2, "tensor": 2}, None)]:
        mesh = shd.make_mesh(axes, devices)
        init = lambda: st.init_train_state(cfg, tx, tx, 0)
        state = shd.sharded_init(init, mesh)
        shardings = shd.tree_shardings(state, mesh)
        bs = {"video": shd.batch_sharding(mesh, 5), "mask": shd.batch_sharding(mesh, 2)}
        step = steps.jit_train_step(task, shardings, bs, shd.replicated(mesh))
        losses = []
        for b in batches:
            state, m = step(state, shd.global_batch(b, mesh))
            losses.append([float(m[k]) for k in ("rec_loss", "adv_loss", "d_loss", "gp")])
        qkv = state.g_params["encoder"]["blocks"][0]["attn"]["qkv"]["kernel"]
        out[name] = {"losses": losses, "qkv_spec": str(qkv.sharding.spec),
                     "qkv_shards": len(qkv.addressable_shards)}
    print("RESULT" + json.dumps(out))
""")


def _run_with_devices(script: str, n: int, timeout: int = 900) -> str:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_loss_is_the_same_on_1_device_data8_and_2x2x2_mesh():
    out = _run_with_devices(_EQUIVALENCE, 8)
    result = json.loads(out.split("RESULT", 1)[1])
    ref = np.asarray(result["one"]["losses"])
    assert np.isfinite(ref).all()
    for name in ("data8", "2x2x2"):
        np.testing.assert_allclose(result[name]["losses"], ref, rtol=1e-5, atol=1e-5,
                                   err_msg=name)
    # the parameters really are sharded on the 3-axis mesh
    assert result["2x2x2"]["qkv_spec"] == str(P("fsdp", None, "tensor"))
    assert result["2x2x2"]["qkv_shards"] == 8
    assert result["data8"]["qkv_spec"] == str(P())


_QKV_HEADS = textwrap.dedent("""
    import jax, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding
    from marlin_jax import sharding as shd
    from marlin_jax.models.layers import Attention

    d, h, hd = 16, 4, 4
    mesh = shd.make_mesh({"tensor": 2})
    attn = Attention(d, h, rngs=nnx.Rngs(0))
    kernel = np.asarray(attn.qkv.kernel[...])
    assert kernel.shape == (d, 3, h, hd), kernel.shape
    flat = kernel.reshape(d, 3 * d)  # the (D, 3D) matrix: columns in (q|k|v, head, channel) order
    spec = shd.spec_for("encoder/blocks/0/attn/qkv/kernel", kernel.shape, mesh)
    sharded = jax.device_put(kernel, NamedSharding(mesh, spec))
    bias_spec = shd.spec_for("encoder/blocks/0/attn/q_bias", (d,), mesh)
    bias = jax.device_put(np.arange(d, dtype=np.float32), NamedSharding(mesh, bias_spec))
    seen = []
    for shard, bias_shard in zip(sharded.addressable_shards, bias.addressable_shards, strict=True):
        assert shard.device == bias_shard.device
        heads = list(range(h)[shard.index[2]])
        assert len(heads) == h // 2 and shard.data.shape == (d, 3, h // 2, hd), (heads, shard.data.shape)
        for part in range(3):  # whole heads of q, k and v
            for i, head in enumerate(heads):
                cols = flat[:, part * d + head * hd:part * d + (head + 1) * hd]
                np.testing.assert_array_equal(np.asarray(shard.data)[:, part, i], cols)
        # the q/v bias shard on that device holds the channels of the same heads
        np.testing.assert_array_equal(np.asarray(bias_shard.data),
                                      np.arange(heads[0] * hd, (heads[-1] + 1) * hd))
        seen += heads
    assert sorted(seen) == list(range(h)), seen
    print("OK")
""")


def test_tensor_parallel_qkv_shards_hold_whole_heads():
    """With tensor=2 each device's qkv kernel shard is H/2 whole heads of q, k and v (and the
    matching q/v bias channels): attention needs no resharding."""
    assert "OK" in _run_with_devices(_QKV_HEADS, 2, timeout=300)


_HOST_TO_GLOBAL = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from marlin_jax import sharding as shd

    mesh = shd.make_mesh({"data": 2, "tensor": 2})
    x = np.arange(24.0, dtype=np.float32).reshape(4, 6)
    tree = {"host": x, "device": jax.numpy.asarray(x), "scalar": np.float32(3.0)}
    shardings = {"host": NamedSharding(mesh, P("data", "tensor")), "device": NamedSharding(mesh, P(None, "tensor")),
                 "scalar": shd.replicated(mesh)}
    out = shd.host_to_global(tree, shardings)
    for name, value in out.items():
        assert value.sharding == shardings[name] and value.shape == np.shape(tree[name]), name
        for shard in value.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(tree[name])[shard.index])
    print("OK")
""")


def test_host_to_global_copies_each_devices_shard():
    """Host values (numpy, jax or scalars) become global arrays with the given shardings, each
    device holding exactly its slice."""
    assert "OK" in _run_with_devices(_HOST_TO_GLOBAL, 4, timeout=300)
