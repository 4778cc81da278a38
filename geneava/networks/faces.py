"""Face detection and cropping (paper: "detect and crop faces with RetinaFace").

Two real detectors behind one interface, `detect(rgb) -> list[Face]`:
- `retinaface`: RetinaFace through insightface's FaceAnalysis, with the model pack read from a local
  folder (`<root>/models/<pack>`, e.g. ~/.insightface/models/buffalo_l); what the paper used.
- `dlib`: dlib's MMOD CNN face detector plus its 5-point landmark model, whose weights ship inside the
  `face-recognition-models` wheel: a real detector that runs offline.
- a RetinaFace checkpoint (`.safetensors`, `.pth`) or `tiny`: `geneava.networks.retinaface`, the same
  network in PyTorch. Setup fetches the real one trained on WIDER FACE
  (`models/pretrained/retinaface-mobilenet0.25.pth`, geneava.networks.pretrained); the default profile uses
  the one the world stage trained on its faces (dlib's MMOD, a detector of real photos, missed 45% of the
  world's generated Black faces and 5% of White ones).
`auto` takes insightface's RetinaFace when its pack is present, else the fetched PyTorch RetinaFace, else
dlib; the detector's `name` says which ran and the stages report it.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from geneava.core import config, schema

log = logging.getLogger(__name__)

DETECTORS = schema.DETECTORS  # the names validation accepts; face_detector builds each
PRETRAINED_RETINAFACE = "retinaface-mobilenet0.25.pth"  # `auto`'s second choice (geneava.networks.pretrained)


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    score: float
    landmarks: tuple[tuple[float, float], ...] | None = None  # 5 points where the detector gives them


def dlib_model_dir() -> Path:
    """dlib's model files, located without importing face_recognition_models (it needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise RuntimeError("dlib's face models are missing: pip install face-recognition-models")
    return Path(spec.origin).parent / "models"


class DlibDetector:
    """dlib's MMOD CNN detector (+ 5-point landmarks); weights from the face-recognition-models wheel."""

    name = "dlib-mmod"

    def __init__(self, upsample: int = 0, min_size: int = 128):
        import dlib

        models = dlib_model_dir()
        self._cnn = dlib.cnn_face_detection_model_v1(str(models / "mmod_human_face_detector.dat"))
        self._shape = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self._dlib = dlib
        self.upsample, self.min_size = upsample, min_size

    def shapes(self, rgb: np.ndarray) -> tuple[np.ndarray, float, list]:
        """(the image as searched, its scale, [(detection, 5-point shape)]): MMOD finds faces of ~80 px
        and up, so small images are enlarged to `min_size` first."""
        scale = max(1.0, self.min_size / min(rgb.shape[:2]))
        img = rgb
        if scale > 1:
            h, w = rgb.shape[:2]
            img = np.asarray(Image.fromarray(rgb).resize((round(w * scale), round(h * scale)), Image.BICUBIC))
        img = np.ascontiguousarray(img)
        return img, scale, [(det, self._shape(img, det.rect)) for det in self._cnn(img, self.upsample)]

    def detect(self, rgb: np.ndarray) -> list[Face]:
        _, scale, found = self.shapes(rgb)
        faces = []
        for det, shape in found:
            r = det.rect
            pts = tuple((shape.part(i).x / scale, shape.part(i).y / scale) for i in range(shape.num_parts))
            faces.append(
                Face(
                    (r.left() / scale, r.top() / scale, r.right() / scale, r.bottom() / scale),
                    float(det.confidence),
                    pts,
                )
            )
        return faces


