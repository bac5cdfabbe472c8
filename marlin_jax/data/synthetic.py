"""The built-in synthetic face-video dataset: moving cartoon faces with exact LaPa parsing maps.

Every video is a pure function of ``(seed, index)``: a face (skin, ears, hair with a fringe, brows,
eyes that blink or stay closed, nose, lips around a mouth that opens) moving over a textured
background. Shapes are drawn with OpenCV onto a *class map* (LaPa labels plus sub-parts such as
iris or teeth); the parsing map is a lookup of it and the RGB frame a per-video palette of it, so
every pixel's colour agrees with its label exactly. No download, ever.

LaPa labels: 0 background, 1 skin, 2/3 left/right brow, 4/5 left/right eye, 6 nose, 7 upper lip,
8 inner mouth, 9 lower lip, 10 hair; "left" is the *image's* left (LaPa's and MARLIN's convention).
Per-video binary labels (:data:`LABEL_NAMES`), fair coins: ``mouth_open`` (open in ~75-90% of
frames vs ~10-25%), ``eyes_closed`` (throughout vs occasional blinks), ``smiling`` (corners up).
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np

from marlin_jax.video_io import write_video

LABEL_NAMES = ("mouth_open", "eyes_closed", "smiling")
FPS = 25.0

# Class map values: the 11 LaPa labels, then sub-parts that carry their own colour.
_BG, _SKIN, _LBROW, _RBROW, _LEYE, _REYE, _NOSE, _ULIP, _MOUTH, _LLIP, _HAIR = range(11)
_LIRIS, _RIRIS, _LPUPIL, _RPUPIL, _TEETH, _LLID, _RLID = range(11, 18)
_NUM_CLASSES = 18
CLASS_TO_LABEL = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 4, 5, 4, 5, 8, 4, 5], np.uint8)
"""Class map value -> LaPa label (iris / pupil / closed lid are eye, teeth are inner mouth)."""

_SHIFT = 4  # OpenCV fixed-point bits: sub-pixel positions for smooth motion
_ONE = 1 << _SHIFT
_CURVE_POINTS = 17

_SKIN_TONES = np.array(
    [[241, 194, 167], [224, 172, 105], [198, 134, 66], [141, 85, 36], [255, 219, 172],
     [234, 192, 134], [170, 120, 90], [92, 60, 40]], np.float64)  # fmt: skip
_HAIR_TONES = np.array(
    [[20, 15, 10], [60, 40, 25], [110, 70, 35], [185, 145, 85], [225, 205, 150], [140, 45, 20],
     [95, 95, 95], [35, 30, 45]], np.float64)  # fmt: skip
_IRIS_TONES = np.array([[70, 45, 20], [45, 95, 150], [75, 115, 60], [110, 80, 45]], np.float64)


def _fringe(aspect: float, top: float, bottom: float) -> tuple[float, float]:
    """Fringe ellipse (centre v, half-height) spanning v = top .. bottom (units of half-height)."""
    return aspect * (top + bottom) / 2, aspect * (bottom - top) / 2


def _sample_face(rng: np.random.Generator, labels: np.ndarray, size: int,
                 face_scale: float = 1.0, strong_cues: bool = False) -> SimpleNamespace:
    """Per-video constants; lengths in units of the face half-width ``a`` (pixels = a * scale).
    Draw order matters: every video is a pure function of the RNG stream."""
    mouth_open, _, smiling = (bool(v) for v in labels)
    u = rng.uniform
    aspect = u(1.2, 1.4)  # face half-height / half-width
    mouth_w = u(0.28, 0.34) + (0.05 if smiling else 0.0)
    face = SimpleNamespace(
        a=size * u(0.26, 0.32) * face_scale,
        aspect=aspect,
        center=(size * (0.5 + u(-0.05, 0.05)), size * (0.53 + u(-0.04, 0.04))),
        eye_sep=u(0.34, 0.42),
        eye_v=-aspect * u(0.12, 0.2),
        eye_w=u(0.15, 0.19),
        eye_h=u(0.07, 0.1),
        iris_r=u(0.06, 0.08),
        brow_sep=u(0.36, 0.44),
        brow_v=-aspect * u(0.34, 0.4),
        brow_w=u(0.17, 0.23),
        brow_h=u(0.035, 0.06),
        brow_tilt=u(-8.0, 12.0),
        nose_w=u(0.13, 0.18),
        nose_len=aspect * u(0.3, 0.38),
        mouth_v=aspect * u(0.5, 0.58),
        mouth_w=mouth_w,
        mouth_curve=u(0.1, 0.15) if smiling else u(-0.05, 0.015),  # > 0: corners up
        lip_upper=u(0.05, 0.08),
        lip_lower=u(0.07, 0.1),
        mouth_open_max=u(0.18, 0.26),
        hair_back=(-aspect * u(0.05, 0.3), u(1.1, 1.3), aspect * u(0.95, 1.2)),
        fringe=_fringe(aspect, u(-1.12, -1.02), u(-0.58, -0.48)),
        move_amp=(size * u(0.01, 0.06), size * u(0.01, 0.04)),
        move_freq=(u(0.2, 0.8), u(0.2, 0.8)),
        move_phase=(u(0, 2 * math.pi), u(0, 2 * math.pi)),
        scale_amp=u(0.0, 0.06),
        roll_amp=u(0.0, 8.0),
        yaw_amp=u(0.0, 1.0),
        motion_freq=(u(0.2, 0.7), u(0.2, 0.7), u(0.2, 0.7)),
        motion_phase=(u(0, 2 * math.pi), u(0, 2 * math.pi), u(0, 2 * math.pi)),
        mouth_period=u(0.6, 1.2),
        mouth_duty=u(0.75, 0.9) if mouth_open else u(0.1, 0.25),
        mouth_phase=u(0, 1),
        blink_period=u(2.0, 4.0),
        blink_phase=u(0, 1),
        gaze=u(-0.5, 0.5),
    )
    if strong_cues:  # same draws, so the rest of the video is unchanged
        face.mouth_duty = 1.0 if mouth_open else 0.0
        face.mouth_open_max *= 1.6
        face.eye_h *= 1.6
        face.eye_w *= 1.2
        if smiling:  # a broad smile: corners 2.2x higher, mouth wider
            face.mouth_curve *= 2.2
            face.mouth_w += 0.05
    return face


def _sample_palette(rng: np.random.Generator) -> np.ndarray:
    """uint8 ``(18, 3)`` RGB per class; all non-background colours distinct."""
    u = rng.uniform
    skin = _SKIN_TONES[rng.integers(len(_SKIN_TONES))] + u(-12, 12, 3)
    hair = _HAIR_TONES[rng.integers(len(_HAIR_TONES))] + u(-10, 10, 3)
    lips = np.array([185.0, 85, 90]) * u(0.75, 1.05) + u(-10, 10, 3)
    pal = np.zeros((_NUM_CLASSES, 3))
    pal[_SKIN] = skin
    pal[_LBROW] = pal[_RBROW] = hair * 0.7
    pal[_LEYE] = pal[_REYE] = [245, 243, 238]  # sclera
    pal[_NOSE] = skin * 0.9 + [6, -4, -6]
    pal[_ULIP] = lips
    pal[_LLIP] = lips * 1.08 + 8
    pal[_MOUTH] = [75, 22, 30] + u(-10, 10, 3)
    pal[_TEETH] = [236, 230, 218]
    pal[_HAIR] = hair
    pal[_LIRIS] = pal[_RIRIS] = _IRIS_TONES[rng.integers(len(_IRIS_TONES))] + u(-8, 8, 3)
    pal[_LPUPIL] = pal[_RPUPIL] = [12, 10, 10]
    pal[_LLID] = pal[_RLID] = skin * 0.55
    pal = np.clip(np.round(pal), 0, 255).astype(np.uint8)
    # left/right parts share a colour; make every other pair of classes differ
    groups = [(_SKIN,), (_LBROW, _RBROW), (_LEYE, _REYE), (_NOSE,), (_ULIP,), (_MOUTH,), (_LLIP,),
              (_HAIR,), (_LIRIS, _RIRIS), (_LPUPIL, _RPUPIL), (_TEETH,), (_LLID, _RLID)]  # fmt: skip
    seen: set[tuple[int, ...]] = set()
    for group in groups:
        colour = pal[group[0]].astype(int)
        while tuple(colour) in seen:
            colour = np.where(colour < 128, colour + 3, colour - 3)
        seen.add(tuple(colour))
        pal[list(group)] = colour
    return pal


def _background(rng: np.random.Generator, size: int, margin: int) -> np.ndarray:
    """A static textured scene, uint8 ``(size + 2m, size + 2m, 3)``: gradient, blotches, shapes,
    grain."""
    n = size + 2 * margin
    c0, c1 = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    ramp = np.linspace(0.0, 1.0, n)
    ramp = ramp[:, None] if rng.random() < 0.5 else ramp[None, :]
    img = c0 + (c1 - c0) * ramp[..., None]
    blotches = cv2.resize(rng.uniform(-35, 35, (5, 5, 3)), (n, n), interpolation=cv2.INTER_CUBIC)
    img = img + blotches
    for _ in range(rng.integers(2, 6)):
        colour = tuple(float(v) for v in rng.uniform(20, 235, 3))
        x0, y0 = (int(v) for v in rng.integers(0, n, 2))
        w, h = (int(v) for v in rng.integers(n // 10, n // 2, 2))
        if rng.random() < 0.5:
            cv2.rectangle(img, (x0, y0), (x0 + w, y0 + h), colour, -1)
        else:
            cv2.circle(img, (x0, y0), w // 2, colour, -1)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


class _Pose:
    """Canonical face coordinates (u, v in units of a) -> fixed-point image coordinates."""

    def __init__(self, f: SimpleNamespace, frame: int):
        t = frame / FPS
        self.dx = f.move_amp[0] * math.sin(2 * math.pi * f.move_freq[0] * t + f.move_phase[0])
        self.dy = f.move_amp[1] * math.sin(2 * math.pi * f.move_freq[1] * t + f.move_phase[1])
        wave = [math.sin(2 * math.pi * fr * t + ph) for fr, ph in zip(f.motion_freq, f.motion_phase, strict=True)]
        self.scale = f.a * (1 + f.scale_amp * wave[0])
        self.roll = f.roll_amp * wave[1]  # degrees
        self.yaw = f.yaw_amp * wave[2]  # shifts inner features sideways
        rad = math.radians(self.roll)
        self.cos, self.sin = math.cos(rad), math.sin(rad)
        self.cx, self.cy = f.center[0] + self.dx, f.center[1] + self.dy

    def points(self, u: np.ndarray, v: np.ndarray, feature: bool = True) -> np.ndarray:
        """int32 ``(K, 2)`` fixed-point image points; ``feature`` points (the inner features) follow
        the yaw shift."""
        u = np.asarray(u, np.float64) + (0.1 * self.yaw if feature else 0.0)
        v = np.asarray(v, np.float64)
        out = np.empty((u.size, 2), np.float64)
        out[:, 0] = self.cx + self.scale * (u * self.cos - v * self.sin)
        out[:, 1] = self.cy + self.scale * (u * self.sin + v * self.cos)
        return np.round(out * _ONE).astype(np.int32)

    def ellipse(self, img: np.ndarray, u: float, v: float, au: float, av: float, cls: int,
                tilt: float = 0.0, feature: bool = True) -> None:
        """A filled ellipse centred at (u, v) with half-axes (au, av), tilted by ``tilt`` degrees;
        ``feature`` as in :meth:`points`."""
        ((x, y),) = self.points([u], [v], feature)
        axes = (max(round(au * self.scale * _ONE), _ONE // 2),
                max(round(av * self.scale * _ONE), _ONE // 2))  # fmt: skip
        cv2.ellipse(img, (int(x), int(y)), axes, self.roll + tilt, 0, 360, cls, -1, cv2.LINE_8, _SHIFT)

    def polygon(self, img: np.ndarray, u: np.ndarray, v: np.ndarray, cls: int) -> None:
        cv2.fillPoly(img, [self.points(u, v)], cls, cv2.LINE_8, _SHIFT)


def _mouth_opening(face: SimpleNamespace, frame: int) -> float:
    """Inner-mouth height (units of a): open for a ``mouth_duty`` fraction of each period,
    opening and closing quickly."""
    if face.mouth_duty >= 1.0:  # always open (``strong_cues``)
        return face.mouth_open_max
    phase = (frame / FPS / face.mouth_period + face.mouth_phase) % 1.0
    if phase >= face.mouth_duty:
        return 0.0
    return face.mouth_open_max * min(1.0, 3.0 * math.sin(math.pi * phase / face.mouth_duty))


def _eyes_open(face: SimpleNamespace, frame: int) -> bool:
    """Open but for a blink of ~3 frames (0.12 s) each ``blink_period``."""
    return (frame / FPS / face.blink_period + face.blink_phase) % 1.0 >= 0.12 / face.blink_period


def _draw_face(cls_map: np.ndarray, pose: _Pose, f: SimpleNamespace, frame: int, eyes_closed: bool) -> None:
    hb_v, hb_w, hb_h = f.hair_back
    pose.ellipse(cls_map, 0, hb_v, hb_w, hb_h, _HAIR, feature=False)
    for side in (-1, 1):
        pose.ellipse(cls_map, side * 0.98, f.eye_v + 0.1 * f.aspect, 0.13, 0.24, _SKIN, feature=False)
    pose.ellipse(cls_map, 0, 0, 1.0, f.aspect, _SKIN, feature=False)
    pose.ellipse(cls_map, 0, f.fringe[0], 1.04, f.fringe[1], _HAIR, feature=False)

    # brows (label 2 on the image's left) and eyes (label 4 on the image's left)
    for side, brow, eye, iris, pupil, lid in (
        (-1, _LBROW, _LEYE, _LIRIS, _LPUPIL, _LLID),
        (1, _RBROW, _REYE, _RIRIS, _RPUPIL, _RLID),
    ):
        pose.ellipse(cls_map, side * f.brow_sep, f.brow_v, f.brow_w, f.brow_h, brow,
                     tilt=side * f.brow_tilt)  # fmt: skip
        ex = side * f.eye_sep
        if not eyes_closed and _eyes_open(f, frame):
            pose.ellipse(cls_map, ex, f.eye_v, f.eye_w, f.eye_h, eye)
            ih = min(f.iris_r, f.eye_h * 0.95)
            gx = ex + f.gaze * (f.eye_w - f.iris_r) * 0.8
            pose.ellipse(cls_map, gx, f.eye_v, f.iris_r, ih, iris)
            pose.ellipse(cls_map, gx, f.eye_v, f.iris_r * 0.45, ih * 0.45, pupil)
        else:
            pose.ellipse(cls_map, ex, f.eye_v + f.eye_h * 0.4, f.eye_w, 0.012, lid)

    # nose: bridge and base
    pose.ellipse(cls_map, 0, f.nose_len * 0.45, f.nose_w * 0.45, f.nose_len * 0.5, _NOSE)
    pose.ellipse(cls_map, 0, f.nose_len * 0.9, f.nose_w, f.nose_len * 0.2, _NOSE)

    # mouth: centre line curving up at the corners when smiling, lips around an opening
    s = np.linspace(-1.0, 1.0, _CURVE_POINTS)
    u = s * f.mouth_w
    env = 1.0 - s**2
    centre = f.mouth_v - f.mouth_curve * (s**2 - 0.5)
    half_open = 0.5 * _mouth_opening(f, frame) * env
    inner_up, inner_low = centre - half_open, centre + half_open
    bow = 1.0 - 0.3 * np.exp(-((s / 0.25) ** 2))  # cupid's bow
    outer_up = inner_up - f.lip_upper * np.sqrt(env) * bow - 0.004
    outer_low = inner_low + f.lip_lower * np.sqrt(env) + 0.004
    if half_open.max() * pose.scale >= 0.5:  # at least a pixel open
        pose.polygon(cls_map, np.r_[u, u[::-1]], np.r_[inner_up, inner_low[::-1]], _MOUTH)
        teeth = inner_up + 0.3 * (inner_low - inner_up)
        mid = np.abs(s) < 0.8
        pose.polygon(cls_map, np.r_[u[mid], u[mid][::-1]], np.r_[inner_up[mid], teeth[mid][::-1]],
                     _TEETH)  # fmt: skip
    pose.polygon(cls_map, np.r_[u, u[::-1]], np.r_[outer_up, inner_up[::-1]], _ULIP)
    pose.polygon(cls_map, np.r_[u, u[::-1]], np.r_[inner_low, outer_low[::-1]], _LLIP)


def render_video(index: int, num_frames: int = 32, size: int = 224, seed: int = 0, *,
                 face_scale: float = 1.0, strong_cues: bool = False) -> dict:
    """Renders synthetic video ``index`` of dataset ``seed``.

    Returns ``{"frames": uint8 (T, size, size, 3) RGB, "parsing": uint8 (T, size, size) LaPa
    labels, "labels": int32 (3,) in LABEL_NAMES order, "name": str}``. Deterministic in
    ``(seed, index)``; frame t does not depend on ``num_frames``.

    ``face_scale`` multiplies the face size (1.0: ~55-65 % of the frame width; 1.5: a tight crop).
    ``strong_cues`` makes the labels visible at low resolution: an open mouth is open (1.6x
    wider) in every frame and a closed one never opens; eyes 1.6x taller, 1.2x wider; a broad
    smile. Both keep the labels, palette, background and motion.
    """
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    if not 0.25 <= face_scale <= 4.0:
        raise ValueError(f"face_scale must be in [0.25, 4], got {face_scale}")
    rng = np.random.default_rng([seed, index])
    labels = rng.integers(0, 2, size=len(LABEL_NAMES)).astype(np.int32)
    face = _sample_face(rng, labels, size, face_scale, strong_cues)
    palette = _sample_palette(rng)
    margin = max(2, size // 16)
    scene = _background(rng, size, margin)
    pan = rng.uniform(0.2, 0.5)  # background parallax relative to the head motion
    eyes_closed = bool(labels[1])

    colour_lut = np.pad(palette, ((0, 256 - _NUM_CLASSES), (0, 0)))[None]
    label_lut = np.pad(CLASS_TO_LABEL, (0, 256 - _NUM_CLASSES))
    parsing = np.empty((num_frames, size, size), np.uint8)
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    cls_map = np.empty((size, size), np.uint8)
    for t in range(num_frames):
        cls_map.fill(_BG)
        pose = _Pose(face, t)
        _draw_face(cls_map, pose, face, t, eyes_closed)
        ox = int(round(margin - np.clip(pose.dx * pan, -margin, margin)))
        oy = int(round(margin - np.clip(pose.dy * pan, -margin, margin)))
        frame = cv2.LUT(cv2.cvtColor(cls_map, cv2.COLOR_GRAY2RGB), colour_lut)
        cv2.copyTo(scene[oy : oy + size, ox : ox + size], (cls_map == _BG).view(np.uint8), frame)
        frames[t] = frame
        parsing[t] = cv2.LUT(cls_map, label_lut)
    return {"frames": frames, "parsing": parsing, "labels": labels, "name": f"synth_{index:06d}"}


def write_video_dataset(out_dir: str | os.PathLike, num_videos: int, num_frames: int = 48,
                        size: int = 224, seed: int = 0, with_parsing: bool = True, *,
                        face_scale: float = 1.0, strong_cues: bool = False) -> Path:
    """Writes videos ``0 .. num_videos - 1`` (:func:`render_video` with ``face_scale`` and
    ``strong_cues``) as files; returns ``Path(out_dir)``.

    Layout: ``videos/<name>.mp4`` (mp4v, 25 fps), ``parsing/<name>.npy`` (uint8 (T, H, W), when
    ``with_parsing``) and ``labels.csv`` with columns ``path,mouth_open,eyes_closed,smiling``
    where ``path`` is the video file relative to ``videos/`` (``<name>.mp4``).
    """
    if num_videos < 1:
        raise ValueError(f"num_videos must be >= 1, got {num_videos}")
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    if with_parsing:
        (out / "parsing").mkdir(exist_ok=True)
    rows = []
    for index in range(num_videos):
        video = render_video(index, num_frames, size, seed, face_scale=face_scale,
                             strong_cues=strong_cues)
        name = video["name"]
        write_video(out / "videos" / f"{name}.mp4", video["frames"], fps=FPS)
        if with_parsing:
            np.save(out / "parsing" / f"{name}.npy", video["parsing"])
        rows.append([f"{name}.mp4", *(int(v) for v in video["labels"])])
    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["path", *LABEL_NAMES], *rows])
    return out


def ytf_frame_names(clip: int, num_frames: int) -> list[str]:
    """YouTube-Faces style frame file stems ``<clip>.<frame number>``, numbered so that the
    original's ``sorted(os.listdir(...))`` (lexicographic) is the temporal order."""
    first = 10 ** max(3, len(str(num_frames)))
    return [f"{clip}.{first + k}" for k in range(num_frames)]


