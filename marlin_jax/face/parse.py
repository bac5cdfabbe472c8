"""LaPa-style face parsing maps, offline; every result says which parser ran.

- ``"mediapipe-mesh"`` (the default when installed, :data:`MESH_INSTALL`): polygons over
  MediaPipe's learned 468-point face mesh plus its selfie segmentation for hair
  (:mod:`marlin_jax.face.mesh`).
- ``"template-5pt"`` (the fallback; ``"auto"`` warns once that it is in use): no installable
  package ships face-parsing weights, so a hand-drawn mean-face layout of the LaPa regions is
  warped onto each face by the least-squares affine map of its 5 canonical points onto the
  detector's 5 landmarks. It gets the layout right (what Fasking needs on its patch grid), not
  individual shapes (open mouths, hair, occlusions).

Labels: :data:`marlin_jax.face.labels.LAPA_LABELS`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import cv2
import numpy as np

from marlin_jax.face import mesh
from marlin_jax.face.crop import fill_missing
from marlin_jax.face.detect import SCORE_THRESHOLD, detect_faces, primary_faces
from marlin_jax.face.labels import HAIR, I_MOUTH, L_BROW, L_EYE, L_LIP, NOSE, R_BROW, R_EYE, SKIN, U_LIP
from marlin_jax.face.mesh import MESH_METHOD, fill_polygon, mesh_available

log = logging.getLogger(__name__)

PARSER_METHOD = "template-5pt"  # the parser of the default install
MESH_INSTALL = "pip install ai-edge-litert && pip install --no-deps mediapipe==0.10.21"


# Canonical 5 points (ArcFace's 112 x 112 alignment frame): image-left eye, image-right eye,
# nose tip, image-left and image-right mouth corners. The template below lives in this frame.
CANONICAL_POINTS = np.array(
    [[38.29, 51.70], [73.53, 51.50], [56.03, 71.74], [41.55, 92.37], [70.73, 92.20]], np.float64
)
_MID_X = 55.91  # between the canonical eyes; image-right parts mirror image-left ones about it


def _mirror(points: list[tuple[float, float]]) -> np.ndarray:
    pts = np.asarray(points, np.float64)
    return np.stack([2 * _MID_X - pts[:, 0], pts[:, 1]], axis=1)[::-1]


def _ellipse(cx: float, cy: float, ax: float, ay: float, n: int = 24) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + ax * np.cos(t), cy + ay * np.sin(t)], axis=1)


def _build_template() -> list[tuple[int, np.ndarray]]:
    """(label, polygon) pairs in the canonical frame, painted in order (later wins)."""
    # Face (skin): forehead arc down the temples, cheeks, jaw to the chin.
    half_face = [
        (56.0, 12.0), (42.0, 13.5), (30.0, 18.5), (20.5, 27.0), (15.5, 38.0), (14.0, 50.0),
        (14.5, 64.0), (17.5, 77.0), (23.5, 90.0), (32.0, 101.0), (43.0, 109.0), (56.0, 113.0),
    ]  # fmt: skip
    face = np.concatenate([np.asarray(half_face), _mirror(half_face[1:-1])])
    # Hair: a cap over the forehead and down the temples (painted under the face).
    half_hair = [
        (56.0, -6.0), (36.0, -3.0), (20.0, 6.0), (9.0, 20.0), (4.0, 36.0), (5.0, 52.0),
        (12.0, 58.0), (16.0, 44.0), (20.0, 30.0), (56.0, 14.0),
    ]  # fmt: skip
    hair = np.concatenate([np.asarray(half_hair), _mirror(half_hair[1:-1])])
    brow = [
        (23.0, 42.5), (28.0, 37.0), (35.0, 34.5), (43.0, 34.5), (50.0, 37.0),
        (50.0, 40.5), (43.0, 38.5), (35.0, 38.5), (28.0, 40.5),
    ]  # fmt: skip
    nose = [
        (53.0, 54.0), (59.0, 54.0), (61.0, 64.0), (65.5, 73.0), (63.5, 77.5), (56.0, 79.0),
        (48.5, 77.5), (46.5, 73.0), (51.0, 64.0),
    ]  # fmt: skip
    (lx, ly), (rx, ry) = CANONICAL_POINTS[3], CANONICAL_POINTS[4]
    cx, cy = (lx + rx) / 2, (ly + ry) / 2
    w = (rx - lx) / 2
    upper = [
        (lx, ly), (cx - 0.6 * w, cy - 4.0), (cx - 0.2 * w, cy - 5.5), (cx, cy - 4.8),
        (cx + 0.2 * w, cy - 5.5), (cx + 0.6 * w, cy - 4.0), (rx, ry), (cx + 0.5 * w, cy - 0.3),
        (cx, cy - 0.1), (cx - 0.5 * w, cy - 0.3),
    ]  # fmt: skip
    inner = [
        (lx + 1.0, ly), (cx - 0.5 * w, cy - 0.3), (cx, cy - 0.1), (cx + 0.5 * w, cy - 0.3),
        (rx - 1.0, ry), (cx + 0.5 * w, cy + 1.0), (cx, cy + 1.3), (cx - 0.5 * w, cy + 1.0),
    ]  # fmt: skip
    lower = [
        (lx, ly), (cx - 0.5 * w, cy + 1.0), (cx, cy + 1.3), (cx + 0.5 * w, cy + 1.0), (rx, ry),
        (cx + 0.6 * w, cy + 4.5), (cx, cy + 7.0), (cx - 0.6 * w, cy + 4.5),
    ]  # fmt: skip
    (ex1, ey1), (ex2, ey2) = CANONICAL_POINTS[0], CANONICAL_POINTS[1]
    return [
        (HAIR, hair),
        (SKIN, face),
        (R_BROW, np.asarray(brow)),  # above the image-left eye: the subject's right brow
        (L_BROW, _mirror(brow)),
        (R_EYE, _ellipse(ex1, ey1, 8.0, 3.6)),
        (L_EYE, _ellipse(ex2, ey2, 8.0, 3.6)),
        (NOSE, np.asarray(nose)),
        (U_LIP, np.asarray(upper)),
        (L_LIP, np.asarray(lower)),
        (I_MOUTH, np.asarray(inner)),
    ]


TEMPLATE = _build_template()


def fit_affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares 2 x 3 affine mapping ``src`` ``(K, 2)`` points onto ``dst`` ``(K, 2)``.

    Falls back to a similarity transform when the affine is badly conditioned (profile faces,
    where the 5 points are nearly collinear), so the template never collapses to a sliver.
    """
    a = np.concatenate([src, np.ones((len(src), 1))], axis=1)
    m, *_ = np.linalg.lstsq(a, dst, rcond=None)
    affine = m.T
    sv = np.linalg.svd(affine[:, :2], compute_uv=False)
    if sv[1] > 0 and sv[0] / sv[1] < 2.5:
        return affine
    sim, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.LMEDS)
    return sim if sim is not None else affine


