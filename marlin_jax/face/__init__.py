"""Faces, offline: RetinaFace detection, smoothed square crops, LaPa-style parsing maps.

Typical use::

    from marlin_jax.face import FaceCropper, parse_faces
    crops = FaceCropper(size=224).crop_video(frames)   # uint8 (T, H, W, 3) -> (T, 224, 224, 3)
    maps = parse_faces(crops)                          # -> uint8 (T, 224, 224) LaPa labels

A video with no face raises :class:`NoFaceError` (:class:`FrameTooSmallError` for frames under
``MIN_FRAME_SIDE`` pixels). Parsing uses the best parser installed (``FaceParser().method``).
"""

from marlin_jax.face.crop import FaceCropper, NoFaceError, crop_square, square_from_box
from marlin_jax.face.detect import MIN_FRAME_SIDE, FrameTooSmallError, detect_faces
from marlin_jax.face.labels import LAPA_LABELS
from marlin_jax.face.mesh import MESH_METHOD, mesh_available
from marlin_jax.face.parse import (
    MESH_INSTALL,
    PARSER_METHOD,
    FaceParser,
    available_methods,
    parse_faces,
    render_template,
)

__all__ = [
    "LAPA_LABELS",
    "MESH_INSTALL",
    "MESH_METHOD",
    "MIN_FRAME_SIDE",
    "PARSER_METHOD",
    "FaceCropper",
    "FaceParser",
    "FrameTooSmallError",
    "NoFaceError",
    "available_methods",
    "crop_square",
    "detect_faces",
    "mesh_available",
    "parse_faces",
    "render_template",
    "square_from_box",
]
