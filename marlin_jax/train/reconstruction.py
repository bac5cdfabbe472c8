"""Reconstruction images, as the original's ``_log_sample_reconstruction_image``: original |
masked input (masked tubelets grey) | reconstruction (visible pixels + predicted masked ones)."""

from __future__ import annotations

import os

import cv2
import numpy as np

from marlin_jax.models import patchify, unpatchify

COLUMN_TITLES = ("original", "masked input", "reconstruction")
MIN_COLUMN_WIDTH = 192  # pixels: small clips (the 64 px demo) are enlarged to at least this
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def reconstruction_grid(video: np.ndarray, mask: np.ndarray, pred: np.ndarray, *,
                        patch_size: int, tubelet_size: int, num_frames: int = 4) -> np.ndarray:
    """A uint8 RGB image ``(header + rows * s * H, 3 * s * W, 3)`` of ONE clip, one row per shown
    frame (``num_frames``, evenly spaced), enlarged ``s = ceil(MIN_COLUMN_WIDTH / W)`` times, under
    a header naming the columns. video: ``(T, H, W, 3)`` uint8 or float in [0, 1]; mask: bool
    ``(N,)`` True = visible; pred: ``(N - k, patch_dim)`` masked tokens' pixels in token order."""
    video = np.asarray(video)
    x = video.astype(np.float32) / 255.0 if video.dtype == np.uint8 else video.astype(np.float32)
    t, h, w, _ = x.shape
    grid = (t // tubelet_size, h // patch_size, w // patch_size)
    mask = np.asarray(mask, bool)
    pred = np.asarray(pred, np.float32)
    if mask.shape != (int(np.prod(grid)),) or pred.shape[0] != int((~mask).sum()):
        raise ValueError(f"mask {mask.shape} / pred {pred.shape} do not match the clip "
                         f"{video.shape} (token grid {grid})")
    patches = np.asarray(patchify(x[None], patch_size, tubelet_size))[0]  # (N, P)
    masked = np.where(mask[:, None], patches, np.float32(0.5))
    recon = patches.copy()
    recon[~mask] = pred
    def to_video(p):
        return np.asarray(unpatchify(p[None], grid, patch_size, tubelet_size))[0]
    columns = [x, to_video(masked), np.clip(to_video(recon), 0.0, 1.0)]
    frames = np.unique(np.linspace(0, t - 1, max(1, min(num_frames, t))).round().astype(int))
    rows = [np.concatenate([c[f] for c in columns], axis=1) for f in frames]
    body = (np.concatenate(rows, axis=0) * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
    scale = max(1, -(-MIN_COLUMN_WIDTH // w))
    if scale > 1:
        body = cv2.resize(body, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    return np.concatenate([_header(w * scale, COLUMN_TITLES), body], axis=0)


def _header(column_width: int, titles: tuple[str, ...]) -> np.ndarray:
    """A white uint8 RGB row ``(h, len(titles) * column_width, 3)`` with each title centred in
    black over its column, at the largest font size (up to 0.8) that fits the column."""
    widest = max(cv2.getTextSize(t, _FONT, 1.0, 1)[0][0] for t in titles)
    font_scale = max(0.3, min(0.8, (column_width - 8) / widest))
    text_h = cv2.getTextSize("Ag", _FONT, font_scale, 1)[0][1]
    height = text_h * 2 + 8
    row = np.full((height, column_width * len(titles), 3), 255, np.uint8)
    for i, title in enumerate(titles):
        (tw, _), _ = cv2.getTextSize(title, _FONT, font_scale, 1)
        x = i * column_width + (column_width - tw) // 2
        cv2.putText(row, title, (x, (height + text_h) // 2), _FONT, font_scale, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return row


def save_png(image: np.ndarray, path: str | os.PathLike) -> str:
    """Writes an RGB uint8 image as PNG (creating the folder); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if not cv2.imwrite(path, cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR)):
        raise OSError(f"{path}: could not write PNG")
    return path