def render_template(landmarks: np.ndarray, size: int) -> np.ndarray:
    """Rasterises the LaPa template for 5 landmarks ``(5, 2)`` (crop pixels) -> uint8
    ``(size, size)`` label map."""
    affine = fit_affine(CANONICAL_POINTS, np.asarray(landmarks, np.float64))
    out = np.zeros((size, size), np.uint8)
    for label, poly in TEMPLATE:
        fill_polygon(out, label, poly @ affine[:, :2].T + affine[:, 2])
    return out


@dataclass(frozen=True)
class ParseResult:
    """maps: uint8 ``(T, S, S)`` LaPa labels; found: bool ``(T,)``, True where a face was located
    in that frame (others reuse the nearest earlier frame's landmarks; all-background maps if no
    frame has a face); method: which parser made the maps; fallback: frames the mesh parser left
    to the template."""

    maps: np.ndarray
    found: np.ndarray
    method: str
    fallback: int = 0


@functools.cache
def _warn_template_fallback() -> None:
    """Says once per process that the template fallback runs, and how to get the learned parser."""
    log.warning(
        "face parsing: the learned parser (%s) is not installed, using the fallback %s "
        "(a template warped to 5 landmarks: closed lips, fixed hair). For the learned "
        "parser: %s", MESH_METHOD, PARSER_METHOD, MESH_INSTALL,
    )  # fmt: skip


