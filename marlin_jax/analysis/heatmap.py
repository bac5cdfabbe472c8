"""Grad-CAM on tokens: which parts of a clip drive chosen dimensions of the MARLIN feature.

For a clip and feature indices ``f`` of the mean-pooled embedding ``F = norm(mean_n A_n)``
(``A (N, D)``: token activations after encoder block ``layer``, by default the last), one reverse
pass per feature (``jax.vjp``, vmapped) gives ``G = dF_f / dA`` and the token relevance

    ``gradcam`` (default): ``relu(sum_c alpha_c A_nc)`` with ``alpha_c = mean_n G_nc``
    ``hires``:             ``relu(sum_c G_nc A_nc)``   (gradient x activation per token)

on the token grid ``(t, h, w)``. At the last block every token gets the same gradient, so both
modes agree there. Relevance is divided by its maximum (or a shared ``scale``), repeated over
each tubelet's frames and resized bilinearly to the frame size, then drawn over the frames.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from flax import nnx
from matplotlib.figure import Figure

from marlin_jax.models import MarlinEncoder, MarlinModel, video_to_float

__all__ = ["MODES", "FeatureGradCam", "frames_figure", "grad_relevance", "load_clips", "normalise", "overlay",
           "upsample"]

MODES = ("gradcam", "hires")


def grad_relevance(
    head: Callable[[jax.Array], jax.Array],
    acts: jax.Array,
    indices: jax.Array,
    mode: str = "gradcam",
) -> tuple[jax.Array, jax.Array]:
    """Signed token relevance of features ``head(acts)[:, indices]`` (before the ReLU).

    head: ``(B, N, D) -> (B, D_out)``, acting on each sample independently.
    acts: ``(B, N, D)``; indices: int ``(F,)``.
    Returns ``(relevance (B, F, N), feature values (B, F))``. One forward pass, then one reverse
    pass per feature through ``jax.vjp`` (vmapped: the F passes share the forward residuals).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    feats, vjp = jax.vjp(head, acts)
    cotangents = jax.nn.one_hot(indices, feats.shape[-1], dtype=feats.dtype)  # (F, D_out)
    # a cotangent broadcast over the batch gives every sample its own gradient (samples are
    # independent), so one vjp per feature serves the whole batch
    grads = jax.vmap(lambda c: vjp(jnp.broadcast_to(c, feats.shape))[0])(cotangents)  # (F,B,N,D)
    if mode == "gradcam":
        grads = grads.mean(axis=2, keepdims=True)
    relevance = jnp.einsum("fbnd,bnd->bfn", grads, acts)
    return relevance, feats[:, indices]


