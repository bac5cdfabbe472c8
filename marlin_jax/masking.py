"""Token masks for MARLIN pretraining, with exactly the original's semantics.

A 16x224x224 clip has ``grid = (8, 14, 14)`` tubelets (2 x 16 x 16 pixels): ``N = 1568`` tokens in
(t, h, w) order. A mask is bool ``(N,)``, True = visible, with exactly :func:`num_visible` ``=
int(N * (1 - mask_ratio))`` visible tokens (``gen_mask`` of ControlNet/MARLIN
``dataset/youtube_face.py``). Strategies:

- ``fasking`` / ``fasking_opp``: the LaPa parsing map of each tubelet slice's first frame (0
  background, 1 skin, 2/3 brows, 4/5 eyes, 6 nose, 7 upper lip, 8 inner mouth, 9 lower lip, 10
  hair), grouped as :data:`SEG_GROUPS`. A keep queue of groups is drawn per clip (``[6, 5,
  perm(5)]`` for fasking: background, skin, then the components, i.e. *mask the facial components
  first*; ``[perm(5), 5, 6]`` for fasking_opp). Walking it, each label's 16x16 max-pooled region is
  OR-ed into the slice's visible set, stopping right after the first *label* that lifts the visible
  fraction to ``1 - mask_ratio`` (compared in float32, as torch). A slice without a map (no face)
  is all visible.
- ``random``: all visible before the exact-count step.
- ``tube``: one ``(gh, gw)`` mask with ``ceil(gh * gw * keep)`` visible, repeated over time.
- ``frame``: ``ceil(gt * keep)`` whole time slices visible.

Exact-count step (all): visible tokens dropped uniformly at random (``rng.choice(visible, excess,
replace=False)``) down to ``int(N * keep)``, so tube / frame masks are *almost* constant, as the
original. Labels outside 0..10 can leave fewer visible tokens than the target: the original
crashes in ``np.random.choice``; this raises a ValueError saying so. Random draws follow the
original's order (fasking ``rng.permutation(5)``; tube / frame one ``rng.choice``; then the
exact-count ``rng.choice``), so the same Generator gives the same mask bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

STRATEGIES = ("fasking", "fasking_opp", "random", "tube", "frame")

NUM_LABELS = 11  # LaPa classes 0..10

LABEL_NAMES = (
    "background", "skin", "left_eyebrow", "right_eyebrow", "left_eye", "right_eye", "nose",
    "upper_lip", "inner_mouth", "lower_lip", "hair",
)  # fmt: skip

SEG_GROUPS: tuple[tuple[int, ...], ...] = ((2, 4), (3, 5), (6,), (7, 8, 9), (10,), (1,), (0,))
"""The original's ``YoutubeFace.seg_groups``; keep queues index into this tuple."""

SKIN_GROUP = 5
BACKGROUND_GROUP = 6

_OTHER_BIT = 15  # labels outside 0..10 map to bits 11..15: present in a patch, in no group

ParsingInput = np.ndarray | Sequence[np.ndarray]


def num_visible(mask_ratio: float, num_tokens: int) -> int:
    """Visible tokens per sample: ``int(num_tokens * (1 - mask_ratio))`` (the original's rounding)."""
    ratio = float(mask_ratio)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio!r}")
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    return int(num_tokens * (1 - ratio))


def keep_queue(strategy: str, rng: np.random.Generator) -> np.ndarray:
    """The per-clip order of :data:`SEG_GROUPS` indices kept visible, int64 ``(7,)``: fasking
    ``[6, 5, perm(5)]``, fasking_opp ``[perm(5), 5, 6]`` (one ``rng.permutation(5)``)."""
    if strategy not in ("fasking", "fasking_opp"):
        raise ValueError(f"keep_queue is for 'fasking' / 'fasking_opp', got {strategy!r}")
    perm = rng.permutation(5)
    ends = np.array([BACKGROUND_GROUP, SKIN_GROUP])
    return np.concatenate([ends, perm] if strategy == "fasking" else [perm, ends[::-1]])


