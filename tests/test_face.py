"""Face detection, cropping and parsing (marlin_jax.face)."""

from __future__ import annotations

import numpy as np
import pytest

from marlin_jax.face import (
    LAPA_LABELS,
    MESH_INSTALL,
    MESH_METHOD,
    MIN_FRAME_SIDE,
    PARSER_METHOD,
    FaceCropper,
    FaceParser,
    FrameTooSmallError,
    NoFaceError,
    available_methods,
    crop_square,
    detect_faces,
    mesh_available,
    parse_faces,
    render_template,
    square_from_box,
)
from marlin_jax.face.crop import fill_missing, smooth_squares
from marlin_jax.face.parse import CANONICAL_POINTS
from marlin_jax.video_io import read_frames

FACE_PARTS = (2, 3, 4, 5, 6, 7, 8, 9)


def _centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    assert ys.size, "region is empty"
    return np.array([xs.mean(), ys.mean()])


def _jitter(squares: np.ndarray) -> float:
    """Mean absolute frame-to-frame change of centre and side, in pixels."""
    return float(np.abs(np.diff(squares, axis=0)).mean())


# ---------------------------------------------------------------------------------- pure parts


def test_square_from_box_is_the_originals_rule():
    box = np.array([10.0, 20.0, 50.0, 80.0])  # 40 wide, 60 high
    np.testing.assert_allclose(square_from_box(box), [30.0, 50.0, 60.0])
    np.testing.assert_allclose(square_from_box(box, margin=0.25), [30.0, 50.0, 90.0])


def test_crop_square_pads_with_zeros_outside_the_frame():
    frame = np.full((40, 60, 3), 200, np.uint8)
    crop = crop_square(frame, np.array([5.0, 5.0, 20.0]), size=20)  # square from -5 to 15
    assert crop.shape == (20, 20, 3) and crop.dtype == np.uint8
    assert (crop[:4, :4] == 0).all() and (crop[7:, 7:] == 200).all()


@pytest.mark.oracle
def test_crop_square_matches_marlin_pytorch_crop(marlin_pytorch):
    import cv2
    from marlin_pytorch.util import crop_with_padding

    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    for _ in range(20):
        x1, y1 = rng.uniform(-30, 110), rng.uniform(-30, 80)
        box = np.array([x1, y1, x1 + rng.uniform(8, 70), y1 + rng.uniform(8, 70)])
        # the original: centre int((x1+x2)/2), half-side int(max(w, h)/2), pad 0, cv2.resize
        x, y = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
        m = int(max(box[2] - box[0], box[3] - box[1]) / 2)
        ref = cv2.resize(crop_with_padding(frame, x - m, x + m, y - m, y + m, 0), (224, 224))
        np.testing.assert_array_equal(crop_square(frame, square_from_box(box), 224), ref)


