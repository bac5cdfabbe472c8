"""MARLIN: encoder, decoder, discriminator and the full masked autoencoder as Flax NNX modules.

Video ``(B, 16, 224, 224, 3)`` float in [0, 1]; ``N = 1568`` tokens in (t, h, w) order; masks
boolean ``(B, N)``, True = visible, the same count ``k`` per sample.

Block layouts: per layer (checkpoints, interop, PyTorch), ``encoder/blocks/<i>/attn/proj/kernel``
``(D, D)``; stacked (``scan_layers=True``: one ``lax.scan``), one block with a leading layer axis,
``encoder/blocks/attn/proj/kernel`` ``(L, D, D)``. :func:`stack_layers` / :func:`unstack_layers`
convert pure parameter dicts (or pytrees holding them) between the two.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import MarlinConfig
from .layers import Block, FixedEmbedding, PatchEmbedding3d, linear, sincos_table, xavier_uniform


def split_by_mask(mask: jax.Array, num_visible: int) -> tuple[jax.Array, jax.Array]:
    """``(visible_idx (B, k), masked_idx (B, N - k))``, each in increasing order, of a bool
    ``(B, N)`` mask (True = visible) with exactly ``num_visible`` (static int) per row."""
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


REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,  # no rematerialisation: every activation is kept for the backward pass
    "full": jax.checkpoint_policies.nothing_saveable,  # keep block inputs only, recompute all
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
    # keep the projections, recompute attention (batched matmuls)
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
"""``remat_policy`` names -> ``jax.checkpoint`` policy of each block (the scan body with ``scan_layers``)."""


def _stack_arrays(*xs: Any) -> Any:
    """Leaves of L layers -> one leaf with a leading layer axis (numpy stays on the host)."""
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in xs):
        return jax.ShapeDtypeStruct((len(xs), *xs[0].shape), xs[0].dtype)
    if all(isinstance(x, np.ndarray) for x in xs):
        return np.stack(xs)
    return jnp.stack(xs)


def _stack_modules(modules: list[nnx.Module]) -> nnx.Module:
    """L modules of one structure -> one module whose variables have a leading layer axis."""
    graphdef, _ = nnx.split(modules[0])
    states = [nnx.split(m)[1] for m in modules]
    return nnx.merge(graphdef, jax.tree.map(_stack_arrays, *states))


LAYERS_KEY = "blocks"  # the pure-dict key of the transformer blocks, in either layout (module doc)


def _is_per_layer(blocks: dict) -> bool:
    return bool(blocks) and all(str(k).isdigit() for k in blocks)


def _has_layers(node: Any) -> bool:
    return isinstance(node, dict) and isinstance(node.get(LAYERS_KEY), dict)


def stack_layers(tree: Any) -> Any:
    """Per-layer -> stacked layout: every ``blocks`` dict ``{0: layer, ..., L-1: layer}`` (int or
    digit-string keys) in ``tree`` (pure dicts as ``nnx.to_pure_dict``, or any pytree holding them)
    becomes one layer dict with ``(L, ...)`` leaves. Stacked ``blocks`` pass unchanged; numpy stays
    numpy; ShapeDtypeStructs give ShapeDtypeStructs; jit-able."""

    def fix(node: Any) -> Any:
        if not _has_layers(node) or not _is_per_layer(node[LAYERS_KEY]):
            return node
        blocks = node[LAYERS_KEY]
        order = sorted(blocks, key=int)
        if [int(k) for k in order] != list(range(len(order))):
            raise ValueError(f"stack_layers: layer keys must be 0..L-1, got {order}")
        layers = [blocks[k] for k in order]
        ref = jax.tree.structure(layers[0])
        for k, layer in zip(order, layers, strict=True):
            if jax.tree.structure(layer) != ref:
                raise ValueError(f"stack_layers: layer {k} differs in structure from layer {order[0]}")
        return {**node, LAYERS_KEY: jax.tree.map(_stack_arrays, *layers)}

    return jax.tree.map(fix, tree, is_leaf=_has_layers)


def unstack_layers(tree: Any) -> Any:
    """Stacked -> per-layer layout (inverse of :func:`stack_layers`, int keys as
    ``nnx.to_pure_dict``); per-layer ``blocks`` pass unchanged."""

    def fix(node: Any) -> Any:
        if not _has_layers(node) or not node[LAYERS_KEY] or _is_per_layer(node[LAYERS_KEY]):
            return node
        blocks = node[LAYERS_KEY]
        lengths = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(blocks)}
        if len(lengths) != 1 or None in lengths:
            raise ValueError(f"unstack_layers: stacked block leaves need one leading layer axis, "
                             f"got leading sizes {sorted(map(str, lengths))}")
        (n,) = lengths
        return {**node, LAYERS_KEY: {i: jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(n)}}

    return jax.tree.map(fix, tree, is_leaf=_has_layers)


def is_stacked(tree: Any) -> bool:
    """Whether ``tree`` holds a ``blocks`` dict in the stacked layout."""
    return any(_has_layers(node) and node[LAYERS_KEY] and not _is_per_layer(node[LAYERS_KEY])
               for node in jax.tree.leaves(tree, is_leaf=_has_layers))


class _Transformer(nnx.Module):
    """Shared plumbing: blocks (looped or scanned, optionally rematerialised), final norm and the
    fixed position table of a ``dim``-wide stack."""

    def __init__(self, config: MarlinConfig, dim: int, depth: int, heads: int, *, rngs: nnx.Rngs, dtype: Any,
                 param_dtype: Any, matmul_dtype: Any, remat_policy: str, scan_layers: bool,
                 attention_impl: str | None):
        if not isinstance(remat_policy, str) or remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {remat_policy!r}; choose one of {', '.join(REMAT_POLICIES)}")
        if remat_policy != "none" and (config.drop_rate > 0 or config.attn_drop_rate > 0):
            raise ValueError(f"remat_policy={remat_policy!r} with dropout is not supported (the recomputed "
                             "blocks would reuse one dropout mask); set drop_rate = attn_drop_rate = 0 or "
                             "remat_policy='none'")
        self.config, self.dtype, self.matmul_dtype = config, dtype, matmul_dtype
        self.remat_policy, self.scan_layers = remat_policy, scan_layers
        if scan_layers and depth < 1:
            raise ValueError(f"scan_layers=True needs at least one block, got depth {depth}")
        blocks = [Block(dim, heads, mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias, qk_scale=config.qk_scale,
                        drop=config.drop_rate, attn_drop=config.attn_drop_rate, init_values=config.init_values,
                        eps=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, matmul_dtype=matmul_dtype,
                        attention_impl=attention_impl, rngs=rngs) for _ in range(depth)]
        # stacked: built block by block, then stacked, so that both layouts draw the same weights
        self.blocks = _stack_modules(blocks) if scan_layers else nnx.List(blocks)
        self.norm = nnx.LayerNorm(dim, epsilon=config.layer_norm_eps, dtype=dtype,
                                  param_dtype=param_dtype, use_fast_variance=False, rngs=rngs)
        self.pos_embedding = FixedEmbedding(jnp.asarray(sincos_table(config.num_tokens, dim))[None])

    def run_blocks(self, tokens: jax.Array) -> jax.Array:
        """``(B, n, D)`` through every block (no final norm): looped, or one ``lax.scan`` over the
        stacked block (non-parameter state such as dropout RNG counts written back). With a
        ``remat_policy`` each block (scan body) is a pure function under ``jax.checkpoint``, so it
        composes with any outer jax/nnx transform."""
        policy = REMAT_POLICIES[self.remat_policy]
        if self.scan_layers:
            graphdef, params, rest = nnx.split(self.blocks, nnx.Param, ...)

            def body(x, layer):
                block = nnx.merge(graphdef, *layer)
                y = block(x).astype(x.dtype)
                return y, nnx.state(block, nnx.Not(nnx.Param))

            if policy is not None:
                body = jax.checkpoint(body, policy=policy, prevent_cse=False)
            tokens, rest = jax.lax.scan(body, tokens, (params, rest))
            nnx.update(self.blocks, rest)
            return tokens
        for block in self.blocks:
            if policy is None:
                tokens = block(tokens)
            else:
                graphdef, state = nnx.split(block)
                block = jax.checkpoint(lambda s, x, g=graphdef: nnx.merge(g, s)(x), policy=policy)
                tokens = block(state, tokens)
        return tokens


class MarlinEncoder(_Transformer):
    """ViT encoder over tubelet tokens with a fixed sin-cos position table."""

    def __init__(self, config: MarlinConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, matmul_dtype=None, remat_policy: str = "none",
                 scan_layers: bool = False, attention_impl: str | None = None):
        d = config.encoder_embed_dim
        self.patch_embedding = PatchEmbedding3d(config.in_channels, d, config.patch_size,
                                                config.tubelet_size, dtype=dtype, param_dtype=param_dtype,
                                                matmul_dtype=matmul_dtype, rngs=rngs)
        super().__init__(config, d, config.encoder_depth, config.encoder_num_heads, rngs=rngs, dtype=dtype,
                         param_dtype=param_dtype, matmul_dtype=matmul_dtype, remat_policy=remat_policy,
                         scan_layers=scan_layers, attention_impl=attention_impl)

    def embed(self, video: jax.Array) -> jax.Array:
        """``(B, T, H, W, C)`` -> tokens + position table ``(B, N, D)``."""
        c = self.config
        expected = (c.n_frames, c.img_size, c.img_size, c.in_channels)
        if video.ndim != 5 or tuple(video.shape[1:]) != expected:
            raise ValueError(f"expected video (B, {', '.join(map(str, expected))}) channels-last, "
                             f"got {tuple(video.shape)}")
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
                 param_dtype=jnp.float32, matmul_dtype=None, remat_policy: str = "none",
                 scan_layers: bool = False, attention_impl: str | None = None):
        d = config.decoder_embed_dim
        self.mask_token = nnx.Param(
            0.02 * jax.random.truncated_normal(rngs.params(), -1.0, 1.0, (1, 1, d), param_dtype))
        super().__init__(config, d, config.decoder_depth, config.decoder_num_heads, rngs=rngs, dtype=dtype,
                         param_dtype=param_dtype, matmul_dtype=matmul_dtype, remat_policy=remat_policy,
                         scan_layers=scan_layers, attention_impl=attention_impl)
        self.head = linear(d, config.patch_dim, kernel_init=xavier_uniform, dtype=dtype,
                           matmul_dtype=matmul_dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, visible: jax.Array, mask: jax.Array, num_visible: int | None = None) -> jax.Array:
        """visible: ``(B, k, Dd)`` decoder-width tokens -> ``(B, N - k, patch_dim)`` pixels of the
        masked tokens in increasing index order."""
        k = visible.shape[1] if num_visible is None else num_visible
        visible_idx, masked_idx = split_by_mask(mask, k)
        table = self.pos_embedding[...].astype(visible.dtype)  # (1, N, Dd)
        pos = jnp.broadcast_to(table, (visible.shape[0], *table.shape[1:]))
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

    ``with_decoder=False``: encoder only (like a `.encoder.pt`). ``remat_policy``: a
    :data:`REMAT_POLICIES` name; ``scan_layers``: the stacked block layout (see the module doc)."""

    def __init__(self, config: MarlinConfig, *, rngs: nnx.Rngs, with_decoder: bool = True,
                 with_discriminator: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
                 matmul_dtype=None, remat_policy: str = "none", scan_layers: bool = False,
                 attention_impl: str | None = None):
        self.config = config
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, matmul_dtype=matmul_dtype)
        blocks_kw = dict(remat_policy=remat_policy, scan_layers=scan_layers, attention_impl=attention_impl)
        self.encoder = MarlinEncoder(config, **blocks_kw, **kw)
        if with_decoder:
            self.enc_dec_proj = linear(config.encoder_embed_dim, config.decoder_embed_dim,
                                       use_bias=False, kernel_init=xavier_uniform, **kw)
            self.decoder = MarlinDecoder(config, **blocks_kw, **kw)
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