def patch_label_bits(maps: np.ndarray, patch_size: int = 16) -> np.ndarray:
    """Which labels occur in each ``patch_size`` patch, as bit sets.

    maps: integer ``(S, H, W)`` with H, W multiples of ``patch_size``. Returns uint16
    ``(S, H // p, W // p)`` where bit ``l`` is set iff label ``l`` in 0..10 occurs in the patch
    (the original's ``max_pool2d(parsing == l, p)``); a bit in 11..15 marks some other label.
    """
    maps = np.asarray(maps)
    if not np.issubdtype(maps.dtype, np.integer):
        raise ValueError(f"parsing maps must hold integer labels, got dtype {maps.dtype}")
    if maps.dtype != np.uint8:  # labels outside 0..255 become 255 (an out-of-range label)
        maps = np.where((maps < 0) | (maps > 255), 255, maps).astype(np.uint8)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (S, H, W), got shape {maps.shape}")
    s, h, w = maps.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"map size {h}x{w} is not a multiple of patch_size {patch_size}")
    bits = np.left_shift(np.uint16(1), np.minimum(maps, _OTHER_BIT), dtype=np.uint16)
    # OR over the patch rows first (long contiguous runs), then over the patch columns
    rows = np.bitwise_or.reduce(bits.reshape(s * (h // patch_size), patch_size, w), axis=1)
    return np.bitwise_or.reduce(
        rows.reshape(s, h // patch_size, w // patch_size, patch_size), axis=3
    )


def fasking_slice_masks(maps: np.ndarray, queue: Sequence[int], keep_fraction: float,
                        patch_size: int = 16) -> np.ndarray:
    """Per-slice visible patches of fasking, *before* the exact-count step: bool ``(S, H // p, W // p)``.

    maps: integer ``(S, H, W)``, one per tubelet slice; queue: group indices (:func:`keep_queue`);
    keep_fraction: ``1 - mask_ratio``.
    """
    return fasking_from_patch_labels(patch_label_bits(maps, patch_size), queue, keep_fraction)


def fasking_from_patch_labels(
    patch_labels: np.ndarray, queue: Sequence[int], keep_fraction: float
) -> np.ndarray:
    """:func:`fasking_slice_masks` from per-patch label bit sets (:func:`patch_label_bits`).

    patch_labels: uint16 ``(S, gh, gw)``, one per tubelet slice; all-zero bits = no parsing map
    (no face): all visible. Returns bool ``(S, gh, gw)``. What the pipeline computes from.
    """
    bits = np.asarray(patch_labels)
    if bits.ndim != 3 or not np.issubdtype(bits.dtype, np.integer):
        raise ValueError(f"patch_labels must be integer (S, gh, gw), got {bits.dtype} "
                         f"{bits.shape}")
    s, gh, gw = bits.shape
    bits = bits.reshape(s, gh * gw).astype(np.uint16, copy=False)
    labels = np.array([label for g in queue for label in SEG_GROUPS[int(g)]], dtype=np.int64)  # in OR order
    if labels.size == 0:
        raise ValueError("keep queue is empty")
    prefix = np.bitwise_or.accumulate(np.left_shift(np.uint16(1), labels.astype(np.uint16)))
    visible = (bits[:, None, :] & prefix[None, :, None]) != 0  # (S, L, P) after each label
    # torch: float32 mean of the 0/1 patch mask >= python float, compared in float32
    frac = visible.sum(-1).astype(np.float32) / np.float32(gh * gw)
    reached = frac >= np.float32(keep_fraction)
    stop = np.where(reached.any(1), reached.argmax(1), labels.size - 1)
    out = visible[np.arange(s), stop]
    out[~bits.any(1)] = True  # no parsing map: the whole slice visible
    return out.reshape(s, gh, gw)


def _slice_patch_labels(
    parsing: ParsingInput, grid: tuple[int, int, int], patch_size: int, tubelet_size: int
) -> np.ndarray:
    """:func:`patch_label_bits` of each tubelet slice's first frame, uint16 ``(gt, gh, gw)`` (all
    zero: no face).

    ``parsing``: T integer maps (an array or a sequence), each ``(H, W)`` or ``(F, H, W)`` (F
    faces as the original's npy, face 0 used, F == 0 or an empty array meaning no face). T is
    ``gt * tubelet_size`` (slice t reads frame t * tubelet_size) or ``gt`` (one map per slice).
    """
    gt, gh, gw = grid
    hw = (gh * patch_size, gw * patch_size)
    n = len(parsing)
    if n not in (gt, gt * tubelet_size):
        raise ValueError(
            f"parsing has {n} frames; expected {gt * tubelet_size} (clip frames) or {gt} "
            f"(one per tubelet slice) for grid {grid}, tubelet_size {tubelet_size}"
        )
    step = 1 if n == gt else tubelet_size
    bits = np.zeros((gt, gh, gw), np.uint16)
    for t in range(gt):
        frame = np.asarray(parsing[t * step])
        if frame.size == 0:
            continue  # no face: all visible
        if frame.ndim == 3:
            frame = frame[0]
        if frame.shape != hw:
            raise ValueError(
                f"parsing map of frame {t * step} has shape {frame.shape}; expected {hw} "
                f"(optionally with a leading face axis) for grid {grid}, patch_size {patch_size}"
            )
        bits[t] = patch_label_bits(frame[None], patch_size)[0]
    return bits


def _drop_to(mask: np.ndarray, target: int, rng: np.random.Generator, what: str) -> np.ndarray:
    """Drops visible entries of a flat mask uniformly at random down to exactly ``target``."""
    visible = np.flatnonzero(mask)
    excess = visible.size - target
    if excess < 0:
        raise ValueError(
            f"{what}: only {visible.size} visible tokens before the exact-count step, fewer than "
            f"the {target} required (parsing labels outside 0..10 cover too much of the clip; "
            "the original MARLIN crashes here too)"
        )
    mask[rng.choice(visible, excess, replace=False)] = False
    return mask


def make_mask(
    strategy: str,
    mask_ratio: float,
    rng: np.random.Generator,
    parsing: ParsingInput | None = None,
    grid: tuple[int, int, int] = (8, 14, 14),
    patch_size: int = 16,
    tubelet_size: int = 2,
    patch_labels: np.ndarray | None = None,
) -> np.ndarray:
    """One clip's token mask: bool ``(gt * gh * gw,)``, True = visible, (t, h, w) order.

    Exactly ``int(N * (1 - mask_ratio))`` entries are True. Fasking needs ``parsing`` (the clip's
    LaPa maps, see :func:`_slice_patch_labels`; an empty per-frame array = no face) or ``patch_labels`` (the
    same as :func:`patch_label_bits`, uint16 ``(gt, gh, gw)`` or ``(T, gh, gw)``: the same mask for
    the same ``rng``). Deterministic given ``rng``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown mask strategy {strategy!r}; expected one of {STRATEGIES}")
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"grid must be three positive ints (gt, gh, gw), got {grid}")
    if patch_size < 1 or tubelet_size < 1:
        raise ValueError(f"patch_size and tubelet_size must be >= 1, got {patch_size}, "
                         f"{tubelet_size}")
    gt, gh, gw = (int(g) for g in grid)
    per_slice = gh * gw
    target = num_visible(mask_ratio, gt * per_slice)
    keep = 1 - float(mask_ratio)

    if strategy in ("fasking", "fasking_opp"):
        if patch_labels is None and parsing is None:
            raise ValueError(
                f"strategy {strategy!r} needs the clip's face-parsing maps (parsing=None given); "
                "use 'random' for clips without parsing maps"
            )
        if patch_labels is None:
            patch_labels = _slice_patch_labels(parsing, (gt, gh, gw), patch_size, tubelet_size)
        bits = np.asarray(patch_labels)
        if bits.ndim != 3 or bits.shape[1:] != (gh, gw) or len(bits) not in (gt, gt * tubelet_size):
            raise ValueError(f"patch_labels must be ({gt}, {gh}, {gw}) or ({gt * tubelet_size}, {gh}, "
                             f"{gw}) for grid {grid}, tubelet_size {tubelet_size}; got {bits.shape}")
        bits = bits[::tubelet_size] if len(bits) != gt else bits
        mask = fasking_from_patch_labels(bits, keep_queue(strategy, rng), keep).reshape(-1)
    elif strategy == "tube":
        tube = _drop_to(np.ones(per_slice, bool), math.ceil(per_slice * keep), rng, "tube")
        mask = np.tile(tube, gt)
    elif strategy == "frame":
        frames = _drop_to(np.ones(gt, bool), math.ceil(gt * keep), rng, "frame")
        mask = np.repeat(frames, per_slice)
    else:
        mask = np.ones(gt * per_slice, bool)
    return _drop_to(mask, target, rng, strategy)
