"""Face identity embeddings, nearest-neighbour search and verification thresholds (paper, "Identity
memorization").

Two real identity models behind one interface, `embed(rgb) -> (vector, face_found)`:
- `arcface`: insightface's ArcFace (w600k_r50 in the `buffalo_l` pack) with its RetinaFace, read from a
  local model folder; what the paper used. Cosine similarity; the paper's threshold 0.68.
- `dlib`: dlib's ResNet 128-d face descriptor with its MMOD detector and 5-point alignment, whose weights
  ship in the `face-recognition-models` wheel: an LFW-grade identity model that runs offline. Its own
  rule is Euclidean distance < 0.6.
`auto` takes ArcFace when its models are present and dlib otherwise; reports say which ran. An image in
which no face is found is embedded whole (as an aligned chip) and flagged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from geneava.faces import DlibDetector, dlib_model_dir

log = logging.getLogger(__name__)

IDENTITY_MODELS = ("auto", "arcface", "dlib")


class DlibIdentity:
    name = "dlib-resnet-128"
    own_rule = ("euclidean", 0.6)  # dlib: same person when the distance is below 0.6

    def __init__(self):
        import dlib

        self._detector = DlibDetector()
        self._rec = dlib.face_recognition_model_v1(
            str(dlib_model_dir() / "dlib_face_recognition_resnet_model_v1.dat")
        )

    def embed(self, rgb: np.ndarray) -> tuple[np.ndarray, bool]:
        img, _, found = self._detector.shapes(rgb)
        if found:
            det, shape = max(found, key=lambda f: f[0].rect.area())
            return np.asarray(self._rec.compute_face_descriptor(img, shape)), True
        chip = np.ascontiguousarray(Image.fromarray(rgb).resize((150, 150), Image.Resampling.BICUBIC))
        return np.asarray(self._rec.compute_face_descriptor(chip)), False


class ArcFaceIdentity:
    own_rule = None  # ArcFace has no rule of its own here: the paper's cosine threshold applies

    def __init__(self, root: str = "~/.insightface", pack: str = "buffalo_l"):
        root_dir = Path(root).expanduser()
        pack_dir = root_dir / "models" / pack
        if not any(pack_dir.glob("det_*.onnx")) or not any(pack_dir.glob("w600k*.onnx")):
            raise FileNotFoundError(
                f"no ArcFace + RetinaFace models in {pack_dir} (expected det_*.onnx and w600k*.onnx). "
                f"Unpack insightface's '{pack}' pack there and set memorization.<profile>.identity_root, "
                "or use identity: dlib."
            )
        from insightface.app import FaceAnalysis

        self._app = FaceAnalysis(
            name=pack,
            root=str(root_dir),
            allowed_modules=["detection", "recognition"],
            providers=["CPUExecutionProvider"],
        )
        self._app.prepare(ctx_id=-1, det_size=(640, 640))
        self.name = f"arcface ({pack})"

    def embed(self, rgb: np.ndarray) -> tuple[np.ndarray, bool]:
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        faces = self._app.get(bgr)
        if faces:
            f = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
            return np.asarray(f.normed_embedding), True
        chip = np.asarray(Image.fromarray(rgb).resize((112, 112), Image.Resampling.BICUBIC))[:, :, ::-1]
        return self._app.models["recognition"].get_feat(np.ascontiguousarray(chip)).ravel(), False


def identity_model(name: str = "auto", root: str = "~/.insightface", pack: str = "buffalo_l"):
    """The identity model the params ask for; `auto` falls back to dlib (and says why) without ArcFace."""
    if name not in IDENTITY_MODELS:
        raise ValueError(f"unknown identity model '{name}' (known: {', '.join(IDENTITY_MODELS)})")
    if name in ("auto", "arcface"):
        try:
            return ArcFaceIdentity(root, pack)
        except FileNotFoundError as e:
            if name == "arcface":
                raise
            log.warning("ArcFace unavailable, using dlib's 128-d face descriptor instead: %s", e)
    return DlibIdentity()


def embed_files(model, paths: list[str], desc: str = "identity") -> dict[str, torch.Tensor]:
    """Identity embeddings of image files (float32) and whether a face was found in each."""
    from geneava.data import load_rgb

    vecs, found = [], []
    for p in tqdm(paths, desc=f"embed {desc}", unit="img"):
        v, ok = model.embed(np.asarray(load_rgb(Path(p))))
        vecs.append(v)
        found.append(ok)
    dim = len(vecs[0]) if vecs else 0
    return {
        "embedding": torch.from_numpy(np.asarray(vecs, dtype=np.float32).reshape(len(vecs), dim)),
        "face_found": torch.tensor(found, dtype=torch.bool),
    }


# ------------------------------------------------------------------ nearest neighbours


def nearest(
    queries: torch.Tensor, reference: torch.Tensor, metric: str = "cosine", block: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query, its nearest reference: (similarity or distance, index).

    A matrix product over blocks of queries *and* references, keeping a running best, so memory is
    block x block whatever the sizes (13,230 x 10,177 takes a fraction of a second)."""
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"unknown metric '{metric}'")
    if len(reference) == 0:
        raise ValueError("the reference set is empty")
    cosine = metric == "cosine"
    q, r = queries.double(), reference.double()
    if cosine:
        q, r = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(r, dim=1)
    best = torch.full((len(q),), -np.inf if cosine else np.inf, dtype=torch.float64)
    arg = torch.zeros(len(q), dtype=torch.long)
    r_sq = (r * r).sum(1)
    for i in range(0, len(q), block):
        qb = q[i : i + block]
        q_sq = (qb * qb).sum(1)
        for j in range(0, len(r), block):
            prod = qb @ r[j : j + block].T
            if cosine:
                val, idx = prod.max(1)
                better = val > best[i : i + block]
            else:
                d = (q_sq[:, None] + r_sq[None, j : j + block] - 2 * prod).clamp_min(0).sqrt()
                val, idx = d.min(1)
                better = val < best[i : i + block]
            best[i : i + block] = torch.where(better, val, best[i : i + block])
            arg[i : i + block] = torch.where(better, idx + j, arg[i : i + block])
    return best, arg