class RetinaFaceDetector:
    """RetinaFace from a local insightface model pack (never downloaded)."""

    name = "retinaface"

    def __init__(
        self,
        root: str = "~/.insightface",
        pack: str = "buffalo_l",
        det_size: int = 640,
        threshold: float = 0.5,
    ):
        pack_dir = Path(root).expanduser() / "models" / pack
        if not any(pack_dir.glob("det_*.onnx")):
            raise FileNotFoundError(
                f"no RetinaFace model in {pack_dir} (expected det_*.onnx). Unpack insightface's "
                f"'{pack}' pack there and set detector.<profile>.detector_root, or use detector: dlib."
            )
        from insightface.app import FaceAnalysis

        self._app = FaceAnalysis(
            name=pack,
            root=str(Path(root).expanduser()),
            allowed_modules=["detection"],
            providers=["CPUExecutionProvider"],
        )
        self._app.prepare(ctx_id=-1, det_thresh=threshold, det_size=(det_size, det_size))

    def detect(self, rgb: np.ndarray) -> list[Face]:
        faces = self._app.get(np.ascontiguousarray(rgb[:, :, ::-1]))  # insightface expects BGR
        return [
            Face(
                tuple(float(v) for v in f.bbox),
                float(f.det_score),
                tuple((float(x), float(y)) for x, y in f.kps) if f.kps is not None else None,
            )
            for f in faces
        ]


class TorchRetinaFace:
    """RetinaFace in PyTorch (`geneava.networks.retinaface`): a checkpoint (the world's, trained on its
    procedural faces, or the PyTorch port's mobilenet0.25_Final.pth) or `tiny` (seeded, untrained)."""

    def __init__(self, source: str, threshold: float = 0.5):
        from geneava.networks import retinaface

        self._retinaface = retinaface
        self.model = retinaface.tiny() if source == "tiny" else retinaface.load(source)
        self.threshold = threshold
        self.name = f"retinaface-torch ({Path(source).name})"

    def detect(self, rgb: np.ndarray) -> list[Face]:
        found = self._retinaface.detect(self.model, np.asarray(rgb, dtype=np.uint8), self.threshold)
        return [Face(box, score, points) for box, score, points in found]


def face_detector(
    name: str = "auto", root: str = "~/.insightface", pack: str = "buffalo_l", threshold: float = 0.5
):
    """The detector the params ask for; `auto` is insightface's RetinaFace pack, else the fetched PyTorch
    RetinaFace (WIDER FACE), else dlib, saying why it fell back; `tiny` or a .safetensors/.pth
    checkpoint is our PyTorch RetinaFace. `threshold` is RetinaFace's
    minimum face score (insightface's default 0.5); dlib's MMOD keeps its own rule. Paths mean the
    project root's (config.path), wherever the process runs."""
    root = str(config.path(root))
    if schema.torch_retinaface(name):
        name = config.source(name)
        return TorchRetinaFace(name, threshold)
    if name not in DETECTORS:
        raise ValueError(
            f"unknown detector '{name}' (known: {', '.join(DETECTORS)}, tiny, or a RetinaFace checkpoint)"
        )
    if name in ("auto", "retinaface"):
        try:
            return RetinaFaceDetector(root, pack, threshold=threshold)
        except FileNotFoundError as e:
            if name == "retinaface":
                raise
            reason = e
        from geneava.networks import pretrained

        try:
            fetched = pretrained.path(PRETRAINED_RETINAFACE)  # altered: RuntimeError, not a fallback
        except FileNotFoundError as e:
            log.warning("no RetinaFace (%s; %s): using dlib's MMOD detector instead", reason, e)
            return DlibDetector()
        log.warning("no insightface RetinaFace pack (%s): using the fetched PyTorch RetinaFace", reason)
        return TorchRetinaFace(str(fetched), threshold)
    return DlibDetector()


def square_crop(
    rgb: np.ndarray, box: tuple[float, float, float, float], margin: float | None, size: int
) -> Image.Image:
    """A square crop centred on the face box, enlarged by `margin` on each side, edge-padded where it
    leaves the image, resized to `size`. `margin=None` keeps the whole image (resized only if it is not
    `size` square already): for images already framed as the generator draws faces."""
    if margin is None:
        img = Image.fromarray(rgb)
        return img if img.size == (size, size) else img.resize((size, size), Image.Resampling.LANCZOS)
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = round(cx - side / 2), round(cy - side / 2)
    side = max(1, round(side))
    h, w = rgb.shape[:2]
    pad = max(0, -left, -top, left + side - w, top + side - h)
    if pad:
        rgb = np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
        left, top = left + pad, top + pad
    crop = Image.fromarray(rgb[top : top + side, left : left + side])
    return crop.resize((size, size), Image.Resampling.LANCZOS)
