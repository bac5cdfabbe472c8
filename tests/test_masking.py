"""Token masks: exact counts, the original MARLIN fasking semantics, determinism, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marlin_jax.masking import (
    BACKGROUND_GROUP,
    SEG_GROUPS,
    SKIN_GROUP,
    STRATEGIES,
    fasking_from_patch_labels,
    fasking_slice_masks,
    keep_queue,
    make_mask,
    num_visible,
    patch_label_bits,
)

FACE_STRATEGIES = ("fasking", "fasking_opp")


def region_patch_masks(parsing_slice: np.ndarray, patch_size: int = 16) -> np.ndarray:
    """Reference: the ``patch_size`` max-pool of ``parsing_slice == l`` for l in 0..10, bool (11, gh, gw)."""
    h, w = parsing_slice.shape
    blocks = parsing_slice.reshape(h // patch_size, patch_size, w // patch_size, patch_size)
    return np.stack([(blocks == label).any(axis=(1, 3)) for label in range(11)])


# ----------------------------------------------------------------------------------------------
# Test data
# ----------------------------------------------------------------------------------------------
def blob_maps(
    rng: np.random.Generator, frames: int, height: int, width: int, block: int, bg: float = 0.4
) -> np.ndarray:
    """Piecewise-constant random label maps uint8 (T, H, W): blocks of ``block`` pixels (not
    aligned to the patch grid), background with probability ``bg``, else a label in 1..10."""
    gh, gw = -(-height // block), -(-width // block)
    low = rng.integers(1, 11, size=(frames, gh, gw))
    low[rng.random(low.shape) < bg] = 0
    up = np.repeat(np.repeat(low, block, axis=1), block, axis=2)
    return up[:, :height, :width].astype(np.uint8)


def max_pool(binary: np.ndarray, k: int) -> np.ndarray:
    """``F.max_pool2d(x, kernel_size=k)`` of a (C, H, W) float array (floor mode, no padding)."""
    c, h, w = binary.shape
    blocks = binary[:, : h // k * k, : w // k * k].reshape(c, h // k, k, w // k, k)
    return blocks.max(axis=(2, 4)).astype(np.float32)


def original_mask(
    strategy: str,
    mask_percentage_target: float,
    rng: np.random.Generator,
    parsing_files: list[np.ndarray] | None,
    grid: tuple[int, int, int],
    patch_size: int,
    tubelet_size: int,
) -> np.ndarray:
    """Line-by-line transcription of ControlNet/MARLIN ``YoutubeFace.__getitem__`` + ``gen_mask``
    (torch -> numpy float32, ``np.random`` -> ``rng``). ``parsing_files[i]`` is what the original
    ``np.load``s for clip frame i: an int64 ``(F, H, W)`` array, F == 0 when no face was found."""
    seg_groups = [[2, 4], [3, 5], [6], [7, 8, 9], [10], [1], [0]]
    clip_frames = grid[0] * tubelet_size
    target_keep = 1 - mask_percentage_target  # self.mask_percentage_target in the original
    face_strategy = strategy in ("fasking", "fasking_opp")
    face_masking_opposite = strategy == "fasking_opp"

    def gen_mask(face_parsing, keep_queue):
        patch_masking = np.zeros((grid[1], grid[2]), dtype=np.float32)
        if not face_strategy:
            patch_masking[:] = 1
            return patch_masking
        if face_parsing.shape[0] > 0:
            terminate = False
            for i in keep_queue:
                if terminate:
                    break
                for comp_value in seg_groups[i]:
                    pooled = max_pool((face_parsing == comp_value).astype(np.float32), patch_size)
                    patch_masking = np.maximum(patch_masking, pooled[0])
                    # torch: float32 tensor mean >= python float (compared in float32)
                    if np.float32(patch_masking.mean(dtype=np.float32)) >= np.float32(target_keep):
                        terminate = True
                        break
        else:
            patch_masking[:] = 1.0
        return patch_masking

    masks = np.zeros((clip_frames // tubelet_size, grid[1], grid[2]), dtype=np.float32)
    if face_strategy:
        if face_masking_opposite:
            keep_queue = np.concatenate([rng.permutation(5), [5, 6]])
        else:
            keep_queue = np.concatenate([[6, 5], rng.permutation(5)])
    else:
        keep_queue = None

    for i in range(clip_frames):
        if i % tubelet_size == 0:
            face_parsing = parsing_files[i] if face_strategy else None
            masks[i // tubelet_size] = gen_mask(face_parsing, keep_queue)

    if strategy == "tube":
        first_mask = masks[0].flatten().astype(bool)
        target_visible_num = math.ceil(len(first_mask) * target_keep)
        visible_indexes = first_mask.nonzero()[0]
        extra_indexes = rng.choice(
            visible_indexes, len(visible_indexes) - target_visible_num, replace=False
        )
        first_mask[extra_indexes] = False
        masks = np.tile(first_mask, clip_frames // tubelet_size)
    elif strategy == "frame":
        frame_mask = np.ones(clip_frames // tubelet_size, dtype=np.float32)
        target_visible_num = math.ceil(len(frame_mask) * target_keep)
        visible_indexes = frame_mask.nonzero()[0]
        extra_indexes = rng.choice(
            visible_indexes, len(visible_indexes) - target_visible_num, replace=False
        )
        frame_mask[extra_indexes] = 0.0
        masks = np.broadcast_to(frame_mask[:, None, None], masks.shape).flatten().astype(bool)
    else:
        masks = masks.flatten().astype(bool)

    target_visible_num = int(len(masks) * target_keep)
    visible_indexes = masks.nonzero()[0]
    extra_indexes = rng.choice(visible_indexes, len(visible_indexes) - target_visible_num, replace=False)
    masks[extra_indexes] = False
    return masks


# ----------------------------------------------------------------------------------------------
# Golden: same masks as the original algorithm with the same random draws
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mask_ratio", [0.9, 0.75, 0.5, 0.1])
def test_matches_original_transcription(strategy: str, mask_ratio: float) -> None:
    grid, patch, tubelet = (4, 6, 5), 8, 2
    for seed in range(6):
        data_rng = np.random.default_rng(1000 + seed)
        maps = blob_maps(data_rng, grid[0] * tubelet, grid[1] * patch, grid[2] * patch,
                         block=int(data_rng.integers(3, 14)), bg=float(data_rng.uniform(0, 0.8)))
        files = [m[None].astype(np.int64) for m in maps]  # the original's npy: int64 (1, H, W)
        if seed == 5:
            files[2] = np.zeros((0, *maps.shape[1:]), np.int64)  # a frame where no face was found
        expected = original_mask(strategy, mask_ratio, np.random.default_rng(seed), files, grid,
                                 patch, tubelet)
        got = make_mask(strategy, mask_ratio, np.random.default_rng(seed), parsing=files, grid=grid,
                        patch_size=patch, tubelet_size=tubelet)
        np.testing.assert_array_equal(got, expected)
        if seed < 5:  # the stacked uint8 (T, H, W) form gives the same mask
            stacked = make_mask(strategy, mask_ratio, np.random.default_rng(seed), parsing=maps,
                                grid=grid, patch_size=patch, tubelet_size=tubelet)
            np.testing.assert_array_equal(stacked, expected)


@pytest.mark.parametrize("strategy", FACE_STRATEGIES)
def test_matches_original_at_full_size(strategy: str) -> None:
    """The released configuration: 16 frames, 224x224, 16x16 patches, tubelet 2, ratio 0.9."""
    rng = np.random.default_rng(7)
    maps = blob_maps(rng, 16, 224, 224, block=37, bg=0.3)
    files = [m[None].astype(np.int64) for m in maps]
    expected = original_mask(strategy, 0.9, np.random.default_rng(3), files, (8, 14, 14), 16, 2)
    got = make_mask(strategy, 0.9, np.random.default_rng(3), parsing=maps)
    np.testing.assert_array_equal(got, expected)
    # only the slice-first frames (what a loader that reads 8 of 16 npy files passes)
    got8 = make_mask(strategy, 0.9, np.random.default_rng(3), parsing=maps[::2])
    np.testing.assert_array_equal(got8, expected)


@pytest.mark.parametrize("strategy", FACE_STRATEGIES)
def test_matches_original_on_synthetic_faces(strategy: str) -> None:
    """Realistic parsing maps (the built-in synthetic faces) at the released sizes."""
    from marlin_jax.data.synthetic import render_video

    for index, ratio in ((0, 0.9), (1, 0.75), (2, 0.5)):
        maps = render_video(index, num_frames=16, size=224)["parsing"]
        files = [m[None].astype(np.int64) for m in maps]
        expected = original_mask(strategy, ratio, np.random.default_rng(index), files, (8, 14, 14),
                                 16, 2)  # fmt: skip
        got = make_mask(strategy, ratio, np.random.default_rng(index), parsing=maps)
        np.testing.assert_array_equal(got, expected)


def patch_labels_of(files: list[np.ndarray], patch: int) -> np.ndarray:
    """Per-frame original npy files ((1, H, W) or (0, H, W) = no face) -> uint16 bit sets."""
    h, w = files[0].shape[1:]
    return np.stack([patch_label_bits(f[:1], patch)[0] if f.shape[0] else
                     np.zeros((h // patch, w // patch), np.uint16) for f in files])


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mask_ratio", [0.9, 0.5])
def test_patch_labels_give_the_masks_of_the_full_maps(strategy: str, mask_ratio: float) -> None:
    """Fasking from per-patch label bits (what the records store) = fasking from the maps = the
    original, for the same seed; with empty slices and labels outside 0..10 too."""
    grid, patch, tubelet = (4, 6, 5), 8, 2
    for seed in range(8):
        data_rng = np.random.default_rng(2000 + seed)
        maps = blob_maps(data_rng, grid[0] * tubelet, grid[1] * patch, grid[2] * patch,
                         block=int(data_rng.integers(3, 14)), bg=float(data_rng.uniform(0, 0.8)))
        files = [m[None].astype(np.int64) for m in maps]
        if seed % 3 == 2:
            files[2 * (seed % grid[0])] = np.zeros((0, *maps.shape[1:]), np.int64)
        if seed == 7:
            files[0][0, :3, :3] = 200  # out-of-range labels: in a patch, in no group
        expected = original_mask(strategy, mask_ratio, np.random.default_rng(seed), files, grid,
                                 patch, tubelet)
        bits = patch_labels_of(files, patch)
        for form in (bits, bits[::tubelet]):  # every frame, or the slice-first frames only
            got = make_mask(strategy, mask_ratio, np.random.default_rng(seed), patch_labels=form,
                            grid=grid, patch_size=patch, tubelet_size=tubelet)
            np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("strategy", FACE_STRATEGIES)
def test_patch_labels_of_synthetic_faces_at_full_size(strategy: str) -> None:
    from marlin_jax.data.synthetic import render_video

    for index, ratio in ((3, 0.9), (4, 0.75)):
        maps = render_video(index, num_frames=16, size=224)["parsing"]
        expected = make_mask(strategy, ratio, np.random.default_rng(index), parsing=maps)
        got = make_mask(strategy, ratio, np.random.default_rng(index),
                        patch_labels=patch_label_bits(maps[::2], 16))
        np.testing.assert_array_equal(got, expected)
        queue = keep_queue(strategy, np.random.default_rng(0))
        np.testing.assert_array_equal(
            fasking_from_patch_labels(patch_label_bits(maps[::2]), queue, 1 - ratio),
            fasking_slice_masks(maps[::2], queue, 1 - ratio))


def test_patch_labels_bad_shape_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"patch_labels must be \(8, 14, 14\)"):
        make_mask("fasking", 0.9, np.random.default_rng(0),
                  patch_labels=np.zeros((8, 7, 7), np.uint16))


def test_exhausted_queue_raises_like_the_original() -> None:
    """Labels outside 0..10 belong to no group; when they leave too few visible patches the
    original crashes in np.random.choice, and so do we (with a clear message)."""
    grid, patch = (2, 3, 3), 4
    maps = np.full((4, 12, 12), 200, np.uint8)
    maps[:, :4, :4] = 0  # one background patch per slice: 2 visible, 9 needed at ratio 0.5
    with pytest.raises(ValueError, match="negative|non-negative"):
        original_mask("fasking", 0.5, np.random.default_rng(0), [m[None] for m in maps], grid,
                      patch, 2)
    with pytest.raises(ValueError, match="fewer than the 9 required"):
        make_mask("fasking", 0.5, np.random.default_rng(0), parsing=maps, grid=grid,
                  patch_size=patch)
    # ... but out-of-range labels are fine while enough patches remain (ratio 0.9: 1 needed)
    mask = make_mask("fasking", 0.9, np.random.default_rng(0), parsing=maps, grid=grid,
                     patch_size=patch)
    expected = original_mask("fasking", 0.9, np.random.default_rng(0), [m[None] for m in maps],
                             grid, patch, 2)
    np.testing.assert_array_equal(mask, expected)


# ----------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------
grids = st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5))


@settings(max_examples=120, deadline=None)
@given(
    strategy=st.sampled_from(STRATEGIES),
    mask_ratio=st.floats(0.0, 0.99),
    grid=grids,
    patch=st.sampled_from([1, 2, 4]),
    tubelet=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_exact_visible_count(strategy, mask_ratio, grid, patch, tubelet, seed) -> None:
    rng = np.random.default_rng(seed)
    maps = blob_maps(rng, grid[0] * tubelet, grid[1] * patch, grid[2] * patch, block=3,
                     bg=float(rng.uniform(0, 1)))
    mask = make_mask(strategy, mask_ratio, rng, parsing=maps, grid=grid, patch_size=patch,
                     tubelet_size=tubelet)
    n = grid[0] * grid[1] * grid[2]
    assert mask.dtype == np.bool_ and mask.shape == (n,)
    assert mask.sum() == num_visible(mask_ratio, n) == int(n * (1 - mask_ratio))


@settings(max_examples=80, deadline=None)
@given(
    strategy=st.sampled_from(FACE_STRATEGIES),
    mask_ratio=st.floats(0.0, 0.99),
    grid=grids,
    seed=st.integers(0, 2**32 - 1),
)
def test_fasking_keeps_queue_regions_first(strategy, mask_ratio, grid, seed) -> None:
    """Per slice, the pre-count visible set is the union of the queue's label regions up to the
    first label that reaches the keep fraction; the final mask lies inside it. For fasking the
    queue starts with the background group (6) then skin (5): both are fully visible before the
    exact-count step whenever background alone does not fill the budget."""
    patch, keep = 4, 1 - mask_ratio
    rng = np.random.default_rng(seed)
    maps = blob_maps(rng, grid[0], grid[1] * patch, grid[2] * patch, block=5,
                     bg=float(rng.uniform(0, 0.9)))
    queue = keep_queue(strategy, np.random.default_rng(seed))
    pre = fasking_slice_masks(maps, queue, keep, patch)
    labels = [label for g in queue for label in SEG_GROUPS[int(g)]]  # the order fasking ORs them in
    assert sorted(labels) == list(range(11))
    if strategy == "fasking":
        assert labels[0] == 0 and labels[1] == 1  # background, then skin
        assert list(queue[:2]) == [BACKGROUND_GROUP, SKIN_GROUP]
    else:
        assert list(queue[-2:]) == [SKIN_GROUP, BACKGROUND_GROUP]
    per_slice = grid[1] * grid[2]
    for t in range(grid[0]):
        regions = region_patch_masks(maps[t], patch)  # (11, gh, gw)
        union = np.zeros(regions.shape[1:], bool)
        for label in labels:
            union |= regions[label]
            if np.float32(union.sum() / np.float32(per_slice)) >= np.float32(keep):
                break
        np.testing.assert_array_equal(pre[t], union)
        assert pre[t][regions[labels[0]]].all()  # the first group's label is always kept
        if strategy == "fasking" and regions[0].sum() / per_slice < keep:
            assert pre[t][regions[0] | regions[1]].all()
    final = make_mask(strategy, mask_ratio, np.random.default_rng(seed), parsing=maps, grid=grid,
                      patch_size=patch, tubelet_size=1)
    assert not (final & ~pre.reshape(-1)).any()


def test_fasking_masks_components_when_background_suffices() -> None:
    """A face filling the middle, background around it: at ratio 0.9 only patches touching the
    background stay visible (MARLIN masks the facial components), fasking_opp the reverse."""
    maps = np.zeros((16, 224, 224), np.uint8)
    maps[:, 40:200, 50:180] = 1
    maps[:, 80:100, 70:160] = 4  # eyes
    maps[:, 150:170, 90:140] = 8  # mouth
    for strategy in FACE_STRATEGIES:
        for seed in range(5):
            mask = make_mask(strategy, 0.9, np.random.default_rng(seed), parsing=maps)
            bg = np.repeat(region_patch_masks(maps[0])[0].reshape(-1)[None], 8, 0).reshape(-1)
            if strategy == "fasking":
                assert mask[bg].sum() == mask.sum() == 156
            else:
                assert not mask[bg].any()


def test_tube_is_constant_over_time() -> None:
    grid = (8, 14, 14)
    # ratio 0.75: 8 * ceil(196 * 0.25) == int(1568 * 0.25), so no extra drop: exactly constant
    mask = make_mask("tube", 0.75, np.random.default_rng(0), grid=grid).reshape(8, 196)
    assert (mask == mask[0]).all() and mask[0].sum() == 49
    # ratio 0.9: 8 * 20 = 160 visible before the exact step, 156 after: the original drops 4 more
    # tokens anywhere, so slices share one 20-token tube and lose at most gt tokens in total
    for seed in range(20):
        mask = make_mask("tube", 0.9, np.random.default_rng(seed), grid=grid).reshape(8, 196)
        tube = mask.any(0)
        assert tube.sum() <= math.ceil(196 * 0.1)
        assert (tube[None] & ~mask).sum() == 8 * math.ceil(196 * 0.1) - 156


def test_frame_masks_whole_slices() -> None:
    grid = (8, 14, 14)
    mask = make_mask("frame", 0.75, np.random.default_rng(0), grid=grid).reshape(8, 196)
    per_slice = mask.sum(1)
    assert sorted(per_slice.tolist()) == [0] * 6 + [196] * 2
    for seed in range(20):
        mask = make_mask("frame", 0.9, np.random.default_rng(seed), grid=grid).reshape(8, 196)
        assert (mask.any(1)).sum() <= math.ceil(8 * 0.1)  # ceil(0.8) = 1 slice visible


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_deterministic_given_rng(strategy: str) -> None:
    maps = blob_maps(np.random.default_rng(0), 16, 224, 224, block=20)
    a = make_mask(strategy, 0.9, np.random.default_rng(42), parsing=maps)
    b = make_mask(strategy, 0.9, np.random.default_rng(42), parsing=maps)
    c = make_mask(strategy, 0.9, np.random.default_rng(43), parsing=maps)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_empty_parsing_means_all_visible() -> None:
    """No face in any frame: fasking degenerates to the random strategy (after its queue draw)."""
    empty = [np.zeros((0, 224, 224), np.int64)] * 16
    for layout in (empty, np.zeros((16, 0, 224, 224), np.int64)):
        got = make_mask("fasking", 0.9, np.random.default_rng(5), parsing=layout)
        rng = np.random.default_rng(5)
        rng.permutation(5)
        np.testing.assert_array_equal(got, make_mask("random", 0.9, rng))
    # one empty slice among parsed ones: that slice is all visible before the exact step
    maps = [np.zeros((1, 8, 8), np.uint8)] * 2
    maps[1] = np.zeros((0, 8, 8), np.uint8)
    pre_all = make_mask("fasking", 0.0, np.random.default_rng(0), parsing=maps, grid=(2, 2, 2),
                        patch_size=4, tubelet_size=1)
    assert pre_all.all()


def test_region_patch_masks_and_bits() -> None:
    m = np.zeros((32, 32), np.uint8)
    m[0, 0] = 6  # one pixel is enough for the max-pool
    m[20:, 20:] = 10
    m[31, 0] = 250  # out of range label
    regions = region_patch_masks(m, 16)
    assert regions.shape == (11, 2, 2)
    assert regions[6].tolist() == [[True, False], [False, False]]
    assert regions[10].tolist() == [[False, False], [False, True]]
    assert regions[0].all()
    bits = patch_label_bits(m[None], 16)[0]
    from_bits = (bits[None] >> np.arange(11, dtype=np.uint16)[:, None, None]) & 1 == 1
    np.testing.assert_array_equal(from_bits, regions)
    assert bits[1, 0] >> 11 != 0  # "other" label present
    assert patch_label_bits(m[None].astype(np.int64) - 300, 16).shape == (1, 2, 2)


def test_num_visible() -> None:
    assert num_visible(0.9, 1568) == 156
    assert num_visible(0.75, 1568) == 392
    assert num_visible(0.0, 1568) == 1568
    with pytest.raises(ValueError, match="mask_ratio"):
        num_visible(1.0, 1568)


def test_bad_input() -> None:
    rng = np.random.default_rng(0)
    maps = np.zeros((16, 224, 224), np.uint8)
    with pytest.raises(ValueError, match="unknown mask strategy 'face'"):
        make_mask("face", 0.9, rng, parsing=maps)
    for ratio in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="mask_ratio must be in"):
            make_mask("random", ratio, rng)
    with pytest.raises(ValueError, match="needs the clip's face-parsing maps"):
        make_mask("fasking", 0.9, rng)
    with pytest.raises(ValueError, match="parsing has 5 frames"):
        make_mask("fasking", 0.9, rng, parsing=maps[:5])
    with pytest.raises(ValueError, match=r"frame 0 has shape \(112, 112\)"):
        make_mask("fasking", 0.9, rng, parsing=maps[:, :112, :112])
    with pytest.raises(ValueError, match="frame 2 has shape"):
        make_mask("fasking", 0.9, rng, parsing=[m[:100] if i == 2 else m for i, m in enumerate(maps)])
    with pytest.raises(ValueError, match="integer labels"):
        make_mask("fasking", 0.9, rng, parsing=maps.astype(np.float32))
    with pytest.raises(ValueError, match="grid must be"):
        make_mask("random", 0.9, rng, grid=(8, 0, 14))
    with pytest.raises(ValueError, match="keep_queue is for"):
        keep_queue("tube", rng)


def test_seg_groups_cover_every_label_once() -> None:
    assert sorted(label for g in SEG_GROUPS for label in g) == list(range(11))
    assert SEG_GROUPS[BACKGROUND_GROUP] == (0,) and SEG_GROUPS[SKIN_GROUP] == (1,)


def test_an_empty_keep_queue_is_refused():
    bits = np.zeros((2, 4, 4), np.uint16)
    with pytest.raises(ValueError, match="keep queue is empty"):
        fasking_from_patch_labels(bits, [], 0.5)
