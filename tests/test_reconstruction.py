"""Reconstruction images of the trainer: labelled columns, small clips enlarged."""

from __future__ import annotations

import numpy as np
import pytest

from marlin_jax.models import patchify
from marlin_jax.train import reconstruction


def test_small_clips_are_enlarged_under_labelled_columns():
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (4, 64, 64, 3), np.uint8)  # the demo's 64 px clips
    n = 2 * 4 * 4
    mask = np.zeros(n, bool)
    mask[::5] = True
    true = np.asarray(patchify(video[None].astype(np.float32) / 255, 16, 2))[0]
    img = reconstruction.reconstruction_grid(video, mask, true[~mask], patch_size=16,
                                             tubelet_size=2, num_frames=2)
    scale = 3  # ceil(MIN_COLUMN_WIDTH / 64)
    body_h = 2 * 64 * scale
    assert img.shape[1:] == (3 * 64 * scale, 3) and img.dtype == np.uint8
    header, body = img[:-body_h], img[-body_h:]
    assert 20 <= len(header) <= 60
    small = body[::scale, ::scale]  # nearest-neighbour enlargement: every pixel a 3x3 block
    np.testing.assert_array_equal(body, small.repeat(scale, 0).repeat(scale, 1))
    np.testing.assert_array_equal(small[:64, :64], video[0])  # original
    np.testing.assert_array_equal(small[:64, 128:], video[0])  # perfect reconstruction
    np.testing.assert_array_equal(small[64:, :64], video[3])  # last frame in the last row
    assert (small[:16, 64 + 16:64 + 32] == 128).all()  # token 1 (masked) drawn grey
    # one dark title centred over each column, on white
    w = 64 * scale
    for col in range(3):
        dark = (header[:, col * w:(col + 1) * w] < 128).any(axis=(0, 2))
        assert dark.any(), f"column {col} has no title"
        xs = np.flatnonzero(dark)
        assert abs((xs[0] + xs[-1]) / 2 - w / 2) < 6 and xs[0] > 2 and xs[-1] < w - 3
    assert (header[:3] == 255).all()


def test_full_size_clips_are_not_enlarged():
    video = np.zeros((2, 224, 224, 3), np.uint8)
    mask = np.ones(196, bool)
    mask[0] = False
    img = reconstruction.reconstruction_grid(video, mask, np.zeros((1, 1536), np.float32),
                                             patch_size=16, tubelet_size=2, num_frames=2)
    assert img.shape[1] == 3 * 224 and img.shape[0] - 2 * 224 < 60
    assert reconstruction.COLUMN_TITLES == ("original", "masked input", "reconstruction")


def test_mask_or_prediction_that_do_not_match_the_clip_are_refused():
    video = np.zeros((4, 32, 32, 3), np.uint8)
    mask = np.array([True, False] * 4)
    with pytest.raises(ValueError, match="do not match"):
        reconstruction.reconstruction_grid(video, mask[:4], np.zeros((2, 1536), np.float32),
                                           patch_size=16, tubelet_size=2)
