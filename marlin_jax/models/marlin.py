"""MARLIN: encoder, decoder, discriminator and the full masked autoencoder as Flax NNX modules.

Shapes for the released models: video ``(B, 16, 224, 224, 3)`` float in [0, 1]; ``N = 1568``
tokens in (t, h, w) order; masks are boolean ``(B, N)`` with True = visible and the same number
``k`` of visible tokens in every sample.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from .config import MarlinConfig
from .layers import Block, FixedEmbedding, PatchEmbedding3d, linear, sincos_table, xavier_uniform


def split_by_mask(mask: jax.Array, num_visible: int) -> tuple[jax.Array, jax.Array]:
    """Indices of visible and masked tokens, each in increasing index order.

    mask: bool ``(B, N)``, True = visible, exactly ``num_visible`` per row (static int).
    Returns ``(visible_idx (B, k), masked_idx (B, N - k))``.
    """
    order = jnp.argsort(~mask, axis=1, stable=True)
    return order[:, :num_visible], order[:, num_visible:]


def _gather(tokens: jax.Array, idx: jax.Array) -> jax.Array:
    return jnp.take_along_axis(tokens, idx[..., None], axis=1)


def _static_num_visible(mask: jax.Array, num_visible: int | None) -> int:
    if num_visible is not None:
        return int(num_visible)
    try:
        counts = jnp.sum(mask, axis=1)
        k = int(counts[0])
    except jax.errors.ConcretizationTypeError:
        raise ValueError("under jit, pass num_visible= (a static int) together with the mask") from None
    if not bool(jnp.all(counts == k)):
        raise ValueError(f"every sample must have the same number of visible tokens, got {counts}")
    return k


def _check_remat(config: MarlinConfig, remat: bool) -> None:
    if remat and (config.drop_rate > 0 or config.attn_drop_rate > 0):
        raise ValueError("remat=True with dropout is not supported (the recomputed blocks would reuse one "
                         "dropout mask); set drop_rate = attn_drop_rate = 0 or remat=False")


def _make_blocks(n: int, dim: int, heads: int, config: MarlinConfig, init_values: float,
                 rngs: nnx.Rngs, **kw) -> nnx.List:
    return nnx.List([
        Block(dim, heads, mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias,
              qk_scale=config.qk_scale, drop=config.drop_rate, attn_drop=config.attn_drop_rate,
              init_values=init_values, eps=config.layer_norm_eps, rngs=rngs, **kw)
        for _ in range(n)
    ])


class _Transformer(nnx.Module):
    """Shared plumbing: a stack of blocks with optional rematerialisation."""

    blocks: nnx.List
    remat: bool

    def run_blocks(self, tokens: jax.Array) -> jax.Array:
        """``(B, n, D)`` through every block (no final norm). With ``remat`` each block's
        activations are recomputed in the backward pass (jax.checkpoint on a pure function of the
        block's state, so it composes with any outer jax/nnx transform)."""
        for block in self.blocks:
            if self.remat:
                graphdef, state = nnx.split(block)
                tokens = jax.checkpoint(lambda s, x, g=graphdef: nnx.merge(g, s)(x))(state, tokens)
            else:
                tokens = block(tokens)
        return tokens


class MarlinEncoder(_Transformer):
    """ViT encoder over tubelet tokens with a fixed sin-cos position table."""

    def __init__(self, config: MarlinConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, matmul_dtype=None, remat: bool = False,
                 attention_impl: str | None = None):
        _check_remat(config, remat)
        self.config, self.dtype, self.remat = config, dtype, remat
        self.matmul_dtype = matmul_dtype
        d = config.encoder_embed_dim
        self.patch_embedding = PatchEmbedding3d(config.in_channels, d, config.patch_size,
                                                config.tubelet_size, dtype=dtype, param_dtype=param_dtype,
                                                matmul_dtype=matmul_dtype, rngs=rngs)
        self.blocks = _make_blocks(config.encoder_depth, d, config.encoder_num_heads, config,
                                   config.init_values, rngs, dtype=dtype, param_dtype=param_dtype,
                                   matmul_dtype=matmul_dtype, attention_impl=attention_impl)
        self.norm = nnx.LayerNorm(d, epsilon=config.layer_norm_eps, dtype=dtype,
                                  param_dtype=param_dtype, use_fast_variance=False, rngs=rngs)
        self.pos_embedding = FixedEmbedding(jnp.asarray(sincos_table(config.num_tokens, d))[None])

    def _check_video(self, video: jax.Array) -> None:
        c = self.config
        expected = (c.n_frames, c.img_size, c.img_size, c.in_channels)
        if video.ndim != 5 or tuple(video.shape[1:]) != expected:
            raise ValueError(f"expected video (B, {', '.join(map(str, expected))}) channels-last, "
                             f"got {tuple(video.shape)}")

    def embed(self, video: jax.Array) -> jax.Array:
        """``(B, T, H, W, C)`` -> tokens + position table ``(B, N, D)``."""
        self._check_video(video)
        tokens = self.patch_embedding(video)
        return tokens + self.pos_embedding[...].astype(tokens.dtype)

    def pool_and_norm(self, tokens: jax.Array, keep_seq: bool) -> jax.Array:
        """The feature head: final norm per token, or mean-pool THEN norm (as the reference)."""
        if not keep_seq:
            tokens = tokens.mean(axis=1)
        return self.norm(tokens)

    def extract_features(self, video: jax.Array, keep_seq: bool = True) -> jax.Array:
        """``(B, T, H, W, C)`` -> ``(B, N, D)`` (keep_seq) or ``(B, D)``."""
        return self.pool_and_norm(self.run_blocks(self.embed(video)), keep_seq)

    def __call__(self, video: jax.Array, mask: jax.Array, num_visible: int | None = None) -> jax.Array:
        """Encodes the visible tokens only: ``(B, k, D)`` after the final norm."""
        k = _static_num_visible(mask, num_visible)
        visible_idx, _ = split_by_mask(mask, k)
        tokens = _gather(self.embed(video), visible_idx)
        return self.norm(self.run_blocks(tokens))


class MarlinDecoder(_Transformer):
    """Narrow transformer that predicts the pixels of the masked tokens."""

    def __init__(self, config: MarlinConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, matmul_dtype=None, remat: bool = False,
                 attention_impl: str | None = None):
        _check_remat(config, remat)
        self.config, self.dtype, self.remat = config, dtype, remat
        d = config.decoder_embed_dim
        self.mask_token = nnx.Param(
            0.02 * jax.random.truncated_normal(rngs.params(), -1.0, 1.0, (1, 1, d), param_dtype))
        self.blocks = _make_blocks(config.decoder_depth, d, config.decoder_num_heads, config,
                                   config.init_values, rngs, dtype=dtype, param_dtype=param_dtype,
                                   matmul_dtype=matmul_dtype, attention_impl=attention_impl)
        self.norm = nnx.LayerNorm(d, epsilon=config.layer_norm_eps, dtype=dtype,
                                  param_dtype=param_dtype, use_fast_variance=False, rngs=rngs)
        self.pos_embedding = FixedEmbedding(jnp.asarray(sincos_table(config.num_tokens, d))[None])
        self.head = linear(d, config.patch_dim, kernel_init=xavier_uniform, dtype=dtype,
                           matmul_dtype=matmul_dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, visible: jax.Array, mask: jax.Array, num_visible: int | None = None) -> jax.Array:
        """visible: ``(B, k, Dd)`` decoder-width tokens -> ``(B, N - k, patch_dim)`` pixels of the
        masked tokens in increasing index order."""
        k = visible.shape[1] if num_visible is None else num_visible
        visible_idx, masked_idx = split_by_mask(mask, k)
        b = visible.shape[0]
        table = self.pos_embedding[...].astype(visible.dtype)  # (1, N, Dd)
        pos = jnp.broadcast_to(table, (b, *table.shape[1:]))
        masked = self.mask_token[...].astype(visible.dtype) + _gather(pos, masked_idx)
        x = jnp.concatenate([visible + _gather(pos, visible_idx), masked], axis=1)
        x = self.run_blocks(x)[:, k:]
        return self.head(self.norm(x))


class MarlinDiscriminator(nnx.Module):
    """Patch-level MLP critic ``[patch_dim -> 4 * decoder_dim -> 1]`` with LeakyReLU(0.01)."""

    def __init__(self, config: MarlinConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, matmul_dtype=None):
        dense = functools.partial(linear, dtype=dtype, matmul_dtype=matmul_dtype, param_dtype=param_dtype,
                                  rngs=rngs)
        self.layers = nnx.List([dense(config.patch_dim, config.discriminator_hidden),
                                dense(config.discriminator_hidden, 1)])

    def __call__(self, patches: jax.Array) -> jax.Array:
        """``(..., patch_dim)`` -> ``(..., 1)`` critic scores."""
        return self.layers[1](jax.nn.leaky_relu(self.layers[0](patches), negative_slope=0.01))


class MarlinModel(nnx.Module):
    """The MARLIN masked autoencoder: encoder, projection, decoder and (optionally) the critic.

    ``with_decoder=False`` gives an encoder-only feature extractor (like a `.encoder.pt`).
    """

    def __init__(self, config: MarlinConfig, *, rngs: nnx.Rngs, with_decoder: bool = True,
                 with_discriminator: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
                 matmul_dtype=None, remat: bool = False, attention_impl: str | None = None):
        self.config = config
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, matmul_dtype=matmul_dtype)
        self.encoder = MarlinEncoder(config, remat=remat, attention_impl=attention_impl, **kw)
        if with_decoder:
            self.enc_dec_proj = linear(config.encoder_embed_dim, config.decoder_embed_dim,
                                       use_bias=False, kernel_init=xavier_uniform, **kw)
            self.decoder = MarlinDecoder(config, remat=remat, attention_impl=attention_impl, **kw)
        else:
            self.enc_dec_proj = self.decoder = None
        self.discriminator = MarlinDiscriminator(config, **kw) if with_discriminator else None

    def __call__(self, video: jax.Array, mask: jax.Array, num_visible: int | None = None) -> jax.Array:
        """Reconstructs the masked tokens: ``(B, N - k, patch_dim)`` in increasing index order."""
        if self.decoder is None:
            raise ValueError("this model has no decoder (encoder-only); use extract_features")
        k = _static_num_visible(mask, num_visible)
        latent = self.enc_dec_proj(self.encoder(video, mask, k))
        return self.decoder(latent, mask, k)

    def extract_features(self, video: jax.Array, keep_seq: bool = True) -> jax.Array:
        return self.encoder.extract_features(video, keep_seq)
