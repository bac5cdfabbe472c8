"""MARLIN's pretraining losses, as the original trainer (ControlNet/MARLIN ``model/marlin.py``):
pixel MSE on the masked tubelets (targets in [0, 1], NOT normalised per patch, unlike VideoMAE),
WGAN generator / critic losses and the WGAN-GP gradient penalty on per-patch interpolates."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from marlin_jax.models import patchify, split_by_mask


def masked_targets(video: jax.Array, mask: jax.Array, num_visible: int, patch_size: int,
                   tubelet_size: int) -> jax.Array:
    """True pixels ``(B, N - num_visible, C * pt * ph * pw)`` of the masked tokens in token order
    (the decoder's output order); video: float ``(B, T, H, W, C)``; mask: bool ``(B, N)``."""
    patches = patchify(video, patch_size, tubelet_size)
    _, masked_idx = split_by_mask(mask, num_visible)
    return jnp.take_along_axis(patches, masked_idx[..., None], axis=1)


def reconstruction_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error over every element (``torch.nn.MSELoss()``), computed in float32."""
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))


def generator_adversarial_loss(fake_scores: jax.Array) -> jax.Array:
    """``-D(fake).mean()``: the generator wants the critic to score its patches high."""
    return -jnp.mean(fake_scores.astype(jnp.float32))


def critic_loss(fake_scores: jax.Array, real_scores: jax.Array) -> jax.Array:
    """Wasserstein critic loss ``D(fake).mean() - D(real).mean()``."""
    return jnp.mean(fake_scores.astype(jnp.float32)) - jnp.mean(real_scores.astype(jnp.float32))


def gradient_penalty(critic: Callable[[jax.Array], jax.Array], real: jax.Array, fake: jax.Array,
                     alpha: jax.Array) -> jax.Array:
    """WGAN-GP ``mean((||grad D(x)||_2 - 1) ** 2)`` over the patches of ``x = alpha * real + (1 -
    alpha) * fake``; critic: ``(B, M, P) -> (B, M, 1)`` per patch; real, fake: ``(B, M, P)``."""
    interpolates = alpha * real + (1.0 - alpha) * fake
    grads = jax.grad(lambda x: jnp.sum(critic(x).astype(jnp.float32)))(interpolates)
    norms = jnp.sqrt(jnp.sum(jnp.square(grads.astype(jnp.float32)), axis=-1))
    return jnp.mean(jnp.square(norms - 1.0))
