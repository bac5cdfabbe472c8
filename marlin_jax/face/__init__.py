"""Faces, offline: RetinaFace detection, smoothed square crops, LaPa-style parsing maps.

Typical use::

    from marlin_jax.face import FaceCropper, parse_faces
    crops = FaceCropper(size=224).crop_video(frames)   # uint8 (T, H, W, 3) -> (T, 224, 224, 3)
    maps = parse_faces(crops)                          # -> uint8 (T, 224, 224) LaPa labels
"""

from marlin_jax.face.crop import FaceCropper, FaceTrack, NoFaceError, crop_square, square_from_box
from marlin_jax.face.detect import Detections, detect_faces
from marlin_jax.face.parse import (
    LAPA_LABELS,
    PARSER_METHOD,
    FaceParser,
    ParseResult,
    parse_faces,
    render_template,
)

__all__ = [
    "LAPA_LABELS",
    "PARSER_METHOD",
    "Detections",
    "FaceCropper",
    "FaceParser",
    "FaceTrack",
    "NoFaceError",
    "ParseResult",
    "crop_square",
    "detect_faces",
    "parse_faces",
    "render_template",
    "square_from_box",
]