def write_ytf_layout(out_dir: str | os.PathLike, num_videos: int, num_frames: int = 40,
                     size: int = 224, seed: int = 0, val_fraction: float = 0.25) -> Path:
    """Writes the original MARLIN YouTube-Faces layout; returns ``Path(out_dir)``.

    ``crop_images_DB/<person>/<clip>/<clip>.<frame>.jpg`` (RGB saved by cv2 as JPEG),
    ``face_parsing_images_DB/<person>/<clip>/<clip>.<frame>.npy`` (int64 ``(1, H, W)``: what the
    original ``face_parse.py`` saves, one face), and ``train_set.csv`` / ``val_set.csv`` with
    columns ``path,len``. Video ``i`` is person ``Synth_{i // 2:06d}``, clip ``i % 2``; the last
    ``round(num_videos * val_fraction)`` videos form the val split (at least one of each split when
    ``num_videos >= 2`` and ``0 < val_fraction < 1``).
    """
    if num_videos < 1:
        raise ValueError(f"num_videos must be >= 1, got {num_videos}")
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    out = Path(out_dir)
    num_val = int(round(num_videos * val_fraction))
    if num_videos >= 2 and 0.0 < val_fraction < 1.0:
        num_val = min(max(num_val, 1), num_videos - 1)
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "val": []}
    for index in range(num_videos):
        video = render_video(index, num_frames, size, seed)
        clip = index % 2
        rel = f"Synth_{index // 2:06d}/{clip}"
        crop_dir = out / "crop_images_DB" / rel
        parse_dir = out / "face_parsing_images_DB" / rel
        crop_dir.mkdir(parents=True, exist_ok=True)
        parse_dir.mkdir(parents=True, exist_ok=True)
        for stem, frame, parsing in zip(
            ytf_frame_names(clip, num_frames), video["frames"], video["parsing"], strict=True
        ):
            path = crop_dir / f"{stem}.jpg"
            if not cv2.imwrite(str(path), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)):
                raise OSError(f"{path}: OpenCV could not write the JPEG")
            np.save(parse_dir / f"{stem}.npy", parsing[None].astype(np.int64))
        split = "val" if index >= num_videos - num_val else "train"
        splits[split].append((rel, num_frames))
    for split, rows in splits.items():
        with open(out / f"{split}_set.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f, lineterminator="\n").writerows([["path", "len"], *rows])
    return out