def test_fill_missing_reuses_last_box_and_first_box_for_leading_misses():
    values = np.arange(6, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    found = np.array([False, False, True, False, True, False])
    np.testing.assert_array_equal(fill_missing(values, found)[:, 0], [2, 2, 2, 2, 4, 4])


def test_smoothing_reduces_jitter_of_a_noisy_track():
    rng = np.random.default_rng(1)
    t = np.arange(200, dtype=np.float32)
    clean = np.stack([100 + 0.2 * t, 80 + 0.1 * t, np.full_like(t, 120)], axis=1)
    noisy = clean + rng.normal(0, 3, clean.shape).astype(np.float32)
    noisy[50] += 60  # a one-frame outlier (a false detection)
    smooth = smooth_squares(noisy, sigma=2.0)
    assert _jitter(smooth) < 0.25 * _jitter(noisy)
    assert np.abs(smooth - clean).max() < 6  # the outlier is gone, the motion is kept
    np.testing.assert_array_equal(smooth_squares(noisy, sigma=0), noisy)


def test_template_layout_of_a_canonical_face():
    # the canonical points scaled into a 224 crop: regions in anatomical order, subject's right
    # (labels 2, 4) on the image's left
    maps = render_template(CANONICAL_POINTS * 2.0, 224)
    assert maps.shape == (224, 224) and maps.dtype == np.uint8
    assert set(np.unique(maps)) == set(range(len(LAPA_LABELS)))
    c = {label: _centroid(maps == label) for label in range(1, 11)}
    assert c[2][1] < c[4][1] < c[6][1] < c[7][1] < c[8][1] < c[9][1]
    assert c[2][0] < c[3][0] and c[4][0] < c[5][0]
    assert c[10][1] < c[2][1]


def test_fill_missing_takes_the_nearest_found_row():
    values = np.arange(9, dtype=np.float32)
    found = np.array([False, True, False, False, False, False, True, False, False])
    # row 3 is nearer row 1, rows 4-5 nearer row 6, trailing rows take the last found one
    np.testing.assert_array_equal(fill_missing(values, found), [1, 1, 1, 1, 6, 6, 6, 6, 6])


def test_no_face_raises_naming_the_frame_count():
    with pytest.raises(NoFaceError, match="clip.mp4: no face found in any of 4 frames searched"):
        FaceCropper().crop_video(np.zeros((4, 120, 160, 3), np.uint8), name="clip.mp4")
    with pytest.raises(NoFaceError, match=r"clip.mp4: no face found in any of 3 frames searched "
                                          r"\(of the 5 in the video\)"):
        FaceCropper().track_stream(iter(np.zeros((5, 64, 64, 3), np.uint8)), "clip.mp4",
                                   search=lambda i: i % 2 == 0)


def _fade_in(black: int, face: int, size: int = 64) -> np.ndarray:
    """``black`` black frames, then ``face`` frames of a synthetic face: uint8 (T, size, size, 3)."""
    from marlin_jax.data.synthetic import render_video

    faces = render_video(1, num_frames=face, size=size)["frames"]
    return np.concatenate([np.zeros((black, size, size, 3), np.uint8), faces])


def test_track_stream_tracks_the_whole_video_and_fills_a_fade_in_with_the_first_face():
    frames = _fade_in(black=20, face=12)
    track = FaceCropper(smoothing=0).track_stream(iter(frames), "fade.mp4", search=lambda i: i % 2 == 0,
                                                   batch_size=4)  # batches straddle the fade
    assert track.num_frames == 32
    np.testing.assert_array_equal(track.indices, np.arange(0, 32, 2))
    assert not track.found[:10].any() and track.found[10:].all()
    first = track.squares_at([20])
    np.testing.assert_array_equal(track.squares_at(range(20)), np.repeat(first, 20, 0))
    np.testing.assert_array_equal(track.squares_at([23]), track.squares_at([22]))  # nearest searched
    # the same boxes as tracking the searched frames in memory
    whole = FaceCropper(smoothing=0).track(frames[::2], "fade.mp4")
    np.testing.assert_allclose(track.squares, whole.squares, atol=1e-4)


def test_frames_too_small_for_a_face_name_the_video_and_the_minimum():
    with pytest.raises(FrameTooSmallError, match=rf"dot.mp4: frames are 1x1 pixels, too small to hold a "
                                                 rf"face \(face detection needs at least {MIN_FRAME_SIDE}x"):
        FaceCropper().crop_video(np.zeros((3, 1, 1, 3), np.uint8), name="dot.mp4")
    with pytest.raises(NoFaceError, match="frames are 64x4 pixels"):  # a NoFaceError: callers skip it
        detect_faces(np.zeros((1, 4, 64, 3), np.uint8))


def test_bad_frames_raise_a_clear_error():
    with pytest.raises(ValueError, match="uint8"):
        detect_faces(np.zeros((2, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="RGB"):
        detect_faces(np.zeros((2, 64, 64), np.uint8))
    with pytest.raises(ValueError, match="square RGB"):
        parse_faces(np.zeros((2, 64, 48, 3), np.uint8))


def test_unknown_parser_is_refused():
    with pytest.raises(ValueError, match="unknown face parser"):
        FaceParser(method="bisenet")


def test_auto_parser_is_the_best_installed_and_says_so():
    assert FaceParser().method == available_methods()[0]
    assert FaceParser(PARSER_METHOD).method == PARSER_METHOD  # always installed
    if not mesh_available():
        with pytest.raises(ValueError, match="not installed.*--no-deps mediapipe"):
            FaceParser(MESH_METHOD)
    assert "--no-deps mediapipe==0.10.21" in MESH_INSTALL


needs_mesh = pytest.mark.skipif(not mesh_available(), reason=f"optional: {MESH_INSTALL}")


def test_template_fallback_warns_once_and_names_the_learned_parser(monkeypatch, caplog):
    from marlin_jax.face import parse

    monkeypatch.setattr(parse, "available_methods", lambda: (PARSER_METHOD,))
    parse._warn_template_fallback.cache_clear()
    with caplog.at_level("WARNING", logger=parse.__name__):
        assert FaceParser().method == PARSER_METHOD
        FaceParser()
        FaceParser(PARSER_METHOD)  # asked for by name: no warning
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "fallback template-5pt" in warnings[0] and MESH_INSTALL in warnings[0]


def test_parser_agreement_figures_of_known_maps():
    from tests.script_utils import load_script

    cmp = load_script("compare_parsers")
    a = np.zeros((2, 224, 224), np.uint8)
    a[:, 32:192, 48:176] = 1  # skin
    a[:, 80:96, 64:96] = 4  # an eye
    b = a.copy()
    b[:, 80:96, 64:96] = 1  # the other parser missed the eye
    same = cmp.map_agreement(cmp.label_counts(a, a))
    assert same["pixel_agreement"] == 1 and same["face_iou"] == 1 and same["mean_iou"] == 1
    assert np.isnan(same["iou_nose"])  # absent from both: not counted in the mean
    got = cmp.map_agreement(cmp.label_counts(a, b))
    assert got["pixel_agreement"] == pytest.approx(1 - 16 * 32 / 224**2)
    assert got["iou_left_eye"] == 0 and got["face_iou"] == 1
    assert got["iou_skin"] == pytest.approx((160 * 128 - 16 * 32) / (160 * 128))
    assert got["mean_iou"] == pytest.approx((1 + got["iou_skin"] + 0) / 3)
    with pytest.raises(ValueError, match="differ in shape"):
        cmp.label_counts(a, b[:1])
    # fasking masks: identical parsings give identical masks for the same draws; two draws of
    # one parser differ (the floor); a parsing with a wider face keeps other patches visible
    clip = np.repeat(a[:1], 16, 0)
    m = cmp.mask_agreement(clip, clip, seeds=3)
    assert m["token_agreement"] == 1 and m["visible_iou"] == 1
    assert m["token_agreement_same_parser"] < 1
    wide = clip.copy()
    wide[:, :, :48] = 1
    assert cmp.mask_agreement(clip, wide, seeds=3)["visible_iou"] < 1
    with pytest.raises(ValueError, match="at least 16 frames"):
        cmp.mask_agreement(clip[:8], clip[:8])


@pytest.mark.samples
@needs_mesh
def test_compare_parsers_on_a_sample_crop(samples_dir, tmp_path, capsys):
    from tests.script_utils import load_script

    out = tmp_path / "agreement.json"
    cmp = load_script("compare_parsers")
    assert cmp.main(["--videos", str(samples_dir / "cropped04.mp4"), "--json", str(out)]) == 0
    import json

    got = json.loads(out.read_text())["cropped04.mp4"]
    assert got["frames"] == 15 and got["mesh_fallback_frames"] == 0
    # the two parsers agree on where the face is, less on its parts (mouth, brows, hair)
    assert got["face_iou"] > 0.7 and 0.5 < got["pixel_agreement"] < 0.95
    assert "per-class IoU" in capsys.readouterr().out


# ------------------------------------------------------------------------------ sample videos


@pytest.fixture(scope="module")
def video01(samples_dir):
    return read_frames(samples_dir / "video01.mp4")


@pytest.fixture(scope="module")
def video01_dets(video01):
    return detect_faces(video01)


@pytest.mark.samples
def test_face_in_every_frame_of_in_the_wild_samples(samples_dir, video01_dets):
    assert all(len(d) >= 1 for d in video01_dets)
    video05 = read_frames(samples_dir / "video05.mp4")  # fades in from black
    dets = detect_faces(video05)
    visible = video05.reshape(len(video05), -1).mean(axis=1) > 8  # frames that are not ~black
    assert visible.sum() >= 80
    assert all(len(d) >= 1 for d, v in zip(dets, visible, strict=True) if v)
    assert not any(len(d) for d, v in zip(dets, visible, strict=True) if not v)


@pytest.mark.samples
def test_fade_in_frames_take_the_first_good_box(samples_dir):
    video05 = read_frames(samples_dir / "video05.mp4")
    track = FaceCropper(smoothing=0).track(video05, "video05.mp4")
    first = int(np.argmax(track.found))
    assert first >= 4 and not track.found[:first].any()
    np.testing.assert_array_equal(track.squares[:first], np.repeat(track.squares[first:first + 1], first, 0))
    crops = FaceCropper().crop_video(video05)
    assert crops.shape == (90, 224, 224, 3) and crops.dtype == np.uint8


@pytest.mark.samples
def test_crops_of_video01_are_centred_on_the_face(video01):
    frames = video01[::6]
    crops, landmarks, found = FaceCropper().crop_video_with_landmarks(frames, "video01.mp4")
    assert crops.shape == (50, 224, 224, 3) and crops.dtype == np.uint8 and found.all()
    maps = parse_faces(crops)  # detects again, on the crops
    assert maps.shape == (50, 224, 224) and maps.dtype == np.uint8
    centre = maps[:, 112 - 8 : 112 + 8, 112 - 8 : 112 + 8]
    assert np.isin(centre, (1, 6)).mean() > 0.95  # skin / nose at the centre of every crop
    assert (maps[:, 112, [76, 148]] == 1).all()  # both cheeks are skin
    # the face fills most of the crop, as in the original's tight square
    face_fraction = np.isin(maps, (1, *FACE_PARTS)).mean(axis=(1, 2))
    assert (face_fraction > 0.4).all() and (face_fraction < 0.9).all()
    # the landmarks carried from the frames land where detection on the crop finds them
    again = detect_faces(crops[::10])
    for i, d in enumerate(again):
        assert np.abs(d.landmarks[0] - landmarks[10 * i]).max() < 8


@pytest.mark.samples
def test_crops_frame_the_face_like_the_reference_crops(samples_dir, video01):
    # cropped01.mp4 is the original pipeline's crop of another clip of the same recording: the
    # face must sit in our crops where it sits in the reference crops (same square rule)
    ours = FaceCropper().crop_video(video01[::6])
    ref = read_frames(samples_dir / "cropped01.mp4", step=3)
    box = {k: np.stack([d.boxes[0] for d in detect_faces(a)]).mean(0) for k, a in
           (("ours", ours), ("ref", ref))}  # fmt: skip
    np.testing.assert_allclose(box["ours"], box["ref"], atol=5)


@pytest.mark.samples
def test_smoothing_reduces_crop_jitter_on_video01(video01_dets):
    raw = FaceCropper(smoothing=0).track_detections(video01_dets).squares
    smooth = FaceCropper(smoothing=2.0).track_detections(video01_dets).squares
    assert _jitter(smooth) < 0.6 * _jitter(raw)
    assert np.abs(smooth - raw).max() < 0.2 * raw[:, 2].mean()  # it still follows the face


@pytest.mark.samples
@pytest.mark.parametrize("method", [PARSER_METHOD, pytest.param(MESH_METHOD, marks=needs_mesh)])
@pytest.mark.parametrize("name", ["cropped01.mp4", "cropped04.mp4"])
def test_parsing_of_cropped_samples_puts_eyes_above_nose_above_mouth(samples_dir, name, method):
    crops = read_frames(samples_dir / name)
    result = FaceParser(method).parse(crops)
    assert result.method == method and result.found.all() and result.fallback == 0
    for m in result.maps[:: max(1, len(crops) // 8)]:
        eyes = _centroid(np.isin(m, (4, 5)))[1]
        nose = _centroid(m == 6)[1]
        mouth = _centroid(np.isin(m, (7, 8, 9)))[1]
        brows = _centroid(np.isin(m, (2, 3)))[1]
        assert brows < eyes < nose < mouth
        assert _centroid(m == 4)[0] < _centroid(m == 5)[0]  # subject's right eye on image left


@pytest.mark.samples
def test_fasking_masks_from_parsing_keep_the_planned_regions(samples_dir):
    from marlin_jax.masking import fasking_slice_masks

    maps = FaceParser().parse(read_frames(samples_dir / "cropped01.mp4", max_frames=16)).maps
    slices = maps[::2]  # one map per tubelet slice

    def touching(labels):  # (8, 14, 14): patches that contain any of the labels
        return np.isin(slices, labels).reshape(8, 14, 16, 14, 16).any(axis=(2, 4))

    # fasking: background, then skin, kept visible first -> eyes and nose are masked
    vis = fasking_slice_masks(slices, [6, 5, 0, 1, 2, 3, 4], keep_fraction=0.1)
    assert touching((4, 5, 6)).any(axis=(1, 2)).all()
    assert not (vis & touching((4, 5, 6))).any()
    assert (vis <= touching((0,))).all()
    # fasking_opp: the first group (subject's right brow + eye) is kept visible first
    vis = fasking_slice_masks(slices, [0, 1, 2, 3, 4, 5, 6], keep_fraction=0.1)
    assert (touching((2, 4)) <= vis).all()
    assert not (vis & touching((0,)) & ~touching((2, 3, 4, 5, 6, 7, 8, 9, 10))).any()


@pytest.mark.samples
def test_several_faces_tiny_and_huge_frames(video01):
    import cv2

    frame = video01[0]
    face = detect_faces(frame)[0]
    (x1, y1, x2, y2) = face.boxes[0]
    # two faces: the frame's face and a 1/3-size copy pasted bottom left; the largest wins
    both = frame.copy()
    both[240:, :160] = cv2.resize(frame, (160, 120), interpolation=cv2.INTER_AREA)
    dets = detect_faces(both)[0]
    assert len(dets) >= 2
    np.testing.assert_allclose(dets.boxes[0], face.boxes[0], atol=3)
    # tiny (60 x 80) and huge (1440 x 1920) frames: still found, crops still 224
    for scale in (1 / 6, 4):
        size = (int(480 * scale), int(360 * scale))
        resized = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
        crops = FaceCropper().crop_video(resized[None].repeat(2, 0))
        assert crops.shape == (2, 224, 224, 3)
        box = detect_faces(resized)[0].boxes[0] / scale
        np.testing.assert_allclose(box, [x1, y1, x2, y2], atol=6 / min(scale, 1) ** 0.5 * 2)


@pytest.mark.samples
@needs_mesh
def test_mesh_parser_follows_an_open_mouth(samples_dir):
    # video05 ends on a wide smile with teeth showing; the template draws a closed mouth
    crops, landmarks, _ = FaceCropper().crop_video_with_landmarks(
        read_frames(samples_dir / "video05.mp4")[-3:]
    )
    mesh = FaceParser(MESH_METHOD).parse(crops, landmarks)
    template = FaceParser(PARSER_METHOD).parse(crops, landmarks)
    assert mesh.method == MESH_METHOD and mesh.fallback == 0
    assert (mesh.maps == 8).sum() > 2 * (template.maps == 8).sum()
    assert (mesh.maps == 10).any()  # hair from the person segmentation
    # both parsers agree on where the face is
    face = np.isin(mesh.maps, (1, *FACE_PARTS))
    face_t = np.isin(template.maps, (1, *FACE_PARTS))
    assert (face & face_t).sum() / (face | face_t).sum() > 0.7


def test_template_parser_on_synthetic_faces_matches_their_ground_truth():
    """The cartoon faces of marlin_jax.data.synthetic come with LaPa maps: the detector finds
    them and the template puts every part near its true place, with the same left/right."""
    synthetic = pytest.importorskip("marlin_jax.data.synthetic")
    errors = {label: [] for label in (4, 5, 6, 7, 8, 9)}
    for index in range(6):
        video = synthetic.render_video(index, num_frames=8)
        result = FaceParser(PARSER_METHOD).parse(video["frames"][::4])
        assert result.found.all()
        for pred, truth in zip(result.maps, video["parsing"][::4], strict=True):
            for label, errs in errors.items():
                if (truth == label).sum() > 20:  # closed eyes / mouths can be tiny
                    errs.append(np.linalg.norm(_centroid(pred == label) - _centroid(truth == label)))
            face = np.isin(pred, (1, *FACE_PARTS))
            face_true = np.isin(truth, (1, *FACE_PARTS))
            assert (face & face_true).sum() / (face | face_true).sum() > 0.6
    for label, errs in errors.items():
        assert errs and np.mean(errs) < 14, (LAPA_LABELS[label], np.mean(errs))
