"""Helpers to build marlin-pytorch reference models with random weights and move them to JAX."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from marlin_jax.models import MarlinConfig


def build_torch_marlin(mp, config: MarlinConfig, *, full: bool = True, seed: int = 0, perturb: float = 0.02):
    """A marlin_pytorch.Marlin with random weights. ``perturb`` adds noise to every parameter so that
    zero-initialised biases and unit norms are exercised too."""
    import torch

    torch.manual_seed(seed)
    model = mp.Marlin(
        img_size=config.img_size, patch_size=config.patch_size, n_frames=config.n_frames,
        encoder_embed_dim=config.encoder_embed_dim, encoder_depth=config.encoder_depth,
        encoder_num_heads=config.encoder_num_heads, decoder_embed_dim=config.decoder_embed_dim,
        decoder_depth=config.decoder_depth, decoder_num_heads=config.decoder_num_heads,
        mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias, qk_scale=config.qk_scale,
        drop_rate=config.drop_rate, attn_drop_rate=config.attn_drop_rate, norm_layer=config.norm_layer,
        init_values=config.init_values, tubelet_size=config.tubelet_size, as_feature_extractor=not full,
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(perturb * torch.randn_like(p))
    return model.eval()


def build_torch_discriminator(config: MarlinConfig, seed: int = 1):
    """The original trainer's patch critic: MLP([patch_dim, 4 * decoder_dim, 1], LeakyReLU)."""
    import torch
    from marlin_pytorch.model.modules import MLP

    torch.manual_seed(seed)
    return MLP([config.patch_dim, config.discriminator_hidden, 1], build_activation=torch.nn.LeakyReLU).eval()


def to_numpy_state_dict(*named_modules) -> OrderedDict[str, np.ndarray]:
    """Flat numpy state_dict of (prefix, torch module) pairs."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for prefix, module in named_modules:
        for k, v in module.state_dict().items():
            out[f"{prefix}{k}"] = v.detach().cpu().numpy().copy()
    return out


def random_mask(batch: int, num_tokens: int, num_visible: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = np.zeros((batch, num_tokens), bool)
    for b in range(batch):
        mask[b, rng.choice(num_tokens, num_visible, replace=False)] = True
    return mask
