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

from marlin_jax.evaluation.datasets import LabelSet
from marlin_jax.evaluation.finetune import FineTuneClassifier, effective_batch_size
from marlin_jax.models import MarlinEncoder, get_config, video_to_float
from marlin_jax.sharding import make_mesh
from marlin_jax.video_io import write_video

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
    np.testing.assert_allclose(np.asarray(video_to_float(x)), [[0.0, 1.0]])
    mesh = make_mesh({"data": -1})
    assert effective_batch_size(32, 10, mesh) == 10 // mesh.size * mesh.size


SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from marlin_jax.evaluation.finetune import FineTuneClassifier, _Sharded
    from marlin_jax.evaluation.training import FitOptions
    from marlin_jax.models import MarlinEncoder, get_config, video_to_float
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


def test_token_pooling_head_reads_every_token():
    encoder = MarlinEncoder(tiny_config(), rngs=nnx.Rngs(0))
    model = FineTuneClassifier(encoder, 3, rngs=nnx.Rngs(1), pooling="tokens")
    x = jnp.asarray(np.random.default_rng(0).random((2, 4, 32, 32, 3)), jnp.float32)
    tokens = encoder.extract_features(x, keep_seq=True)  # (B, N, D), each token normed
    assert model.head.kernel.shape == (tokens.shape[1] * tokens.shape[2], 3)
    want = tokens.reshape(2, -1) @ model.head.kernel[...] + model.head.bias[...]
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(want), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pooling must be"):
        FineTuneClassifier(encoder, 3, rngs=nnx.Rngs(1), pooling="max")


def test_folded_standardisation_is_the_same_linear_map():
    from marlin_jax.evaluation.finetune import fold_standardization
    from marlin_jax.evaluation.probe import make_linear_head

    rng = np.random.default_rng(0)
    x = (3.0 + 0.5 * rng.normal(size=(40, 6))).astype(np.float32)
    head = make_linear_head(x, 2, standardize=True, seed=3)
    kernel, bias = fold_standardization(head)
    np.testing.assert_allclose(x @ kernel + bias, np.asarray(head(jnp.asarray(x))), rtol=1e-4,
                               atol=1e-4)
    plain = make_linear_head(x, 2)
    np.testing.assert_array_equal(fold_standardization(plain)[0], np.asarray(plain.head.kernel))


def _clip_split(root: Path, names, rng) -> LabelSet:
    """Random 8-frame 32 px videos with alternating binary labels."""

    paths = []
    for name in names:
        path = root / f"{name}.mp4"
        write_video(path, rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8))
        paths.append(str(path))
    labels = np.arange(len(names)) % 2 == 0
    return LabelSet(tuple(names), labels, "binary", ("y",), tuple(paths))


@pytest.mark.slow
def test_lp_ft_starts_fine_tuning_from_the_probe(tmp_path):
    """LP-FT: the head begins as the linear probe of the initial features, so an epoch at
    learning rate 0 validates exactly as the probe did; a resumed run does not probe again."""
    from marlin_jax.evaluation.datasets import ClipDataset
    from marlin_jax.evaluation.finetune import train_finetune
    from marlin_jax.evaluation.training import FitOptions

    rng = np.random.default_rng(0)
    train = ClipDataset(_clip_split(tmp_path, [f"t{i}" for i in range(8)], rng), 4, 2, 32)
    val = ClipDataset(_clip_split(tmp_path, [f"v{i}" for i in range(10)], rng), 4, 2, 32)
    frozen = FitOptions(learning_rate=0.0, stop_lr=-1.0, max_epochs=1, batch_size=4)
    probe = FitOptions(learning_rate=1e-2, max_epochs=30, batch_size=4)
    for pooling in ("mean", "tokens"):
        logs = []
        encoder = MarlinEncoder(tiny_config(), rngs=nnx.Rngs(0))
        work = tmp_path / pooling
        _, result, _ = train_finetune(
            encoder, train, val, task="binary", num_outputs=1, options=frozen,
            checkpoint_dir=work / "best", state_dir=work / "state", pooling=pooling,
            lp_ft=probe, num_threads=1, log=logs.append)
        line = next(s for s in logs if s.startswith("LP-FT"))
        dim = 192 * (tiny_config().num_tokens if pooling == "tokens" else 1)
        assert f"({dim}-d;" in line
        probe_auroc = float(line.rsplit("val_auroc ", 1)[1].rstrip(")"))
        # (AUROCs of 5 + 5 samples are multiples of 1/25: 4 decimals agreeing is equality)
        assert result.history[0]["val_auroc"] == pytest.approx(probe_auroc, abs=6e-5)
        logs = []
        again = train_finetune(
            MarlinEncoder(tiny_config(), rngs=nnx.Rngs(0)), train, val, task="binary",
            num_outputs=1, options=frozen, checkpoint_dir=work / "best",
            state_dir=work / "state", pooling=pooling, lp_ft=probe, num_threads=1,
            log=logs.append)[1]
        assert again.already_finished and not any(s.startswith("LP-FT") for s in logs)