# ------------------------------------------------------------------ thresholds


def _entropy(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return np.nan_to_num(h)


def gain_ratio_threshold(
    scores: np.ndarray, same: np.ndarray, higher_is_same: bool = True
) -> tuple[float, float]:
    """The C4.5 split (as LightFace / deepface's `find_threshold` use): over every observed score t, the
    split "same identity when score >= t" (or <= t for a distance) with the best information-gain ratio,
    among splits whose "same" side holds the larger share of same-identity pairs.
    Returns (t, gain ratio). Vectorised over all candidates."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(same, dtype=bool)
    if len(s) != len(y) or len(s) < 2 or y.all() or not y.any():
        raise ValueError("need labelled pairs of both kinds (same and different identity)")
    order = np.argsort(-s if higher_is_same else s, kind="stable")
    s, y = s[order], y[order]
    n = len(s)
    # candidate k: the first k pairs (best scores) are called "same"; only where the score changes
    k = np.flatnonzero(np.r_[s[1:] != s[:-1], True]) + 1
    k = k[k < n]
    if len(k) == 0:
        raise ValueError("every pair has the same score: no split")
    pos_left = np.cumsum(y)[k - 1]
    left, right = k, n - k
    # C4.5 itself would also take an inverted split; a verification threshold must call "same" the side
    # where same-identity pairs are more frequent
    keep = pos_left / left > (y.sum() - pos_left) / right
    if not keep.any():
        raise ValueError(
            "no threshold separates the pairs in the right direction: different-identity pairs score as "
            "high as same-identity ones (the model does not tell these identities apart)"
        )
    k, pos_left, left, right = k[keep], pos_left[keep], left[keep], right[keep]
    h_parent = _entropy(np.array([y.mean()]))[0]
    h_split = (left / n) * _entropy(pos_left / left) + (right / n) * _entropy((y.sum() - pos_left) / right)
    split_info = _entropy(left / n)
    ratio = (h_parent - h_split) / split_info
    best = int(np.argmax(ratio))
    return float(s[k[best] - 1]), float(ratio[best])


def verdicts(similarity: torch.Tensor, threshold: float) -> dict[str, torch.Tensor]:
    """Same-identity calls under both readings of one number (../shared/PAPER.md):
    the paper's (cosine similarity > t) and deepface's (cosine distance <= t, i.e. similarity >= 1 - t)."""
    return {"paper": similarity > threshold, "deepface": similarity >= 1 - threshold}
