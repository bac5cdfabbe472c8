"""Agreement of the two face parsers (learned ``mediapipe-mesh`` vs. the ``template-5pt`` fallback)
on real videos, and of the fasking masks they induce.

    python scripts/compare_parsers.py [--videos ../shared/samples/*.mp4] [--step 3] [--json out.json]

Both parsers run on the same 224 x 224 face crops with the same detector landmarks (uncropped
videos are cropped with :class:`FaceCropper`; ``cropped*`` videos are already crops). Reported,
pooled over the frames of each video and over all videos:

- pixel agreement: fraction of pixels with the same LaPa label;
- per-class IoU of the two maps (and their mean over the classes present in either);
- face IoU: the union of skin and facial parts (labels 1..9, not hair) of each map;
- fasking (90 %, the recipe's 16-frame clips of 14 x 14 patches, the same keep queue and random
  draws for both): fraction of tokens with the same visible/masked state, and IoU of the visible
  sets. As a floor, the same figures for two draws (seeds) of the *same* parser: fasking is
  random within a region, so two parsers cannot agree more than that.

The mesh parser needs its optional models (``marlin_jax.face.MESH_INSTALL``); without them the
script says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

if __package__ in (None, ""):  # run as a file from a checkout: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from marlin_jax.face import MESH_INSTALL, MESH_METHOD, PARSER_METHOD, FaceCropper, FaceParser, mesh_available
from marlin_jax.face.detect import detect_faces, primary_faces
from marlin_jax.masking import LABEL_NAMES, NUM_LABELS, make_mask
from marlin_jax.video_io import read_frames

FACE_LABELS = tuple(range(1, 10))  # skin and the facial parts (not hair, not background)
CLIP_FRAMES, TUBELET, PATCH, MASK_RATIO = 16, 2, 16, 0.9


def label_counts(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """Pixel counts of two label maps ``(..., H, W)``: per-class intersection and union
    ``(NUM_LABELS,)``, pixels with the same label, all pixels, face intersection and union."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
    inter = np.array([np.sum((a == k) & (b == k)) for k in range(NUM_LABELS)], np.int64)
    union = np.array([np.sum((a == k) | (b == k)) for k in range(NUM_LABELS)], np.int64)
    fa, fb = np.isin(a, FACE_LABELS), np.isin(b, FACE_LABELS)
    return {"inter": inter, "union": union, "same": np.int64((a == b).sum()),
            "pixels": np.int64(a.size), "face_inter": np.int64((fa & fb).sum()),
            "face_union": np.int64((fa | fb).sum())}


