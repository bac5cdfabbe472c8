"""Optional learned parser: MediaPipe face mesh (468 landmarks) + selfie segmentation.

The models are the ``.tflite`` files of the ``mediapipe==0.10.21`` wheel (installed with
``--no-deps``, see ``parse.MESH_INSTALL``; newer releases ship none), or those in the folder
``MARLIN_FACE_MESH_DIR`` names; they run on the LiteRT interpreter (``ai-edge-litert``), not
mediapipe's Python API (which does not work beside protobuf >= 6). Nothing is downloaded.

Regions are polygons over the mesh's contours; hair is the person mask outside the face oval,
above the mouth line (below it the mask is mostly neck, ears and clothes).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import cv2
import numpy as np

from marlin_jax.face import labels

MESH_METHOD = "mediapipe-mesh"
ENV_DIR = "MARLIN_FACE_MESH_DIR"
_FILES = {
    "landmark": ("face_landmark", "face_landmark.tflite"),
    "segment": ("selfie_segmentation", "selfie_segmentation.tflite"),
}

# Ordered contours of the 468-point face mesh topology (indices are facts of the model's output).
# "right"/"left" are the subject's: the subject's right eye (33..133) is on the image's left.
FACE_OVAL = [
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
    152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
]  # fmt: skip
OUTER_UPPER_LIP = [61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291]
OUTER_LOWER_LIP = [291, 375, 321, 405, 314, 17, 84, 181, 91, 146, 61]
INNER_UPPER_LIP = [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308]
INNER_LOWER_LIP = [308, 324, 318, 402, 317, 14, 87, 178, 88, 95, 78]
RIGHT_EYE = [33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246]
LEFT_EYE = [263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466]
RIGHT_BROW = [46, 53, 52, 65, 55, 107, 66, 105, 63, 70]  # lower edge out->in, upper in->out
LEFT_BROW = [276, 283, 282, 295, 285, 336, 296, 334, 293, 300]
# The nose: the outline of its lower part, plus a bridge from between the eyes (168) that widens
# to the outline's upper side points (220 on the image's left, 440 on its right).
NOSE_LOWER = [45, 220, 115, 48, 64, 98, 97, 2, 326, 327, 294, 278, 344, 440, 275]
NOSE_TOP, NOSE_BRIDGE_ENDS, ALAE = 168, (220, 440), (98, 327)
MOUTH_CORNERS = (61, 291)

_LANDMARK_INPUT = 192
_SEGMENT_INPUT = 256
_ROI_SCALE = 1.5  # MediaPipe's face ROI: the detection square enlarged 1.5x, eyes levelled
MIN_FACE_LOGIT = 0.0  # the landmark model's face-presence logit; below it the frame falls back


def mesh_model_paths() -> dict[str, str] | None:
    """Paths of the two ``.tflite`` models, or None when they are not installed."""
    env = os.environ.get(ENV_DIR)
    if env:
        paths = {k: os.path.join(env, f) for k, (_, f) in _FILES.items()}
    else:
        spec = importlib.util.find_spec("mediapipe")  # locate only: importing it is not needed
        if spec is None or not spec.submodule_search_locations:
            return None
        root = os.path.join(list(spec.submodule_search_locations)[0], "modules")
        paths = {k: os.path.join(root, d, f) for k, (d, f) in _FILES.items()}
    return paths if all(os.path.isfile(p) for p in paths.values()) else None


def mesh_available() -> bool:
    """True when the LiteRT interpreter and the mesh models are installed."""
    return importlib.util.find_spec("ai_edge_litert") is not None and mesh_model_paths() is not None


@functools.cache
def _interpreter(kind: str, num_threads: int):
    from ai_edge_litert.interpreter import Interpreter

    paths = mesh_model_paths()
    if paths is None:
        raise RuntimeError(
            f"face mesh models not found: install them with `pip install --no-deps mediapipe==0.10.21` or set {ENV_DIR}"
        )
    it = Interpreter(model_path=paths[kind], num_threads=num_threads or None)
    it.allocate_tensors()
    return it


def _run(it, x: np.ndarray) -> list[np.ndarray]:
    it.set_tensor(it.get_input_details()[0]["index"], x[None].astype(np.float32))
    it.invoke()
    return [it.get_tensor(o["index"]) for o in it.get_output_details()]


def mesh_points(crop: np.ndarray, five: np.ndarray, num_threads: int = 1) -> tuple[np.ndarray, float]:
    """468 face-mesh landmarks ``(468, 2)`` in crop pixels and the face-presence logit.

    The model's input is MediaPipe's face ROI: the crop's square (the face box) enlarged 1.5x
    around its centre and rotated so the detector's eyes (``five[:2]``) are level.
    """
    size = crop.shape[0]
    (lx, ly), (rx, ry) = five[0], five[1]
    angle = float(np.degrees(np.arctan2(ry - ly, rx - lx)))
    m = cv2.getRotationMatrix2D((size / 2, size / 2), angle, _LANDMARK_INPUT / (_ROI_SCALE * size))
    m[:, 2] += _LANDMARK_INPUT / 2 - size / 2
    x = cv2.warpAffine(crop, m, (_LANDMARK_INPUT, _LANDMARK_INPUT), flags=cv2.INTER_LINEAR)
    points, logit = _run(_interpreter("landmark", num_threads), x / np.float32(255))
    inv = cv2.invertAffineTransform(m)
    xy = points.reshape(-1, 3)[:, :2] @ inv[:, :2].T + inv[:, 2]
    return xy.astype(np.float32), float(np.ravel(logit)[0])


def person_mask(crop: np.ndarray, num_threads: int = 1) -> np.ndarray:
    """Selfie-segmentation person mask of a crop: bool ``(S, S)``."""
    size = crop.shape[0]
    x = cv2.resize(crop, (_SEGMENT_INPUT, _SEGMENT_INPUT), interpolation=cv2.INTER_AREA)
    (prob,) = _run(_interpreter("segment", num_threads), x / np.float32(255))
    prob = cv2.resize(prob.reshape(_SEGMENT_INPUT, _SEGMENT_INPUT), (size, size))
    return prob > 0.5


def fill_polygon(out: np.ndarray, label: int, poly: np.ndarray, shift: int = 4) -> None:
    """Paints polygon ``poly`` ``(K, 2)`` (float pixels, rasterised at 1/2**shift px) with ``label``."""
    cv2.fillPoly(out, [np.round(poly * (1 << shift)).astype(np.int32)], int(label), lineType=cv2.LINE_8, shift=shift)


def render_mesh(points: np.ndarray, size: int, person: np.ndarray | None = None) -> np.ndarray:
    """LaPa label map uint8 ``(size, size)`` from 468 mesh points (crop pixels) and an optional
    person mask (for hair)."""
    out = np.zeros((size, size), np.uint8)
    if person is not None:
        face = np.zeros_like(out)
        fill_polygon(face, 1, points[FACE_OVAL])
        above = np.arange(size)[:, None] < points[list(MOUTH_CORNERS), 1].mean()
        out[person & (face == 0) & above] = labels.HAIR
    eye_dir = points[263] - points[33]
    eye_dir /= max(float(np.linalg.norm(eye_dir)), 1e-6)
    half = 0.2 * float(np.linalg.norm(points[ALAE[1]] - points[ALAE[0]])) * eye_dir
    top = points[NOSE_TOP]
    bridge = np.stack([top - half, top + half, points[NOSE_BRIDGE_ENDS[1]], points[NOSE_BRIDGE_ENDS[0]]])
    for label, poly in (
        (labels.SKIN, points[FACE_OVAL]),
        (labels.NOSE, points[NOSE_LOWER]),
        (labels.NOSE, bridge),
        (labels.R_BROW, points[RIGHT_BROW]),
        (labels.L_BROW, points[LEFT_BROW]),
        (labels.R_EYE, points[RIGHT_EYE]),
        (labels.L_EYE, points[LEFT_EYE]),
        (labels.U_LIP, points[OUTER_UPPER_LIP + INNER_UPPER_LIP[::-1]]),
        (labels.L_LIP, points[OUTER_LOWER_LIP + INNER_LOWER_LIP[::-1]]),
        (labels.I_MOUTH, points[INNER_UPPER_LIP + INNER_LOWER_LIP[1:-1]]),
    ):
        fill_polygon(out, label, poly)
    return out
