"""DCT-Net's compound pipeline against values computed the way ModelScope's `ImageCartoonPipeline`
computes them (references written here from its description, and MATLAB's published cp2tform example)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from skimage import data as skdata

from geneava.networks import dctnet_pipeline as P

# MATLAB's documented cp2tform(uv, xy, 'similarity') example: tdata.T and tdata.Tinv (4 decimals)
UV = np.array([[0.0, 0.0], [6.0, 3.0], [-2.0, 5.0]])
XY = np.array([[-1.0, -1.0], [0.0, -10.0], [4.0, 4.0]])
MATLAB_T = np.array([[-0.0764, -1.6190, 0], [1.6190, -0.0764, 0], [-3.2156, 0.0290, 1]])
MATLAB_TINV = np.array([[-0.0291, 0.6163, 0], [-0.6163, -0.0291, 0], [-0.0756, 1.9826, 1]])


def _complex_fit(src: np.ndarray, dst: np.ndarray) -> tuple[complex, complex]:
    """Least squares dst = c * src + d over complex points: a similarity without reflection."""
    zs, zd = src[:, 0] + 1j * src[:, 1], dst[:, 0] + 1j * dst[:, 1]
    (c, d), *_ = np.linalg.lstsq(np.stack([zs, np.ones_like(zs)], 1), zd, rcond=None)
    return c, d


def _cv2_matrix(c: complex, d: complex) -> np.ndarray:
    return np.array([[c.real, -c.imag, d.real], [c.imag, c.real, d.imag]])


def _invert(m: np.ndarray) -> np.ndarray:
    return np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]


def test_the_plain_candidate_is_matlabs_cp2tform():
    back = P._fit_nonreflective(XY, UV)  # fitted reference -> face, as cp2tform's port fits it
    plain = np.linalg.inv(back)
    assert np.allclose(plain, MATLAB_T, atol=6e-5) and np.allclose(back, MATLAB_TINV, atol=6e-5)


def test_the_crop_is_the_inverse_of_a_least_squares_fit_from_the_reference_to_the_face():
    rng = np.random.default_rng(0)
    ref = P.reference_points()
    for _ in range(20):  # faces: the reference turned, scaled, moved, with landmark noise
        angle, scale = rng.uniform(-0.5, 0.5), rng.uniform(0.3, 3)
        c = scale * np.exp(1j * angle)
        z = c * (ref[:, 0] + 1j * ref[:, 1]) + complex(*rng.uniform(0, 500, 2))
        face = np.stack([z.real, z.imag], 1) + rng.normal(0, 4, (5, 2))
        crop, back = P.similarity_for_cv2(face, ref)
        f32 = face.astype(np.float32).astype(np.float64)
        want_back = _cv2_matrix(*_complex_fit(ref.astype(np.float64), f32))
        np.testing.assert_allclose(back, want_back, rtol=0, atol=1e-9)
        np.testing.assert_allclose(crop, _invert(want_back), rtol=0, atol=1e-8)
        # the points are rounded to float32 first, as upstream's np.float32(facial_pts) does: it shows
        unrounded = _cv2_matrix(*_complex_fit(ref.astype(np.float64), face))
        assert np.abs(unrounded - want_back).max() > 1e-7
        # fitting the other way (face -> reference, what skimage's estimate does) is a different crop
        other = _cv2_matrix(*_complex_fit(f32, ref.astype(np.float64)))
        assert np.abs(other - crop).max() > 1e-3


def test_the_mirrored_candidate_is_judged_against_mirrored_reference_points_as_upstream_does():
    """cp2tform's Python port mirrors its reference argument in place before comparing the two
    candidates, so on MATLAB's own example it keeps the mirrored one, which MATLAB rejects."""
    crop, back = P.similarity_for_cv2(UV, XY)
    assert np.linalg.det(crop[:, :2]) < 0  # a reflection
    c, d = _complex_fit(XY * (-1, 1), UV)  # fitted to the mirrored reference, then mirrored back
    flipped = _invert(_cv2_matrix(c, d)) * np.array([[-1], [1]])
    assert np.allclose(crop, flipped, atol=1e-9) and np.allclose(back, _invert(flipped), atol=1e-9)
    # on a face the plain candidate wins
    face = P.reference_points() * 1.3 + 40
    assert np.linalg.det(P.similarity_for_cv2(face, P.reference_points())[0][:, :2]) > 0


