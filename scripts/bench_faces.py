"""Benchmark face detection, cropping and parsing on CPU; estimate YouTube Faces preprocessing time.

    python scripts/bench_faces.py [--video ../shared/samples/video01.mp4] [--frames 64]

Each stage is timed the way a preprocessing worker runs it (one process, one onnxruntime / OpenCV
thread), so the per-frame cost divides by the number of cores of a host running one worker per
core. Prints frames/s per stage and the estimated hours to preprocess YouTube Faces
(3,425 videos, ~620k frames) on ``--cores`` cores (16 by default).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a file from a checkout: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2
import numpy as np

from marlin_jax.face import MESH_INSTALL, FaceCropper, FaceParser, available_methods, detect_faces, mesh_available
from marlin_jax.face.crop import landmarks_to_crop
from marlin_jax.video_io import read_frames

YTF_FRAMES = 620_000
YTF_VIDEOS = 3_425


def _best_of(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls (the least disturbed by other load), in seconds."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--video", default=os.path.join(root, "..", "shared", "samples", "video01.mp4"))
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cores", type=int, default=16)
    args = p.parse_args(argv)

    cv2.setNumThreads(1)
    frames = read_frames(args.video, max_frames=args.frames)
    n, h, w, _ = frames.shape
    ytf_size = (320, 240)  # YouTube Faces frames are about this size
    ytf = np.stack([cv2.resize(f, ytf_size, interpolation=cv2.INTER_AREA) for f in frames])
    hd = np.stack([cv2.resize(f, (1280, 720)) for f in frames])
    cropper = FaceCropper(num_threads=1)
    parser = FaceParser(num_threads=1)  # the best installed parser
    detect_faces(ytf[:2], num_threads=1)  # build the session outside the timings

    per_frame: dict[str, float] = {}

    def stage(name: str, fn, count: int = n) -> None:
        per_frame[name] = _best_of(fn, args.repeats) / count

    stage("detect 320x240", lambda: detect_faces(ytf, num_threads=1))
    stage(f"detect {w}x{h}", lambda: detect_faces(frames, num_threads=1))
    stage("detect 1280x720 (to 640)", lambda: detect_faces(hd, num_threads=1))
    detect_cache = detect_faces(ytf, num_threads=1)
    track = cropper.track_detections(detect_cache)
    stage("smooth track", lambda: cropper.track_detections(detect_cache))
    stage("crop 224", lambda: cropper.crop_frames(ytf, track.squares))
    crops = cropper.crop_frames(ytf, track.squares)
    lms = landmarks_to_crop(track.landmarks, track.squares, 224)
    for method in reversed(available_methods()):
        mparser = FaceParser(method, num_threads=1)
        stage(f"parse ({method})", lambda p=mparser: p.parse(crops, lms))
    stage(f"parse ({parser.method}) + detect", lambda: parser.parse(crops))

    with tempfile.TemporaryDirectory() as tmp:
        src = [cv2.imencode(".jpg", f[..., ::-1])[1].tobytes() for f in ytf]
        maps = parser.parse(crops, lms).maps

        def io() -> None:
            for i, (b, c, m) in enumerate(zip(src, crops, maps, strict=True)):
                cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
                with open(os.path.join(tmp, f"{i}.jpg"), "wb") as f:
                    f.write(cv2.imencode(".jpg", c[..., ::-1])[1].tobytes())
                np.save(os.path.join(tmp, f"{i}.npy"), m[None])

        stage("jpeg read + jpeg/npy write", io)

    print(f"per-frame cost, one worker (1 thread), best of {args.repeats}, {n} frames:")
    for name, sec in per_frame.items():
        print(f"  {name:34s} {sec * 1e3:8.2f} ms   {1 / sec:8.1f} frames/s")
    if not mesh_available():
        print(f"  (optional mediapipe-mesh parser not installed: {MESH_INSTALL})")
    for method in available_methods():
        ytf_cost = sum(
            per_frame[k]
            for k in ("detect 320x240", "smooth track", "crop 224", f"parse ({method})",
                      "jpeg read + jpeg/npy write")
        )  # fmt: skip
        hours = YTF_FRAMES * ytf_cost / args.cores / 3600
        print(
            f"YouTube Faces ({YTF_VIDEOS} videos, ~{YTF_FRAMES // 1000}k frames at ~320x240) with "
            f"{method}: {ytf_cost * 1e3:.1f} ms per frame per core -> {hours:.2f} h on "
            f"{args.cores} cores ({hours * args.cores:.1f} core-hours)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
