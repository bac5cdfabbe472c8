"""`config.init_from`: start pretraining from a VideoMAE checkpoint or resume from the original
trainer's PyTorch Lightning `.ckpt` (parameters + step)."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from flax import nnx

from marlin_jax.interop import model_to_state_dict
from marlin_jax.interop.torch_format import save_torch_file
from marlin_jax.models import MarlinModel, get_config
from marlin_jax.train import state as st
from marlin_jax.train.trainer import load_init_params

pytestmark = pytest.mark.slow  # builds and initialises models (~30 s CPU)

CFG = get_config("marlin_vit_tiny").replace(img_size=32, n_frames=4, encoder_depth=1,
                                            decoder_depth=1)

_TO_VIDEOMAE = (
    (r"^encoder\.patch_embedding\.projection\.", "encoder.patch_embed.proj."),
    (r"\.mlp\.layers\.0\.linear\.", ".mlp.fc1."),
    (r"\.mlp\.layers\.1\.linear\.", ".mlp.fc2."),
    (r"^enc_dec_proj\.", "encoder_to_decoder."),
    (r"^decoder\.mask_token$", "mask_token"),
)


@pytest.fixture(scope="module")
def source():
    """A trained-looking source model (seed 7) and fresh init params (seed 0)."""
    model = MarlinModel(CFG, rngs=nnx.Rngs(7), with_decoder=True, with_discriminator=True)
    fresh_g, fresh_d = jax.jit(lambda: st.init_params(CFG, jax.random.PRNGKey(0)))()
    return model, jax.device_get(fresh_g), jax.device_get(fresh_d)


def _pure(model):
    return st.split_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _assert_tree_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_init_from_videomae_loads_the_autoencoder_and_keeps_a_fresh_critic(source, tmp_path):
    model, fresh_g, fresh_d = source
    sd = {}
    for key, value in model_to_state_dict(model).items():
        if key.startswith("discriminator.") or "pos_embedding" in key:
            continue  # VideoMAE has no critic and keeps its sin-cos tables out
        for pattern, repl in _TO_VIDEOMAE:
            key = re.sub(pattern, repl, key)
        sd[key] = value
    path = tmp_path / "videomae_pretrain.pth"
    save_torch_file(path, {"model": sd})

    g, d, step = load_init_params(str(path), CFG, fresh_g, fresh_d)
    want_g, _ = _pure(model)
    _assert_tree_equal(g, want_g)
    _assert_tree_equal(d, fresh_d)
    assert step == 0


def test_resume_from_a_lightning_ckpt_loads_both_models_and_the_step(source, tmp_path):
    model, fresh_g, fresh_d = source
    path = tmp_path / "marlin_vit_tiny-epoch=3.ckpt"
    save_torch_file(path, {"epoch": 3, "global_step": 20,
                           "state_dict": model_to_state_dict(model)})
    g, d, step = load_init_params(str(path), CFG, fresh_g, fresh_d, updates_per_batch=2)
    want_g, want_d = _pure(model)
    _assert_tree_equal(g, want_g)
    _assert_tree_equal(d, want_d)
    assert step == 10  # Lightning counted 2 optimiser steps per batch


def test_init_from_a_checkpoint_of_another_model_names_the_file(source, tmp_path):
    model, fresh_g, fresh_d = source
    other = get_config("marlin_vit_tiny").replace(img_size=32, n_frames=4)  # deeper
    path = tmp_path / "other.pt"
    save_torch_file(path, model_to_state_dict(model))
    deeper_g, deeper_d = jax.jit(lambda: st.init_params(other, jax.random.PRNGKey(0)))()
    with pytest.raises(ValueError, match="other.pt"):
        load_init_params(str(path), other, deeper_g, deeper_d)
