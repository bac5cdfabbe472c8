"""Numerical parity of the Flax model with marlin-pytorch 0.3.4 (the oracle), random weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from marlin_jax.interop import model_from_state_dict
from marlin_jax.models import get_config
from tests.oracle_utils import build_torch_discriminator, build_torch_marlin, random_mask, to_numpy_state_dict

pytestmark = pytest.mark.oracle
TOL = 1e-4


def _run_parity(mp, name: str, batch: int = 2, attention_impl: str | None = None):
    import torch

    config = get_config(name)
    torch_model = build_torch_marlin(mp, config, full=True)
    torch_disc = build_torch_discriminator(config)
    state_dict = to_numpy_state_dict(("", torch_model), ("discriminator.", torch_disc))
    model = model_from_state_dict(config, state_dict, attention_impl=attention_impl)

    rng = np.random.default_rng(0)
    video = rng.random((batch, config.n_frames, config.img_size, config.img_size, 3), dtype=np.float32)
    k = config.num_tokens // 10
    mask = random_mask(batch, config.num_tokens, k)
    video_t = torch.from_numpy(video).permute(0, 4, 1, 2, 3).contiguous()
    mask_t = torch.from_numpy(mask)

    with torch.no_grad():
        ref = {
            "seq": torch_model.extract_features(video_t, keep_seq=True).numpy(),
            "pooled": torch_model.extract_features(video_t, keep_seq=False).numpy(),
            "masked_encoder": torch_model.encoder(video_t, mask_t).numpy(),
            "reconstruction": torch_model(video_t, mask_t).numpy(),
        }
        patches = rng.random((batch, 37, config.patch_dim), dtype=np.float32)
        ref["discriminator"] = torch_disc(torch.from_numpy(patches)).numpy()

    @nnx.jit(static_argnums=(3,))
    def forward(m, v, msk, kk):
        return {
            "seq": m.extract_features(v, keep_seq=True),
            "pooled": m.extract_features(v, keep_seq=False),
            "masked_encoder": m.encoder(v, msk, kk),
            "reconstruction": m(v, msk, kk),
        }

    ours = jax.tree.map(np.asarray, forward(model, jnp.asarray(video), jnp.asarray(mask), k))
    ours["discriminator"] = np.asarray(model.discriminator(jnp.asarray(patches)))
    for key, expected in ref.items():
        assert ours[key].shape == expected.shape, key
        err = np.max(np.abs(ours[key] - expected))
        assert err <= TOL, f"{name} {key}: max-abs diff {err:.2e} > {TOL}"


@pytest.mark.parametrize("attention_impl", [None, "per_head"])
def test_parity_vit_small(marlin_pytorch, attention_impl):
    _run_parity(marlin_pytorch, "marlin_vit_small_ytf", attention_impl=attention_impl)


def test_parity_vit_base(marlin_pytorch):
    _run_parity(marlin_pytorch, "marlin_vit_base_ytf", batch=1)


@pytest.mark.slow
def test_parity_vit_large(marlin_pytorch):
    _run_parity(marlin_pytorch, "marlin_vit_large_ytf", batch=1)