class FeatureGradCam:
    """Jitted Grad-CAM of MARLIN feature dimensions for batches of clips.

    >>> cam = FeatureGradCam(marlin.model)                    # MarlinModel or MarlinEncoder
    >>> rel, vals = cam.relevance(clips, [397, 231])          # (B, 2, 8, 14, 14), (B, 2)
    >>> maps = upsample(normalise(rel), cam.config)           # (B, 2, 16, 224, 224) in [0, 1]

    layer: the encoder block whose output tokens are weighted (negative counts from the end;
    -1 = the last block). mode: ``"gradcam"`` or ``"hires"`` (see the module docstring).
    """

    def __init__(self, model, *, layer: int = -1, mode: str = "gradcam"):
        """model: a MarlinModel, its MarlinEncoder, or a ``marlin_jax.extract.Marlin``."""
        model = getattr(model, "model", model)  # marlin_jax.extract.Marlin holds `.model`
        encoder = model.encoder if isinstance(model, MarlinModel) else model
        if not isinstance(encoder, MarlinEncoder):
            raise TypeError(f"expected a MarlinModel or MarlinEncoder, got {type(model).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        depth = len(encoder.blocks)
        if not -depth <= layer < depth:
            raise ValueError(f"layer {layer} out of range for an encoder of {depth} blocks")
        self.layer, self.mode = layer % depth, mode
        self.config = encoder.config
        self.feature_dim = encoder.config.encoder_embed_dim
        graphdef, self._state = nnx.split(encoder)
        split = self.layer + 1

        def fn(state, clips, indices):
            enc = nnx.merge(graphdef, state)
            acts = enc.embed(clips.astype(jnp.float32))
            for block in enc.blocks[:split]:
                acts = block(acts)

            def head(a):
                for block in enc.blocks[split:]:
                    a = block(a)
                return enc.pool_and_norm(a, keep_seq=False)

            return grad_relevance(head, acts, indices, mode)

        self._fn = jax.jit(fn)

    def relevance(self, clips: np.ndarray | jax.Array, features: Sequence[int], *,
                  signed: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Token relevance of ``features`` for ``clips (B, T, H, W, 3)`` (float in [0, 1] or
        uint8): ``(B, F, t, h, w)`` (ReLU'd unless ``signed``) and feature values ``(B, F)``."""
        idx = np.asarray(features, dtype=np.int32).reshape(-1)
        if idx.size == 0:
            raise ValueError("no feature indices given")
        bad = idx[(idx < 0) | (idx >= self.feature_dim)]
        if bad.size:
            raise ValueError(
                f"feature indices {bad.tolist()} out of range: the model's features have "
                f"{self.feature_dim} dimensions (0..{self.feature_dim - 1})"
            )
        x = video_to_float(jnp.asarray(clips))
        rel, vals = self._fn(self._state, x, jnp.asarray(idx))
        rel = np.asarray(rel).reshape(rel.shape[:2] + self.config.grid)
        return (rel if signed else np.maximum(rel, 0.0)), np.asarray(vals)


def normalise(relevance: np.ndarray, scale: float | np.ndarray | None = None) -> np.ndarray:
    """Relevance ``(..., t, h, w)`` divided by its maximum over each ``(t, h, w)`` map (or by
    ``scale``, e.g. one maximum shared by a pre and a post clip), clipped to [0, 1]. A map with
    no positive relevance stays 0."""
    rel = np.maximum(np.asarray(relevance, dtype=np.float32), 0.0)
    if scale is None:
        scale = rel.max(axis=(-3, -2, -1), keepdims=True)
    scale = np.asarray(scale, dtype=np.float32)
    return np.clip(np.divide(rel, scale, out=np.zeros_like(rel), where=scale > 0), 0.0, 1.0)


def upsample(maps: np.ndarray, config) -> np.ndarray:
    """Token maps ``(..., t, h, w)`` -> frame maps ``(..., T, H, W)``: each tubelet slice repeated
    over its ``tubelet_size`` frames, space resized bilinearly (pixel centres aligned)."""
    maps = jnp.asarray(maps, dtype=jnp.float32)
    out = jax.image.resize(maps, maps.shape[:-2] + (config.img_size, config.img_size), "linear")
    return np.repeat(np.asarray(out), config.tubelet_size, axis=-3)


def overlay(frames: np.ndarray, heat: np.ndarray, *, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blends a colour-mapped heat map ``(T, H, W)`` in [0, 1] over uint8 frames
    ``(T, H, W, 3)``: returns uint8 ``(T, H, W, 3)``."""
    colours = matplotlib.colormaps[cmap](np.clip(heat, 0, 1))[..., :3] * 255.0
    out = (1.0 - alpha) * frames.astype(np.float32) + alpha * colours
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _to_square(clip: np.ndarray, size: int) -> np.ndarray:
    """Centre-crops frames ``(T, H, W, 3)`` to a square and resizes them to ``size``."""
    from marlin_jax.data.records import resize_frames

    h, w = clip.shape[1:3]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    return resize_frames(np.ascontiguousarray(clip[:, y0 : y0 + s, x0 : x0 + s]), size)


def load_clips(
    path: str | os.PathLike,
    config,
    *,
    windows: str = "first",
    sample_rate: int = 2,
    stride: int = 16,
    crop_face: bool = False,
) -> Iterator[np.ndarray]:
    """Clips uint8 ``(n_frames, img_size, img_size, 3)`` of a video, with the extraction windows
    (:func:`marlin_jax.extract.iter_windows`: a short video is padded by repeating its last
    frame). ``windows="first"`` yields only the first clip, ``"all"`` every window. Frames that
    are not ``img_size`` squares are face-cropped (``crop_face``) or centre-cropped and resized.
    """
    from marlin_jax.extract import face_windows, iter_windows
    from marlin_jax.video_io import iter_frames

    if windows not in ("first", "all"):
        raise ValueError(f"windows must be 'first' or 'all', got {windows!r}")
    if crop_face:  # faces tracked over the whole video, as extraction does (a fade-in keeps its windows)
        from marlin_jax.face import FaceCropper

        gen = face_windows(os.fspath(path), FaceCropper(size=config.img_size), config.n_frames,
                           sample_rate, stride)
    else:
        raw = iter_windows(iter_frames(path), config.n_frames, sample_rate, stride)
        gen = (_to_square(clip, config.img_size) for clip in raw)
    yield from itertools.islice(gen, 1 if windows == "first" else None)


def frames_figure(rows: Sequence[tuple[str, np.ndarray]], title: str, *, frames_shown: int | None = None) -> Figure:
    """A grid of frames: one row per ``(label, uint8 (T, H, W, 3))`` (e.g. the frames, then their
    heat-map overlays), one column per shown frame (``frames_shown`` evenly spaced; None: all)."""
    n = rows[0][1].shape[0]
    cols = np.arange(n) if frames_shown is None or frames_shown >= n else np.unique(
        np.linspace(0, n - 1, frames_shown).round().astype(int))
    fig = Figure(figsize=(len(cols), len(rows) + 0.45), layout="constrained")  # one-inch tiles
    axes = fig.subplots(len(rows), len(cols), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c, t in enumerate(cols):
            ax = axes[r, c]
            ax.imshow(images[t])
            ax.set(xticks=[], yticks=[])
            ax.spines[:].set_visible(False)
            if r == 0:
                ax.set_title(f"frame {t}", fontsize=7)
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig
