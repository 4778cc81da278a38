"""DCT-Net's compound pipeline as ModelScope's `ImageCartoonPipeline` runs it, around our generators.

Written from the description of ModelScope's pipeline (pipelines/cv/image_cartoon_pipeline.py with
models/cv/cartoon/utils.py and mtcnn_pytorch/src/{align_trans,matlab_cp2tform}.py), checked against
values computed that way in tests/test_dctnet_pipeline.py:
1. the image's short side is brought to at most 720 px (INTER_AREA; the long side truncated);
2. the background network runs on it in BGR, padded with white to multiples of 16;
3. per face, five points from its 68 landmarks: each pupil (the darkest Otsu class inside the eye's
   polygon, equalised; the median of its pixel columns and rows), unless either eye's box leaves the
   image, then the mean of each eye's first five landmarks; the nose tip; the mouth corners;
4. the 288 px head crop: a similarity fitted by least squares from the reference points to the face
   points (MATLAB's cp2tform 'similarity', its mirrored candidate included), inverted for the crop;
5. the head network's output and the alpha mask are warped back and blended in floating point;
6. the blend is resized back to the input size in floating point and rounded once, when written.
The landmarks are dlib's (ModelScope uses its own detector); where no face is found, ModelScope returns
the background at working size, we resize it back so the avatar keeps its face's size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch

HEAD = 288  # the head network's crop, px
WORKING_SIDE = 720  # the short side the pipeline works at, at most
# The five reference points (eyes, nose tip, mouth corners) of the 96x112 MTCNN template, each shifted
# by (1, 1) as ModelScope's align_trans does and by 8 px in x to centre them in a 112x112 square.
REFERENCE_96X112 = np.array(
    [
        [30.29459953, 51.69630051],
        [65.53179932, 51.50139999],
        [48.02519989, 71.73660278],
        [33.54930115, 92.3655014],
        [62.72990036, 92.20410156],
    ]
)
REFERENCE_SQUARE = (REFERENCE_96X112 + 1.0) + np.array([8.0, 0.0])
RATIO = 0.75  # the face fills 3/4 of the crop about its centre


def working_size(h: int, w: int, side: int = WORKING_SIDE) -> tuple[int, int]:
    """(h, w) with the short side at most `side`; the other side truncated, as ModelScope's
    `resize_size` computes it (a square goes down to side x side)."""
    if min(h, w) <= side:
        return h, w
    return (int(side * h / w), side) if h > w else (side, int(side * w / h))


def reference_points(size: int = HEAD, ratio: float = RATIO) -> np.ndarray:
    """The reference points in a size x size crop, computed in float32 as ModelScope does."""
    ref = REFERENCE_SQUARE.astype(np.float32)
    ref = (ref - np.float32(56)) * np.float32(ratio) + np.float32(56)
    return ref * np.float32(size / 112.0)


def _fit_nonreflective(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The least-squares similarity (scale, rotation, shift) mapping src -> dst, as a 3x3 matrix for
    row vectors: [x', y', 1] = [x, y, 1] @ M."""
    x, y = src[:, :1], src[:, 1:]
    one, zero = np.ones_like(x), np.zeros_like(x)
    design = np.vstack([np.hstack([x, y, one, zero]), np.hstack([y, -x, zero, one])])
    if np.linalg.matrix_rank(design) < 4:
        raise ValueError("the face points are degenerate: a similarity needs two distinct points")
    target = np.concatenate([dst[:, 0], dst[:, 1]])
    a, b, tx, ty = np.linalg.lstsq(design, target, rcond=None)[0]
    return np.array([[a, -b, 0.0], [b, a, 0.0], [tx, ty, 1.0]])


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return (np.hstack([pts, np.ones((len(pts), 1))]) @ m)[:, :2]


def similarity_for_cv2(face: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(crop, back): 2x3 matrices for cv2.warpAffine from the face points to the reference points and
    back, as MATLAB's cp2tform 'similarity' (ModelScope's port) finds them. The fit runs from the
    reference to the face (the inverse of what one might fit), on float32-rounded points. A mirrored
    candidate is fitted too; ModelScope's port measures both candidates against the mirrored reference
    points (it mirrors its argument in place before measuring), so that is what decides here too."""
    face = np.asarray(face, dtype=np.float32).astype(np.float64)
    ref = np.asarray(ref, dtype=np.float32).astype(np.float64)
    mirror = np.diag([-1.0, 1.0, 1.0])
    plain_back = _fit_nonreflective(ref, face)
    plain = np.linalg.inv(plain_back)
    plain[:, 2] = (0.0, 0.0, 1.0)
    mirrored_ref = ref * (-1.0, 1.0)
    flipped = np.linalg.inv(_fit_nonreflective(mirrored_ref, face))
    flipped[:, 2] = (0.0, 0.0, 1.0)
    flipped = flipped @ mirror
    errors = [np.linalg.norm(_apply(m, face) - mirrored_ref) for m in (plain, flipped)]
    crop, back = (plain, plain_back) if errors[0] <= errors[1] else (flipped, np.linalg.inv(flipped))
    return crop[:, :2].T.copy(), back[:, :2].T.copy()


def find_pupil(eye: np.ndarray, bgr: np.ndarray) -> tuple[float, float] | None:
    """The pupil inside an eye's landmark polygon: the pixels of the darker Otsu class of the equalised
    grey eye box, their median column and median row (upper median). None when the box is empty or
    leaves the image; the box centre when no pixel is dark."""
    import cv2

    h, w = bgr.shape[:2]
    xmin, xmax = int(eye[:, 0].min()), int(eye[:, 0].max())
    ymin, ymax = int(eye[:, 1].min()), int(eye[:, 1].max())
    if ymin >= ymax or xmin >= xmax or ymin < 0 or xmin < 0 or ymax > h or xmax > w:
        return None
    grey = cv2.equalizeHist(cv2.cvtColor(np.ascontiguousarray(bgr[ymin:ymax, xmin:xmax]), cv2.COLOR_BGR2GRAY))
    polygon = (eye - np.array([xmin, ymin])).astype(np.int32)
    inside = cv2.fillConvexPoly(np.zeros_like(grey), polygon, 1)
    _, bright = cv2.threshold(grey, 100, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    rows, cols = np.nonzero((bright == 0) & (inside > 0))
    if len(rows) == 0:
        return grey.shape[1] / 2 + xmin, grey.shape[0] / 2 + ymin
    mid = len(rows) // 2
    return float(np.sort(cols)[mid] + xmin), float(np.sort(rows)[mid] + ymin)


def five_points(landmarks: np.ndarray, bgr: np.ndarray) -> np.ndarray:
    """Left pupil, right pupil, nose tip, left and right mouth corner from 68 landmarks (iBUG order).
    The eyes use landmarks 36-40 and 42-46 (the first five of each eye's six), as ModelScope does."""
    left, right = landmarks[36:41], landmarks[42:47]
    pupils = find_pupil(left, bgr), find_pupil(right, bgr)
    if pupils[0] is None or pupils[1] is None:
        pupils = left.mean(0), right.mean(0)
    return np.array([pupils[0], pupils[1], landmarks[30], landmarks[48], landmarks[54]], dtype=np.float64)


def landmarks68() -> Callable[[np.ndarray], list[np.ndarray]]:
    """A function rgb -> [68x2 landmarks per face]: dlib's MMOD detector and its 68-point model."""
    import dlib

    from geneava.networks.faces import DlibDetector, dlib_model_dir

    detector = DlibDetector()
    predictor = dlib.shape_predictor(str(dlib_model_dir() / "shape_predictor_68_face_landmarks.dat"))

    def points(rgb: np.ndarray) -> list[np.ndarray]:
        img, scale, found = detector.shapes(rgb)
        out = []
        for det, _ in found:
            s = predictor(img, det.rect)
            out.append(np.array([(s.part(i).x, s.part(i).y) for i in range(68)], dtype=np.float64) / scale)
        return out

    return points


@contextlib.contextmanager
def full_float32():
    """cuDNN convolutions in full float32 (no TF32) while inside: TF32, on by default for cuDNN, moves
    about 3% of the avatar's values by one level. Restored on exit."""
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision = before


def cartoonize(
    rgb: np.ndarray,
    run: Callable[[str, np.ndarray], np.ndarray],
    alpha: np.ndarray,
    landmarks: Callable[[np.ndarray], list[np.ndarray]],
) -> np.ndarray:
    """The avatar (uint8 RGB, the input's size) of an RGB uint8 image. `run(net, bgr)` runs the
    background ("bg") or head ("head") network on a BGR uint8 image and returns BGR uint8; `alpha` is
    the head's blending mask (HEAD x HEAD, float32 in [0, 1])."""
    import cv2

    h0, w0 = rgb.shape[:2]
    h, w = working_size(h0, w0)
    rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA) if (h, w) != (h0, w0) else rgb
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    padded = np.full((-(-h // 16) * 16, -(-w // 16) * 16, 3), 255, np.uint8)
    padded[:h, :w] = bgr
    res = run("bg", padded)[:h, :w].astype(np.float32)
    ref = reference_points()
    for face in landmarks(rgb):
        crop_m, back_m = similarity_for_cv2(five_points(face, bgr), ref)  # full rank: the reference's
        crop = cv2.warpAffine(rgb, crop_m, (HEAD, HEAD), borderValue=(255, 255, 255))
        head = run("head", np.ascontiguousarray(crop[:, :, ::-1]))
        head_back = cv2.warpAffine(head, back_m, (w, h), borderValue=(0, 0, 0))
        mask = cv2.warpAffine(alpha, back_m, (w, h), borderValue=0)[..., None]
        res = mask * head_back + (1 - mask) * res
    if (h, w) != (h0, w0):
        res = cv2.resize(res, (w0, h0), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(np.clip(np.rint(res), 0, 255).astype(np.uint8)[:, :, ::-1])


def load_alpha(path) -> np.ndarray:
    """The blending mask as ModelScope prepares it: read as a colour image, INTER_AREA to HEAD x HEAD,
    then grey, / 255 (a grey file reads as three equal channels, so it works for either)."""
    import cv2

    mask = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if mask is None:
        raise ValueError(f"{path}: not an image OpenCV can read")
    mask = cv2.resize(mask, (HEAD, HEAD), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(mask, cv2.COLOR_BGR2GRAY).astype(np.float32) / 255.0
