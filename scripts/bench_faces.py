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

from marlin_jax.face import FaceCropper, FaceParser, detect_faces
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
    parser = FaceParser(num_threads=1)
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
    stage("parse (template-5pt)", lambda: parser.parse(crops, lms))
    stage("parse + detect on crop", lambda: parser.parse(crops))

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
        print(f"  {name:28s} {sec * 1e3:8.2f} ms   {1 / sec:8.1f} frames/s")
    ytf_cost = sum(
        per_frame[k]
        for k in ("detect 320x240", "crop 224", "parse (template-5pt)", "jpeg read + jpeg/npy write")
    ) + per_frame["smooth track"]
    hours = YTF_FRAMES * ytf_cost / args.cores / 3600
    print(
        f"YouTube Faces ({YTF_VIDEOS} videos, ~{YTF_FRAMES // 1000}k frames at ~320x240): "
        f"{ytf_cost * 1e3:.1f} ms per frame per core -> {hours:.2f} h on {args.cores} cores "
        f"({hours * args.cores:.1f} core-hours)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