def map_agreement(counts: dict[str, np.ndarray]) -> dict[str, float]:
    """:func:`label_counts` (summed over frames / videos) -> pixel agreement, face IoU, mean IoU
    over the classes present in either map and ``iou_<label>`` per class (NaN when absent)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = counts["inter"] / counts["union"]
    out = {"pixel_agreement": float(counts["same"] / counts["pixels"]),
           "face_iou": float(counts["face_inter"] / max(counts["face_union"], 1)),
           "mean_iou": float(np.nanmean(iou))}
    out.update({f"iou_{name}": float(v) for name, v in zip(LABEL_NAMES, iou, strict=True)})
    return out


def mask_agreement(maps_a: np.ndarray, maps_b: np.ndarray, seeds: int = 8,
                   mask_ratio: float = MASK_RATIO) -> dict[str, float]:
    """Fasking masks of 16-frame clips of two parsings ``(T, 224, 224)`` of the same crops, with
    the same random draws (seed) for both: mean token agreement and visible-set IoU, plus the
    same two figures between seeds ``s`` and ``s + 1`` of ``maps_a`` alone (the floor set by the
    masking's own randomness)."""
    t, h, w = maps_a.shape
    grid = (CLIP_FRAMES // TUBELET, h // PATCH, w // PATCH)
    starts = range(0, t - CLIP_FRAMES + 1, CLIP_FRAMES) if t >= CLIP_FRAMES else []
    if not starts:
        raise ValueError(f"need at least {CLIP_FRAMES} frames for a clip, got {t}")
    same, iou, same0, iou0 = [], [], [], []

    def mask(maps, seed):
        return make_mask("fasking", mask_ratio, np.random.default_rng(seed), maps, grid, PATCH,
                         TUBELET)

    for s in starts:
        a, b = maps_a[s:s + CLIP_FRAMES], maps_b[s:s + CLIP_FRAMES]
        for seed in range(seeds):
            ma, mb, ma2 = mask(a, seed), mask(b, seed), mask(a, seed + 1)
            same.append((ma == mb).mean())
            iou.append((ma & mb).sum() / (ma | mb).sum())
            same0.append((ma == ma2).mean())
            iou0.append((ma & ma2).sum() / (ma | ma2).sum())
    return {"token_agreement": float(np.mean(same)), "visible_iou": float(np.mean(iou)),
            "token_agreement_same_parser": float(np.mean(same0)),
            "visible_iou_same_parser": float(np.mean(iou0))}


def crops_and_landmarks(path: str, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Face crops uint8 ``(T, 224, 224, 3)`` and their 5 landmarks ``(T, 5, 2)`` of a video."""
    frames = read_frames(path, step=step)
    if os.path.basename(path).startswith("cropped"):
        _, landmarks, _ = primary_faces(detect_faces(frames))
        return frames, landmarks
    crops, landmarks, _ = FaceCropper().crop_video_with_landmarks(frames, path)
    return crops, landmarks


def main(argv: list[str] | None = None) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    samples = sorted(glob.glob(os.path.join(root, "..", "shared", "samples", "*.mp4")))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", nargs="+", default=samples)
    p.add_argument("--step", type=int, default=1, help="parse every step-th frame")
    p.add_argument("--seeds", type=int, default=8, help="fasking draws per clip")
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if not mesh_available():
        print(f"the mediapipe-mesh parser is not installed: {MESH_INSTALL}", file=sys.stderr)
        return 2
    if not args.videos:
        print("no videos given (and ../shared/samples has none)", file=sys.stderr)
        return 2
    mesh, template = FaceParser(MESH_METHOD), FaceParser(PARSER_METHOD)
    results, total = {}, None
    for path in args.videos:
        crops, landmarks = crops_and_landmarks(path, args.step)
        a = mesh.parse(crops, landmarks)
        b = template.parse(crops, landmarks)
        keep = a.found  # frames without a face are all background for both: not a comparison
        counts = label_counts(a.maps[keep], b.maps[keep])
        total = counts if total is None else {k: total[k] + v for k, v in counts.items()}
        row = {"frames": int(keep.sum()), "mesh_fallback_frames": a.fallback,
               **map_agreement(counts)}
        if len(crops) >= CLIP_FRAMES:
            row.update(mask_agreement(a.maps, b.maps, args.seeds))
        results[os.path.basename(path)] = row
    results["all"] = {"frames": sum(r["frames"] for r in results.values()), **map_agreement(total)}
    for key in ("token_agreement", "visible_iou", "token_agreement_same_parser",
                "visible_iou_same_parser"):
        values = [r[key] for r in results.values() if key in r]
        if values:  # mean over the videos long enough for a clip
            results["all"][key] = float(np.mean(values))

    print(f"mediapipe-mesh vs template-5pt, every {args.step} frame(s); fasking {MASK_RATIO:.0%} "
          f"on {CLIP_FRAMES}-frame clips, {args.seeds} draws each")
    cols = ["pixel_agreement", "face_iou", "mean_iou", "token_agreement", "visible_iou",
            "token_agreement_same_parser", "visible_iou_same_parser"]
    print(f"{'video':16s} {'frames':>6s} " + " ".join(f"{c[:22]:>22s}" for c in cols))
    for name, r in results.items():
        cells = " ".join(f"{r[c]:22.3f}" if c in r else f"{'-':>22s}" for c in cols)
        print(f"{name:16s} {r['frames']:6d} {cells}")
    print("per-class IoU (all videos): " + ", ".join(
        f"{n} {results['all'][f'iou_{n}']:.2f}" for n in LABEL_NAMES))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
