"""Transformer blocks of MARLIN (pre-norm ViT with q/v bias), position tables, tubelet patches.

Tokens are ``(B, N, D)``; videos are channels-last ``(B, T, H, W, C)``."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

xavier_uniform = nnx.initializers.xavier_uniform()


def matmul(a: jax.Array, b: jax.Array, matmul_dtype, out_dtype) -> jax.Array:
    """``a @ b`` with operands in ``matmul_dtype`` (None: as given) accumulated into ``out_dtype``
    (bf16 operands with f32 accumulation: ~2x a float32 matmul on a recent Xeon)."""
    if matmul_dtype is None:
        return a @ b
    return jnp.matmul(a.astype(matmul_dtype), b.astype(matmul_dtype), preferred_element_type=out_dtype)


def linear(in_features: int, out_features: int, *, dtype, matmul_dtype, param_dtype, rngs: nnx.Rngs,
           use_bias: bool = True, kernel_init=None) -> nnx.Linear:
    """An ``nnx.Linear`` whose matmul runs in ``matmul_dtype`` (if set) with ``dtype`` output."""
    kwargs = {} if kernel_init is None else {"kernel_init": kernel_init, "bias_init": nnx.initializers.zeros_init()}
    return nnx.Linear(in_features, out_features, use_bias=use_bias, param_dtype=param_dtype, rngs=rngs,
                      **_matmul_dtypes(dtype, matmul_dtype), **kwargs)


def _matmul_dtypes(dtype: Any, matmul_dtype: Any) -> dict[str, Any]:
    """``nnx.Linear`` / ``LinearGeneral`` dtype arguments: ``matmul_dtype`` operands, ``dtype`` output."""
    if matmul_dtype is None:
        return {"dtype": dtype}
    return {"dtype": matmul_dtype, "preferred_element_type": dtype}


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU as PyTorch computes it, ``x/2 * (1 + erf(x/sqrt(2)))``: ~2x faster on CPU than
    ``jax.nn.gelu(approximate=False)``, whose ``erfc`` form buys tail accuracy float32 cannot use."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(np.sqrt(0.5), x.dtype)))


class FixedEmbedding(nnx.Variable):
    """A non-trainable table (the sin-cos position table). Kept in the model state, not in the
    optimiser, so that converted checkpoints carry the exact values they were trained with."""


@functools.lru_cache(maxsize=16)
def sincos_table(num_positions: int, dim: int) -> np.ndarray:
    """Fixed sinusoid position table ``(num_positions, dim)`` float32, as VideoMAE / MARLIN:
    angle(p, i) = p / 10000^(2*(i//2)/dim); sin on even, cos on odd channels."""
    # In float64, then rounded (the reference's float32 angles differ by up to ~2.5e-4 at late
    # positions); converted checkpoints keep their own table (FixedEmbedding).
    exponent = 2 * (np.arange(dim) // 2) / dim
    angles = np.arange(num_positions, dtype=np.float64)[:, None] / np.power(10000.0, exponent)[None]
    table = np.where(np.arange(dim) % 2 == 0, np.sin(angles), np.cos(angles)).astype(np.float32)
    table.flags.writeable = False
    return table


def video_to_float(video: jax.Array) -> jax.Array:
    """uint8 ``(B, T, H, W, C)`` (any integer type) -> float32 in [0, 1]; float input passes
    through as float32. The one conversion of host-side clips for every model entry point."""
    if jnp.issubdtype(video.dtype, jnp.integer):
        return video.astype(jnp.float32) / 255.0
    return video.astype(jnp.float32)


def patchify(video: jax.Array, patch_size: int = 16, tubelet_size: int = 2) -> jax.Array:
    """``(B, T, H, W, C)`` -> ``(B, N, C*pt*ph*pw)`` with tokens in (t, h, w) order and each
    token's pixels in (c, pt, ph, pw) order (the order MARLIN's decoder predicts)."""
    b, t, h, w, c = video.shape
    pt, p = tubelet_size, patch_size
    x = video.reshape(b, t // pt, pt, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6)  # b nt nh nw c pt ph pw
    return x.reshape(b, (t // pt) * (h // p) * (w // p), c * pt * p * p)


def unpatchify(patches: jax.Array, grid: tuple[int, int, int], patch_size: int = 16,
               tubelet_size: int = 2) -> jax.Array:
    """Inverse of :func:`patchify`: ``(B, N, C*pt*ph*pw)`` -> ``(B, T, H, W, C)``."""
    b = patches.shape[0]
    nt, nh, nw = grid
    pt, p = tubelet_size, patch_size
    c = patches.shape[-1] // (pt * p * p)
    x = patches.reshape(b, nt, nh, nw, c, pt, p, p)
    x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4)  # b nt pt nh ph nw pw c
    return x.reshape(b, nt * pt, nh * p, nw * p, c)


class PatchEmbedding3d(nnx.Module):
    """Non-overlapping tubelet embedding (a Conv3d with stride = kernel) computed as one matmul,
    kernel in the conv layout ``(pt, ph, pw, C, D)``: ``(B, T, H, W, C)`` -> ``(B, N, D)``."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int, tubelet_size: int, *,
                 dtype=jnp.float32, param_dtype=jnp.float32, matmul_dtype=None, rngs: nnx.Rngs):
        self.dtype, self.matmul_dtype = dtype, matmul_dtype
        shape = (tubelet_size, patch_size, patch_size, in_channels, embed_dim)
        # PyTorch's Conv3d default init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), ..).
        bound = 1.0 / np.sqrt(np.prod(shape[:-1]))
        self.projection = nnx.Dict(
            kernel=nnx.Param(jax.random.uniform(rngs.params(), shape, param_dtype, -bound, bound)),
            bias=nnx.Param(jax.random.uniform(rngs.params(), (embed_dim,), param_dtype, -bound, bound)),
        )

    def __call__(self, video: jax.Array) -> jax.Array:
        kernel = self.projection["kernel"][...]
        pt, p, _, c, d = kernel.shape
        patches = patchify(video.astype(self.dtype), p, pt)  # (B, N, c*pt*p*p)
        # patch pixels are (c, pt, ph, pw); bring the kernel to the same order.
        flat_kernel = kernel.transpose(3, 0, 1, 2, 4).reshape(c * pt * p * p, d).astype(self.dtype)
        out = matmul(patches, flat_kernel, self.matmul_dtype, self.dtype)
        return out + self.projection["bias"][...].astype(self.dtype)


ATTENTION_IMPLS = (None, "xla", "per_head", "cudnn", "splash")
"""None / "xla": batched; "per_head": one (batch, head) at a time (CPU); "cudnn": the fused GPU
kernel of ``jax.nn.dot_product_attention``; "splash": the Pallas TPU kernel (interpreted elsewhere)."""
BATCH_AXES = ("data", "fsdp")  # mesh axes that split the batch
HEAD_AXIS = "tensor"  # mesh axis that splits the attention heads


def default_attention_impl(platform: str, dtype: Any, *, training: bool) -> str | None:
    """The attention for a platform (``cpu`` / ``gpu`` / ``tpu``) and activation ``dtype``: splash
    on TPU; cuDNN on GPU for 16-bit activations (no float32 kernel), else batched XLA; on CPU
    batched (None) for training and ``per_head`` (~2x faster) for inference."""
    if platform == "tpu":
        return "splash"
    if platform == "gpu":
        return "cudnn" if jnp.dtype(dtype).itemsize == 2 else "xla"
    if platform == "cpu" and not training:
        return "per_head"
    return None if training else "xla"


SPLASH_LANES = 128  # splash tiles are multiples of 128 tokens


def splash_block_size(length: int) -> int:
    """The largest of 512 / 256 / 128 that divides the padded sequence ``length``."""
    return next(b for b in (512, 256, SPLASH_LANES) if length % b == 0)


def _split_axes(mesh: Any, length: int, axes: tuple[str, ...]) -> tuple[str, ...]:
    """Those of ``axes`` that are free in ``mesh`` (not manual, size > 1) and together divide ``length``."""
    out, size = [], 1
    for axis in axes:
        if axis in mesh.axis_names and axis not in mesh.manual_axes and mesh.shape[axis] > 1 \
                and length % (size * mesh.shape[axis]) == 0:
            out.append(axis)
            size *= mesh.shape[axis]
    return tuple(out)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool) -> jax.Array:
    """Unscaled softmax(q k^T) v with the splash kernel, ``(B, H, N, hd)`` -> ``(B, H, N, hd)``.

    Tokens are padded to a multiple of 128; padded keys are masked out (segment ids: real tokens
    0, padding 1) and padded queries dropped. Computes in the input dtype with float32
    accumulation; has its own VJP. One device: call it inside ``shard_map`` under a mesh."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    _, h, n, _ = q.shape
    length = -(-n // SPLASH_LANES) * SPLASH_LANES
    block = splash_block_size(length)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                          block_kv_dq=block)
    mask = sm.MultiHeadMask([sm.FullMask((length, length))] * h)
    kernel = sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)
    segments = (jnp.arange(length) >= n).astype(jnp.int32)
    ids = sk.SegmentIds(q=segments, kv=segments)
    q, k, v = (jnp.pad(t, ((0, 0), (0, 0), (0, length - n), (0, 0))) for t in (q, k, v))
    out = jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q, k, v)
    return out[:, :, :n]


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                    implementation: str = "cudnn") -> jax.Array:
    """softmax(q k^T * scale) v with ``jax.nn.dot_product_attention``, ``(B, N, H, hd)`` in/out.

    cuDNN's training kernels need an even length: an odd one is padded by one token, its key
    masked out and its query dropped (``implementation="xla"`` runs the same on any platform)."""
    b, n = q.shape[:2]
    if n % 2 == 0:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
    q, k, v = (jnp.pad(t, ((0, 0), (0, 1), (0, 0), (0, 0))) for t in (q, k, v))
    lengths = jnp.full((b,), n, jnp.int32)
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, query_seq_lengths=lengths + 1,
                                       key_value_seq_lengths=lengths, implementation=implementation)
    return out[:, :n]


class Attention(nnx.Module):
    """Multi-head self-attention with a bias-free qkv projection plus separate q/v biases.

    The qkv kernel is ``(D, 3, H, hd)`` (the flat ``(D, 3D)`` matrix with its columns in
    (q|k|v, head, channel) order), so that tensor parallelism can split it along heads."""

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 dtype=jnp.float32, param_dtype=jnp.float32, matmul_dtype=None,
                 attention_impl: str | None = None, rngs: nnx.Rngs):
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
        if attention_impl == "splash" and attn_drop > 0:
            raise ValueError(f"attention_impl='splash' has no attention dropout (attn_drop={attn_drop})")
        self.matmul_dtype, self.attention_impl = matmul_dtype, attention_impl
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        # LinearGeneral initialises the flat (D, 3D) matrix (xavier statistics), then reshapes.
        self.qkv = nnx.LinearGeneral(dim, (3, num_heads, dim // num_heads), use_bias=False,
                                     kernel_init=xavier_uniform, param_dtype=param_dtype, rngs=rngs,
                                     **_matmul_dtypes(dtype, matmul_dtype))
        self.q_bias = nnx.Param(jnp.zeros((dim,), param_dtype)) if qkv_bias else None
        self.v_bias = nnx.Param(jnp.zeros((dim,), param_dtype)) if qkv_bias else None
        self.proj = linear(dim, dim, kernel_init=xavier_uniform, dtype=dtype, matmul_dtype=matmul_dtype,
                           param_dtype=param_dtype, rngs=rngs)
        self.attn_drop = nnx.Dropout(attn_drop, rngs=rngs) if attn_drop > 0 else None
        self.proj_drop = nnx.Dropout(proj_drop, rngs=rngs) if proj_drop > 0 else None

    def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """softmax(q k^T) v for ``(B, H, N, hd)`` q (scaled), k, v -> ``(B, H, N, hd)``.

        Softmax statistics in float32, normalised after the second matmul (N x hd divisions).
        ``per_head``: the (batch, head) pairs one after another (``lax.map``), so each N x N score
        matrix stays in cache (~2x faster on CPU); batched suits accelerators and sharding."""
        b, h, n, hd = q.shape
        looped = self.attention_impl == "per_head" and self.attn_drop is None

        def attend(q, k, v):
            logits = matmul(q, k.swapaxes(-1, -2), self.matmul_dtype, jnp.float32).astype(jnp.float32)
            weights = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
            # One head at a time, P @ V runs in the matmul dtype too (the weights are rounded once
            # and the denominator sums the rounded values). Batched, it stays in the activation
            # dtype: casting B*H (N, N) weights in memory costs more than the bf16 matmul saves.
            pv_dtype = self.matmul_dtype if looped else None
            if pv_dtype is not None:
                weights = weights.astype(pv_dtype)
            denominator = weights.sum(axis=-1, keepdims=True, dtype=jnp.float32)
            if self.attn_drop is not None:
                weights = self.attn_drop(weights)  # == dropout on the probabilities (same denominator)
            out = matmul(weights.astype(pv_dtype or v.dtype), v, pv_dtype, v.dtype)
            return out / denominator.astype(v.dtype)

        if not looped:
            return attend(q, k, v)
        heads = (t.reshape(b * h, n, hd) for t in (q, k, v))
        return jax.lax.map(lambda qkv: attend(*qkv), tuple(heads)).reshape(b, h, n, hd)

    def _splash(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """:func:`splash_attention` for ``(B, H, N, hd)`` q (scaled), k, v -> ``(B, H, N, hd)``; under
        a context mesh, inside ``shard_map`` over the batch and head axes (a Pallas kernel cannot
        be partitioned automatically)."""
        b, h = q.shape[:2]
        out_dtype = v.dtype
        if self.matmul_dtype is not None:
            q, k, v = (t.astype(self.matmul_dtype) for t in (q, k, v))
        mesh = jax.sharding.get_abstract_mesh()
        device = None if mesh.empty else getattr(mesh, "abstract_device", None)
        # Pallas interpret mode when the target platform (the context mesh's, else the default) is not a TPU
        interpret = (getattr(device, "platform", None) or jax.default_backend()) != "tpu"
        attend = functools.partial(splash_attention, interpret=interpret)
        if not mesh.empty and any(a not in mesh.manual_axes and mesh.shape[a] > 1 for a in mesh.axis_names):
            spec = jax.sharding.PartitionSpec(_split_axes(mesh, b, BATCH_AXES) or None,
                                              HEAD_AXIS if _split_axes(mesh, h, (HEAD_AXIS,)) else None)
            if mesh.are_all_axes_explicit:  # sharding-in-types: shard_map wants matching inputs
                q, k, v = (jax.sharding.reshard(t, spec) for t in (q, k, v))
            attend = jax.shard_map(attend, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                                   check_vma=False)
        return attend(q, k, v).astype(out_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        qkv = self.qkv(x)  # (B, N, 3, H, hd)
        if self.q_bias is not None:
            bias = jnp.stack([self.q_bias[...], jnp.zeros_like(self.v_bias[...]), self.v_bias[...]])
            qkv = qkv + bias.reshape(qkv.shape[2:]).astype(qkv.dtype)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, H, hd)
        if self.attention_impl == "cudnn":  # fused flash attention on GPU
            out = fused_attention(q, k, v, scale=self.scale)
        else:
            q = q * jnp.asarray(self.scale, q.dtype)
            q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (B, H, N, hd)
            attend = self._splash if self.attention_impl == "splash" else self._attend  # splash: Pallas on TPU
            out = attend(q, k, v).transpose(0, 2, 1, 3)
        out = self.proj(out.reshape(b, n, d))
        return self.proj_drop(out) if self.proj_drop is not None else out


class Mlp(nnx.Module):
    """fc1 -> exact GELU -> fc2 (names mirror PyTorch's `mlp.layers.{0,1}.linear`)."""

    def __init__(self, dim: int, hidden: int, *, drop: float = 0.0, dtype=jnp.float32,
                 param_dtype=jnp.float32, matmul_dtype=None, rngs: nnx.Rngs):
        dense = functools.partial(linear, kernel_init=xavier_uniform, dtype=dtype, matmul_dtype=matmul_dtype,
                                  param_dtype=param_dtype, rngs=rngs)
        self.fc1, self.fc2 = dense(dim, hidden), dense(hidden, dim)
        self.drop = nnx.Dropout(drop, rngs=rngs) if drop > 0 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in (self.fc1, gelu, self.drop, self.fc2, self.drop):
            x = x if layer is None else layer(x)
        return x


def constrain_to_batch(x: jax.Array, batch_axes: tuple[str, ...] = BATCH_AXES) -> jax.Array:
    """``x`` (batch first) split over the context mesh's ``batch_axes`` that divide the batch,
    replicated elsewhere; unchanged without a mesh. Under FSDP this keeps XLA from carrying the
    weights' feature split onto the activations (all-to-all at every residual add)."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else _split_axes(mesh, x.shape[0], batch_axes)
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes)) if axes else x


class Block(nnx.Module):
    """Pre-norm transformer block, with optional layer-scale (``init_values > 0``)."""

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_scale: float | None = None, drop: float = 0.0, attn_drop: float = 0.0,
                 init_values: float = 0.0, eps: float = 1e-5, dtype=jnp.float32,
                 param_dtype=jnp.float32, matmul_dtype=None, attention_impl: str | None = None,
                 rngs: nnx.Rngs):
        norm = functools.partial(nnx.LayerNorm, dim, epsilon=eps, dtype=dtype, use_fast_variance=False,
                                 param_dtype=param_dtype, rngs=rngs)
        self.norm1 = norm()
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                              attn_drop=attn_drop, proj_drop=drop, dtype=dtype, param_dtype=param_dtype,
                              matmul_dtype=matmul_dtype, attention_impl=attention_impl, rngs=rngs)
        self.norm2 = norm()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop, dtype=dtype, param_dtype=param_dtype,
                       matmul_dtype=matmul_dtype, rngs=rngs)
        self.gamma_1 = nnx.Param(jnp.full((dim,), init_values, param_dtype)) if init_values > 0 else None
        self.gamma_2 = nnx.Param(jnp.full((dim,), init_values, param_dtype)) if init_values > 0 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = constrain_to_batch(x)
        h = constrain_to_batch(self.attn(self.norm1(x)))
        x = x + (h if self.gamma_1 is None else self.gamma_1[...].astype(h.dtype) * h)
        h = constrain_to_batch(self.mlp(self.norm2(x)))
        return x + (h if self.gamma_2 is None else self.gamma_2[...].astype(h.dtype) * h)