# The MTCNN 96x112 template (align_trans.REFERENCE_FACIAL_POINTS before its +1 shift), typed from upstream
MTCNN = [[30.29459953, 51.69630051], [65.53179932, 51.50139999], [48.02519989, 71.73660278],
         [33.54930115, 92.3655014], [62.72990036, 92.20410156]]  # fmt: skip


def test_reference_points_and_working_size_follow_modelscope():
    ref = P.reference_points()
    assert ref.dtype == np.float32 and ref.shape == (5, 2)
    square = np.array([[x + 1, y + 1] for x, y in MTCNN]) + np.array([8.0, 0.0])  # default_square: +8 in x
    want = np.float32(square)
    want = (want - 112 / 2) * 0.75 + 112 / 2  # float32 throughout, as warp_and_crop_face computes it
    want *= 288 / 112.0
    assert want.dtype == np.float32 and np.array_equal(ref, want)
    # the long side is truncated (ModelScope: int(720 * h / w)); a 1001 x 801 image works at 899 x 720
    assert P.working_size(1001, 801) == (899, 720) and P.working_size(801, 1001) == (720, 899)
    assert P.working_size(1000, 1000) == (720, 720) and P.working_size(700, 2000) == (700, 2000)


def _pupil_reference(eye: np.ndarray, bgr: np.ndarray):
    """The pupil as described: equalised grey eye box, Otsu, dark pixels inside the polygon collected
    row by row, each coordinate list sorted, the element at count // 2."""
    xmin, xmax, ymin, ymax = (
        int(eye[:, 0].min()),
        int(eye[:, 0].max()),
        int(eye[:, 1].min()),
        int(eye[:, 1].max()),
    )
    if ymin >= ymax or xmin >= xmax or ymin < 0 or xmin < 0 or ymax > bgr.shape[0] or xmax > bgr.shape[1]:
        return None
    grey = cv2.equalizeHist(cv2.cvtColor(bgr[ymin:ymax, xmin:xmax].copy(), cv2.COLOR_BGR2GRAY))
    mask = cv2.fillConvexPoly(np.zeros_like(grey), (eye - [xmin, ymin]).astype(np.int32), 1)
    t = cv2.threshold(grey, 100, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)[1]
    dark = (1 - t / 255.0) * mask
    xs, ys = [], []
    for i in range(dark.shape[0]):
        for j in range(dark.shape[1]):
            if dark[i, j] > 0.5:
                xs.append(j)
                ys.append(i)
    if not xs:
        return dark.shape[1] / 2 + xmin, dark.shape[0] / 2 + ymin
    return sorted(xs)[len(xs) // 2] + xmin, sorted(ys)[len(ys) // 2] + ymin


@pytest.fixture(scope="module")
def astronaut_landmarks():
    rgb = np.asarray(skdata.astronaut())
    faces = P.landmarks68()(rgb)
    assert len(faces) == 1
    return rgb, faces[0]


def test_pupils_on_a_real_face_match_the_reference_and_sit_in_the_eyes(astronaut_landmarks):
    rgb, lm = astronaut_landmarks
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    for eye in (lm[36:41], lm[42:47]):
        got = P.find_pupil(eye, bgr)
        assert got == pytest.approx(_pupil_reference(eye, bgr))
        assert eye[:, 0].min() <= got[0] <= eye[:, 0].max() and eye[:, 1].min() <= got[1] <= eye[:, 1].max()
    pts = P.five_points(lm, bgr)
    assert np.array_equal(pts[2:], lm[[30, 48, 54]])
    assert not np.allclose(pts[0], lm[36:42].mean(0))  # the pupil, not the mean of six landmarks


def test_pupils_fall_back_to_five_landmark_means_when_an_eye_leaves_the_image(astronaut_landmarks):
    rgb, lm = astronaut_landmarks
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    shifted = lm.copy()
    shifted[42:47, 0] += rgb.shape[1] - shifted[42:47, 0].min() - 3  # the right eye's box crosses the edge
    assert P.find_pupil(shifted[42:47], bgr) is None
    pts = P.five_points(shifted, bgr)
    assert np.allclose(pts[0], lm[36:41].mean(0)) and np.allclose(pts[1], shifted[42:47].mean(0))


def test_a_synthetic_eye_finds_the_dark_disc_and_an_even_box_its_centre():
    bgr = np.full((60, 80, 3), 220, np.uint8)
    cv2.circle(bgr, (47, 31), 6, (20, 20, 20), -1)
    eye = np.array([[30.0, 30.0], [40.0, 22.0], [55.0, 22.0], [66.0, 30.0], [50.0, 40.0]])
    assert P.find_pupil(eye, bgr) == (47.0, 31.0) == _pupil_reference(eye, bgr)
    flat = np.full((60, 80, 3), 128, np.uint8)  # nothing darker than the rest: the box's centre
    assert P.find_pupil(eye, flat) == _pupil_reference(eye, flat)


def test_pupils_are_found_on_the_bgr_image():
    """A pupil dark only in blue: grey from BGR (OpenCV's weights: blue 0.114) and from RGB differ."""
    eye = np.array([[30.0, 30.0], [40.0, 22.0], [55.0, 22.0], [66.0, 30.0], [50.0, 40.0]])
    rgb = np.full((60, 80, 3), 200, np.uint8)
    cv2.circle(rgb, (38, 31), 6, (255, 255, 0), -1)  # bright in R and G, dark in blue
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    assert P.find_pupil(eye, bgr) == _pupil_reference(eye, bgr)
    assert P.find_pupil(eye, bgr) != P.find_pupil(eye, np.ascontiguousarray(rgb))


def _fake_networks(log: list):
    def run(net: str, bgr: np.ndarray) -> np.ndarray:
        log.append((net, bgr.shape))
        x = bgr.astype(np.int32)
        return ((x * 3 + 17) % 256 if net == "bg" else (255 - x) // 2 + 40).astype(np.uint8)

    return run


def test_cartoonize_blends_in_float_resizes_in_float_and_rounds_once(astronaut_landmarks, monkeypatch):
    rgb0, lm0 = astronaut_landmarks
    big = cv2.resize(rgb0, (801, 1001), interpolation=cv2.INTER_CUBIC)  # short side over 720
    h, w = P.working_size(*big.shape[:2])
    small = cv2.resize(big, (w, h), interpolation=cv2.INTER_AREA)
    lm = P.landmarks68()(small)
    log: list = []
    yy, xx = np.mgrid[:288, :288] / 287 * 2 - 1
    alpha = np.clip(1.5 - 1.5 * np.sqrt(xx**2 + yy**2), 0, 1).astype(np.float32)
    seen, pointed = [], []
    five = P.five_points

    def spy_five(face, image):
        pointed.append(image.copy())
        return five(face, image)

    def marks(img):
        seen.append(img.copy())
        return lm

    monkeypatch.setattr(P, "five_points", spy_five)
    got = P.cartoonize(big, _fake_networks(log), alpha, marks)
    assert got.shape == big.shape and got.dtype == np.uint8
    # landmarks on the working-size RGB image, pupils on its BGR copy
    assert len(seen) == 1 and np.array_equal(seen[0], small)
    assert len(pointed) == 1 and np.array_equal(pointed[0], small[:, :, ::-1])
    assert log[0] == ("bg", (-(-h // 16) * 16, -(-w // 16) * 16, 3)) and log[1] == ("head", (288, 288, 3))
    # the reference, step by step as ModelScope's pipeline does it
    bgr = small[:, :, ::-1].copy()
    pad = np.full((log[0][1]), 255, np.uint8)
    pad[:h, :w] = bgr
    res = _fake_networks([])("bg", pad)[:h, :w]
    crop_m, back_m = P.similarity_for_cv2(five(lm[0], bgr), P.reference_points())
    head_img = cv2.warpAffine(small, crop_m, (288, 288), borderValue=(255, 255, 255))
    head = _fake_networks([])("head", head_img[:, :, ::-1].copy())
    head_back = cv2.warpAffine(head, back_m, (w, h), borderValue=(0, 0, 0))
    mask = cv2.warpAffine(alpha, back_m, (w, h), borderValue=(0, 0, 0))[..., None]
    blended = mask * head_back + (1 - mask) * res
    final = cv2.resize(blended, (big.shape[1], big.shape[0]), interpolation=cv2.INTER_AREA)
    want = np.clip(np.rint(final), 0, 255).astype(np.uint8)[:, :, ::-1]
    assert np.array_equal(got, want)
    truncated = final.astype(np.uint8)[:, :, ::-1]  # the old cast: about half the values one level lower
    assert (got != truncated).mean() > 0.2


def test_full_float32_turns_tf32_off_and_restores_it():
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    conv.fp32_precision = "tf32"
    try:
        with P.full_float32():
            assert conv.fp32_precision == "ieee"
        assert conv.fp32_precision == "tf32"
        with pytest.raises(RuntimeError), P.full_float32():
            raise RuntimeError("a failing batch")
        assert conv.fp32_precision == "tf32"
    finally:
        conv.fp32_precision = before


def test_the_alpha_mask_is_prepared_as_modelscope_prepares_it(tmp_path):
    rng = np.random.default_rng(1)
    img = (rng.random((420, 420, 3)) * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "alpha.png"), img)
    want = cv2.cvtColor(cv2.resize(img, (288, 288), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2GRAY)
    assert np.array_equal(P.load_alpha(tmp_path / "alpha.png"), want.astype(np.float32) / 255)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="OpenCV"):
        P.load_alpha(tmp_path / "bad.png")


def test_no_face_leaves_the_background_network_alone():
    rgb = np.asarray(skdata.coffee())  # 400 x 600: no resizing
    bg = _fake_networks([])("bg", np.ascontiguousarray(rgb[:, :, ::-1]))
    alpha = np.ones((288, 288), np.float32)
    assert np.array_equal(P.cartoonize(rgb, _fake_networks([]), alpha, lambda img: []), bg[:, :, ::-1])


def test_the_dctnet_stylizer_feeds_each_network_its_bgr_image_in_full_float32(astronaut_landmarks):
    from PIL import Image

    from geneava.networks import stylizers

    rgb, lm = astronaut_landmarks  # 512 x 512: a multiple of 16, no padding, no resizing
    styler = stylizers.DCTNet("tiny", 0)
    styler._points = lambda img: [lm]
    calls = []
    for name, net in (("bg", styler.bg), ("head", styler.head)):
        net.register_forward_pre_hook(
            lambda m, a, name=name: calls.append(
                (name, a[0].clone(), torch.backends.cudnn.conv.fp32_precision)
            )
        )
    before = torch.backends.cudnn.conv.fp32_precision
    assert before != "ieee"
    out = styler.one(Image.fromarray(rgb))
    assert out.size == (512, 512) and [c[0] for c in calls] == ["bg", "head"]
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])

    def scaled(img):
        return torch.from_numpy(img.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]

    assert torch.equal(calls[0][1], scaled(bgr))
    crop_m, _ = P.similarity_for_cv2(P.five_points(lm, bgr), P.reference_points())
    crop = cv2.warpAffine(rgb, crop_m, (288, 288), borderValue=(255, 255, 255))
    assert torch.equal(calls[1][1], scaled(np.ascontiguousarray(crop[:, :, ::-1])))
    assert [c[2] for c in calls] == ["ieee", "ieee"] and torch.backends.cudnn.conv.fp32_precision == before