def available_methods() -> tuple[str, ...]:
    """Parsers that can run here, best first."""
    return (MESH_METHOD, PARSER_METHOD) if mesh_available() else (PARSER_METHOD,)


@dataclass(frozen=True)
class FaceParser:
    """Face parser configuration.

    method: ``"auto"`` (the best available: ``"mediapipe-mesh"`` when its optional models are
        installed, else ``"template-5pt"``), or one of them by name. ``.method`` is the parser
        that runs. With the mesh parser, frames where the mesh model rejects the face fall back
        to the template (``ParseResult.fallback`` counts them).
    """

    method: str = "auto"
    score_threshold: float = SCORE_THRESHOLD
    num_threads: int = 0

    def __post_init__(self):
        methods = available_methods()
        if self.method == "auto":
            object.__setattr__(self, "method", methods[0])
            if self.method == PARSER_METHOD:
                _warn_template_fallback()
        elif self.method not in methods:
            if self.method not in (MESH_METHOD, PARSER_METHOD):
                raise ValueError(f"unknown face parser {self.method!r}; known: {(MESH_METHOD, PARSER_METHOD)}")
            raise ValueError(f"face parser {self.method!r} is not installed ({MESH_INSTALL})")

    def parse(self, crops: np.ndarray, landmarks: np.ndarray | None = None) -> ParseResult:
        """Face crops uint8 ``(T, S, S, 3)`` -> :class:`ParseResult`.

        ``landmarks`` ``(T, 5, 2)`` in crop pixels (NaN rows = no face), e.g. from
        :meth:`FaceCropper.crop_video_with_landmarks`, skips detection on the crops.
        """
        crops = np.asarray(crops)
        if crops.ndim != 4 or crops.shape[-1] != 3 or crops.shape[1] != crops.shape[2]:
            raise ValueError(f"crops must be square RGB (T, S, S, 3), got shape {crops.shape}")
        t, size = crops.shape[0], crops.shape[1]
        if landmarks is None:
            dets = detect_faces(crops, self.score_threshold, num_threads=self.num_threads)
            _, landmarks, found = primary_faces(dets)
        else:
            landmarks = np.asarray(landmarks, np.float32)
            if landmarks.shape != (t, 5, 2):
                raise ValueError(f"landmarks must be ({t}, 5, 2), got {landmarks.shape}")
            found = ~np.isnan(landmarks).any(axis=(1, 2))
        maps = np.zeros((t, size, size), np.uint8)
        fallback = 0
        if found.any():
            filled = fill_missing(landmarks, found)
            threads = self.num_threads or 1
            for i in range(t):
                if self.method == MESH_METHOD:
                    points, logit = mesh.mesh_points(crops[i], filled[i], threads)
                    if logit >= mesh.MIN_FACE_LOGIT:
                        maps[i] = mesh.render_mesh(points, size, mesh.person_mask(crops[i], threads))
                        continue
                    fallback += 1
                maps[i] = render_template(filled[i], size)
        log.info(
            "face parsing: %s on %d frames (%d with a face, %d by the template fallback)",
            self.method, t, found.sum(), fallback,
        )  # fmt: skip
        return ParseResult(maps, found, self.method, fallback)


def parse_faces(crops: np.ndarray, landmarks: np.ndarray | None = None, parser: FaceParser | None = None) -> np.ndarray:
    """Face crops uint8 ``(T, S, S, 3)`` -> LaPa label maps uint8 ``(T, S, S)``.

    The parser that ran is logged (and is ``(parser or FaceParser()).method``); use
    :meth:`FaceParser.parse` to also get it, and which frames had a face, in the result.
    """
    return (parser or FaceParser()).parse(crops, landmarks).maps
