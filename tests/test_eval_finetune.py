"""Fine-tuning: the classifier's semantics and the sharded step (one device vs a 2x2 mesh)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from marlin_jax.evaluation.finetune import FineTuneClassifier, effective_batch_size, to_unit_float
from marlin_jax.models import MarlinEncoder, get_config
from marlin_jax.sharding import make_mesh

ROOT = Path(__file__).resolve().parent.parent


def tiny_config():
    return get_config("marlin_vit_tiny").replace(img_size=32, n_frames=4, encoder_depth=1)


def test_classifier_is_head_on_pooled_normed_features():
    encoder = MarlinEncoder(tiny_config(), rngs=nnx.Rngs(0))
    model = FineTuneClassifier(encoder, 5, rngs=nnx.Rngs(1))
    x = jnp.asarray(np.random.default_rng(0).random((2, 4, 32, 32, 3)), jnp.float32)
    feats = encoder.extract_features(x, keep_seq=False)  # mean-pool, then norm (original)
    want = feats @ model.head.kernel[...] + model.head.bias[...]
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert model(x).shape == (2, 5)
    bound = 1 / np.sqrt(192)  # torch.nn.Linear initialisation
    assert np.abs(np.asarray(model.head.kernel[...])).max() <= bound


def test_uint8_scaling_and_batch_size():
    x = jnp.asarray([[0, 255]], jnp.uint8)
    np.testing.assert_allclose(np.asarray(to_unit_float(x)), [[0.0, 1.0]])
    mesh = make_mesh({"data": -1})
    assert effective_batch_size(32, 10, mesh) == 10 // mesh.size * mesh.size


SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from marlin_jax.evaluation.finetune import FineTuneClassifier, _Sharded
    from marlin_jax.evaluation.training import FitOptions
    from marlin_jax.models import MarlinEncoder, get_config
    from marlin_jax.sharding import make_mesh

    cfg = get_config("marlin_vit_tiny").replace(img_size=32, n_frames=4, encoder_depth=1)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, 4, 32, 32, 3), dtype=np.uint8)
    y = (rng.random((8, 3)) < 0.5).astype(np.float32)
    out = {}
    for name, mesh in [("one", make_mesh({"data": 1}, devices=jax.devices()[:1])),
                       ("mesh", make_mesh({"data": 2, "fsdp": 2}))]:
        model = FineTuneClassifier(MarlinEncoder(cfg, rngs=nnx.Rngs(0)), 3, rngs=nnx.Rngs(1))
        s = _Sharded(model, "multilabel", FitOptions(), mesh)
        params, opt = s.params, s.init_opt(s.params)
        losses = []
        for _ in range(2):
            xs, ys = s.put(x, y)
            params, opt, loss = s.step(params, opt, s.rest, xs, ys, jnp.float32(1e-3))
            losses.append(float(loss))
        qkv = params["encoder"]["blocks"][0]["attn"]["qkv"]["kernel"]
        out[name] = (losses, np.asarray(jax.device_get(qkv)), tuple(qkv.sharding.spec))
    np.testing.assert_allclose(out["one"][0], out["mesh"][0], rtol=1e-5)
    # Adam normalises tiny gradients: allow 5% of one 1e-3 update of reduction-order noise
    np.testing.assert_allclose(out["one"][1], out["mesh"][1], rtol=1e-4, atol=5e-5)
    print("SPEC", *out["mesh"][2])
""")


@pytest.mark.slow
def test_sharded_step_matches_single_device():
    """Two steps over a (data=2, fsdp=2) mesh equal the single-device steps; parameters stay
    sharded by the trainer's rules."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SPEC fsdp" in proc.stdout  # the qkv kernel is FSDP-sharded by MARLIN_RULES
