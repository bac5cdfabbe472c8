"""Dataset preprocessing jobs (YouTube Faces, CelebV-HQ): crop faces, parse them, write splits.

The CLIs in ``scripts/preprocess_*.py`` are thin wrappers over this module; the per-video job
functions live here so worker processes can import them. Every job is idempotent and atomic
(outputs are written to a temporary name and renamed), so an interrupted run resumes where it
stopped; a job never raises, it returns a :class:`JobResult` and failures are summarised.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import io
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context

import cv2
import numpy as np

from marlin_jax.face.crop import FaceCropper, NoFaceError, crop_square
from marlin_jax.face.parse import FaceParser
from marlin_jax.files import atomic_path
from marlin_jax.video_io import iter_frames, video_info, write_video

FRAME_DIR, CROP_DIR, PARSING_DIR = "frame_images_DB", "crop_images_DB", "face_parsing_images_DB"
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
STATE_DIR = ".marlin_face_preprocess"  # per-video completion markers, outside the dataset dirs


@dataclass(frozen=True)
class JobResult:
    """Outcome of one video: status ``done`` | ``skipped`` (already done) | ``failed``."""

    key: str
    status: str
    frames: int = 0
    faces: int = 0
    message: str = ""


def natural_key(name: str) -> list:
    """Sort key ordering embedded numbers numerically ("2.10.jpg" after "2.9.jpg")."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _atomic_write(path: str, data: bytes | str) -> None:
    """Writes ``data`` (str: UTF-8) to a temporary name then renames it to ``path``: readers never
    see a partial file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def _remove_stale_parts(directory: str) -> None:
    """Deletes temporary files a killed run left behind (they would be listed as frames)."""
    for part in glob.glob(os.path.join(glob.escape(directory), ".part-*")):
        os.remove(part)


def _safe(job: Callable[[str], JobResult], key: str) -> JobResult:
    try:
        return job(key)
    except NoFaceError as e:
        return JobResult(key, "failed", message=f"no face: {e}")
    except Exception as e:  # noqa: BLE001 - one bad video must never stop the batch
        return JobResult(key, "failed", message=f"{type(e).__name__}: {e}")


def run_jobs(job: Callable[[str], JobResult], keys: Sequence[str], workers: int, desc: str) -> list[JobResult]:
    """Runs picklable ``job`` on every key with a tqdm bar, in ``workers`` processes (1 =
    in-process). Never raises for a failing key: its result has status ``failed``."""
    from tqdm.auto import tqdm

    results: list[JobResult] = []
    with tqdm(total=len(keys), desc=desc, unit="video", dynamic_ncols=True) as bar:
        if workers <= 1:
            for key in keys:
                results.append(_safe(job, key))
                bar.update()
            return results
        ctx = get_context("spawn")  # no inherited onnxruntime / OpenCV thread pools
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=cv2.setNumThreads, initargs=(1,)) as pool:
            futures = {pool.submit(_safe, job, key): key for key in keys}
            for future in as_completed(futures):
                try:
                    results.append(future.result())
                except Exception as e:  # noqa: BLE001 - a worker died (e.g. out of memory)
                    results.append(JobResult(futures[future], "failed", message=f"worker: {e}"))
                bar.update()
    return results


def summarize(results: Iterable[JobResult], report_path: str | None = None) -> str:
    """A human summary (counts, then every failure); writes all results as JSON lines too."""
    results = sorted(results, key=lambda r: natural_key(r.key))
    done, skipped, failed = (sum(r.status == s for r in results) for s in ("done", "skipped", "failed"))
    lines = [f"{len(results)} videos: {done} processed, {skipped} already done, {failed} failed"]
    lines += [f"  FAILED {r.key}: {r.message}" for r in results if r.status == "failed"]
    if report_path:
        os.makedirs(os.path.dirname(os.path.abspath(report_path)), exist_ok=True)
        with open(report_path, "w", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps(asdict(r)) + "\n")
        lines.append(f"per-video report: {report_path}")
    return "\n".join(lines)


def list_ytf_videos(data_dir: str) -> list[str]:
    """``<person>/<video>`` folders under ``data_dir/frame_images_DB`` holding images."""
    root = os.path.join(data_dir, FRAME_DIR)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: not found (expected YouTube Faces' frame_images_DB)")
    videos = []
    for person in sorted(os.listdir(root), key=natural_key):
        pdir = os.path.join(root, person)
        if not os.path.isdir(pdir):
            continue
        for vid in sorted(os.listdir(pdir), key=natural_key):
            vdir = os.path.join(pdir, vid)
            if os.path.isdir(vdir) and any(n.lower().endswith(IMAGE_EXTS) for n in os.listdir(vdir)):
                videos.append(f"{person}/{vid}")
    return videos


def _ytf_outputs(data_dir: str, rel: str, name: str) -> tuple[str, str]:
    stem = os.path.splitext(name)[0]
    return os.path.join(data_dir, CROP_DIR, rel, stem + ".jpg"), os.path.join(data_dir, PARSING_DIR, rel, stem + ".npy")


def _ytf_state(data_dir: str, rel: str, names: list[str], marker: str) -> str | None:
    """What a previous run left for this video: ``"done"`` (its marker lists the same source
    frames and every output of the readable ones exists), ``"no_face"``, or None (redo it)."""
    try:
        with open(marker, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    if state.get("sources") != names:
        return None
    if state.get("no_face"):
        return "no_face"
    bad = set(state.get("unreadable", ()))
    outputs = (p for n in names if n not in bad for p in _ytf_outputs(data_dir, rel, n))
    return "done" if all(os.path.exists(p) for p in outputs) else None


def process_ytf_video(
    rel: str, data_dir: str, cropper: FaceCropper, parser: FaceParser, overwrite: bool = False
) -> JobResult:
    """Crops and parses one YouTube Faces video folder ``rel`` (``<person>/<video>``).

    Writes ``crop_images_DB/<rel>/<frame>.jpg`` (224 x 224 face crops, smoothed boxes) and
    ``face_parsing_images_DB/<rel>/<frame>.npy``: uint8 ``(n_faces, 224, 224)`` LaPa maps, as the
    original (n_faces 1, or 0 where the detector found no face in that frame). Unreadable frames
    are left out (and named in the message). Skips the folder when a marker in
    ``<data_dir>/.marlin_face_preprocess/`` says it was done (and every output exists) or had no
    face, for the same list of frames.
    """
    src = os.path.join(data_dir, FRAME_DIR, rel)
    for out in (CROP_DIR, PARSING_DIR):
        _remove_stale_parts(os.path.join(data_dir, out, rel))
    names = sorted((n for n in os.listdir(src) if n.lower().endswith(IMAGE_EXTS)), key=natural_key)
    marker = os.path.join(data_dir, STATE_DIR, rel + ".json")
    state = None if overwrite else _ytf_state(data_dir, rel, names, marker)
    if state == "done":
        return JobResult(rel, "skipped", frames=len(names))
    if state == "no_face":
        return JobResult(rel, "failed", message=f"no face: {src}: none in any frame (earlier run)")
    frames, kept, bad = [], [], []
    for n in names:
        img = cv2.imread(os.path.join(src, n), cv2.IMREAD_COLOR)
        if img is None or img.size == 0:
            bad.append(n)
            continue
        frames.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
        kept.append(n)
    if not frames:
        raise ValueError(f"{src}: none of its {len(names)} images could be read")
    shape = Counter(f.shape for f in frames).most_common(1)[0][0]  # other sizes: never seen in YTF
    frames = [f if f.shape == shape else cv2.resize(f, shape[1::-1]) for f in frames]
    try:
        crops, landmarks, found = cropper.crop_video_with_landmarks(np.stack(frames), name=src)
    except NoFaceError:  # remembered, so a resumed run does not search this video again
        _atomic_write(marker, json.dumps({"sources": names, "no_face": True}) + "\n")
        raise
    maps = parser.parse(crops, landmarks).maps
    empty = np.zeros((0, *maps.shape[1:]), np.uint8)
    for n, crop, m, f in zip(kept, crops, maps, found, strict=True):
        crop_path, npy_path = _ytf_outputs(data_dir, rel, n)
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
        if not ok:
            raise OSError(f"{crop_path}: JPEG encoding failed")
        _atomic_write(crop_path, jpeg.tobytes())
        npy = io.BytesIO()
        np.save(npy, m[None] if f else empty)
        _atomic_write(npy_path, npy.getvalue())
    _atomic_write(marker, json.dumps({"sources": names, "unreadable": bad}) + "\n")
    msg = f"unreadable frames left out: {', '.join(bad)}" if bad else ""
    return JobResult(rel, "done", frames=len(kept), faces=int(found.sum()), message=msg)


def ytf_split_rows(data_dir: str, videos: Iterable[str]) -> list[tuple[str, int]]:
    """``(path, len)`` rows for the videos whose crops exist (len = number of crop images)."""
    rows = []
    for rel in videos:  # glob's "*" leaves out hidden (.part-) files
        n = len(glob.glob(os.path.join(glob.escape(os.path.join(data_dir, CROP_DIR, rel)), "*.jpg")))
        if n:
            rows.append((rel, n))
    return rows


def write_ytf_splits(
    data_dir: str, rows: Sequence[tuple[str, int]], val_fraction: float = 0.2, split_dir: str | None = None
) -> dict[str, int]:
    """Writes ``train_set.csv`` / ``val_set.csv`` (``path,len``) into ``data_dir``.

    With ``split_dir`` holding the original MARLIN ``train_set.csv`` / ``val_set.csv``, their
    assignment is kept (rows of videos not processed here are dropped, lengths are recounted).
    Otherwise the split is by identity (no person in both), deterministic: a person is in val when
    a hash of its name falls below ``val_fraction`` (the original holds out about a fifth).
    Returns the row count per split.
    """
    from marlin_jax.data.ytf import read_split_csv  # lazily: the data package imports grain

    by_path = dict(rows)
    if split_dir:
        splits = {split: [(p, by_path[p]) for p, _ in read_split_csv(split_dir, split) if p in by_path]
                  for split in ("train", "val")}
    else:
        splits = {"train": [], "val": []}
        for rel, n in rows:
            person = rel.split("/", 1)[0].encode("utf-8")  # hashed stably (Python's hash() is seeded)
            unit = int(hashlib.sha1(person).hexdigest()[:12], 16) / float(1 << 48)  # in [0, 1)
            splits["val" if unit < val_fraction else "train"].append((rel, n))
    for split, split_rows in splits.items():
        text = "path,len\n" + "".join(f"{rel},{n}\n" for rel, n in split_rows)
        _atomic_write(os.path.join(data_dir, f"{split}_set.csv"), text)
    return {k: len(v) for k, v in splits.items()}


def preprocess_ytf(
    data_dir: str,
    workers: int = 1,
    cropper: FaceCropper | None = None,
    parser: FaceParser | None = None,
    val_fraction: float = 0.2,
    split_dir: str | None = None,
    overwrite: bool = False,
    limit: int | None = None,
) -> tuple[list[JobResult], dict[str, int]]:
    """YouTube Faces ``frame_images_DB`` -> crops + parsing maps + split CSVs (see the CLI)."""
    cropper = cropper or FaceCropper(num_threads=1 if workers > 1 else 0)
    parser = parser or FaceParser(num_threads=cropper.num_threads)
    videos = list_ytf_videos(data_dir)[:limit]
    job = functools.partial(process_ytf_video, data_dir=data_dir, cropper=cropper, parser=parser, overwrite=overwrite)
    results = run_jobs(job, videos, workers, desc="YouTube Faces")
    ok = [r.key for r in results if r.status != "failed"]
    counts = write_ytf_splits(data_dir, ytf_split_rows(data_dir, ok), val_fraction, split_dir)
    _write_info(data_dir, cropper, parser)
    return results, counts


INFO_FILE = ".marlin_face_preprocess.json"


def _write_info(data_dir: str, cropper: FaceCropper, parser: FaceParser | None) -> None:
    """Records how the outputs were made (crop settings, which parser ran) in ``data_dir``."""
    info = {"cropper": asdict(cropper), "parser": parser.method if parser else None}
    info["cropper"].pop("num_threads")
    _atomic_write(os.path.join(data_dir, INFO_FILE), json.dumps(info, indent=1) + "\n")


def process_celebvhq_video(
    name: str, data_dir: str, cropper: FaceCropper, overwrite: bool = False, chunk: int = 32
) -> JobResult:
    """``downloaded/<name>`` -> ``cropped/<name>``: 224 x 224 face crops, same fps (mp4v).

    Two passes over the file (detect on every frame in chunks, smooth the track, then crop), so
    memory holds the crops but never the full-size video.
    """
    src = os.path.join(data_dir, "downloaded", name)
    dst = os.path.join(data_dir, "cropped", name)
    if not overwrite and os.path.exists(dst):
        return JobResult(name, "skipped")
    track = cropper.track_stream(iter_frames(src), name=src, batch_size=chunk)
    crops = [crop_square(f, s, cropper.size)
             for f, s in zip(iter_frames(src, expect=track.num_frames), track.squares, strict=True)]
    tmp = os.path.join(data_dir, ".cropped.part", name)
    write_video(tmp, np.stack(crops), fps=video_info(src)["fps"] or 25.0)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.replace(tmp, dst)
    return JobResult(name, "done", frames=len(crops), faces=int(track.found.sum()))


def write_celebvhq_splits(data_dir: str, overwrite: bool = False) -> dict[str, int] | None:
    """``train.txt`` / ``val.txt`` / ``test.txt``: 80/10/10 of ``cropped/*.mp4`` (names without
    extension), as the original, but over the sorted names so the split is reproducible.
    Existing split files are kept (as the original) unless ``overwrite``; returns None then."""
    files = [os.path.join(data_dir, f"{s}.txt") for s in ("train", "val", "test")]
    if not overwrite and all(os.path.exists(f) for f in files):
        return None
    cropped = os.path.join(data_dir, "cropped")
    names = sorted(n[:-4] for n in os.listdir(cropped) if n.endswith(".mp4"))
    n = len(names)
    bounds = [0, int(n * 0.8), int(n * 0.9), n]
    counts = {}
    for split, path, lo, hi in zip(("train", "val", "test"), files, bounds[:-1], bounds[1:], strict=True):
        _atomic_write(path, "".join(f"{x}\n" for x in names[lo:hi]))
        counts[split] = hi - lo
    return counts


def preprocess_celebvhq(
    data_dir: str,
    workers: int = 1,
    cropper: FaceCropper | None = None,
    overwrite: bool = False,
    limit: int | None = None,
) -> tuple[list[JobResult], dict[str, int] | None]:
    """CelebV-HQ ``downloaded/*.mp4`` -> ``cropped/*.mp4`` + split files (see the CLI)."""
    src = os.path.join(data_dir, "downloaded")
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: not found (expected CelebV-HQ's downloaded/*.mp4)")
    cropper = cropper or FaceCropper(num_threads=1 if workers > 1 else 0)
    names = sorted((n for n in os.listdir(src) if n.endswith(".mp4")), key=natural_key)[:limit]
    job = functools.partial(process_celebvhq_video, data_dir=data_dir, cropper=cropper, overwrite=overwrite)
    results = run_jobs(job, names, workers, desc="CelebV-HQ")
    shutil.rmtree(os.path.join(data_dir, ".cropped.part"), ignore_errors=True)
    os.makedirs(os.path.join(data_dir, "cropped"), exist_ok=True)
    _write_info(data_dir, cropper, None)
    return results, write_celebvhq_splits(data_dir, overwrite)
