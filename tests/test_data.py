import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from geneava.core import images
from geneava.core.io import sha256_file
from geneava.networks.faces import face_detector, square_crop
from geneava.stages import prepare as data
from geneava.world import standin

from .conftest import CentreFace, WholeImage


def _face_png(i: int = 0, size: int = 64) -> bytes:
    buf = io.BytesIO()
    standin.render_face(standin.sample_attributes(standin.emo135.classes()[i % 135], i), size).save(
        buf, "PNG"
    )
    return buf.getvalue()


def _params(default, source, **over):
    return {**default["prepare"], "source": str(source), "classes": None, **over}


# ----------------------------------------------------------------- reading bad input


def _write(path: Path, kind: str) -> Path:
    face = Image.open(io.BytesIO(_face_png(1)))
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not an image")
    elif kind == "truncated":
        path.write_bytes(_face_png(1)[:300])
    elif kind == "corrupt":
        raw = bytearray(_face_png(1))
        raw[60:200] = os.urandom(140)
        path.write_bytes(bytes(raw))
    elif kind == "cmyk":
        face.convert("CMYK").save(path, "JPEG")
    elif kind == "16bit":
        a = (np.asarray(face.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        Image.fromarray(a).save(path)
    elif kind == "grey":
        face.convert("L").save(path)
    elif kind == "rgba":
        rgba = face.convert("RGBA")
        rgba.putalpha(0)  # fully transparent: must come out white, not black
        rgba.save(path)
    elif kind == "bomb":
        Image.new("1", (20_000, 20_000)).save(path)  # 400 Mpx, a few KB on disk
    elif kind == "exif":
        wide = Image.new("RGB", (80, 40), (200, 10, 10))
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90° on display
        wide.save(path, "JPEG", exif=exif)
    return path


@pytest.mark.parametrize(
    "kind, suffix, reason",
    [
        ("empty", ".png", "empty file"),
        ("text", ".jpg", "not an image"),
        ("truncated", ".png", "corrupt or truncated"),
        ("corrupt", ".png", "corrupt or truncated"),
        ("bomb", ".png", "too large"),
    ],
)
def test_unusable_files_get_a_reason(tmp_path, kind, suffix, reason):
    rgb, why = data.read_image(_write(tmp_path / f"x{suffix}", kind), max_pixels=89_478_485)
    assert rgb is None and why == reason


@pytest.mark.parametrize(
    "kind, suffix", [("cmyk", ".jpg"), ("16bit", ".png"), ("grey", ".png"), ("rgba", ".png")]
)
def test_unusual_formats_become_rgb(tmp_path, kind, suffix):
    rgb, why = data.read_image(_write(tmp_path / f"x{suffix}", kind), max_pixels=10**8)
    assert why == "" and rgb.dtype == np.uint8 and rgb.shape == (64, 64, 3)
    if kind == "16bit":
        assert rgb.max() > 200 and rgb.min() < 100  # rescaled, not clipped to white
    if kind == "rgba":
        assert (rgb == 255).all()


def test_exif_rotation_is_applied(tmp_path):
    rgb, _ = data.read_image(_write(tmp_path / "r.jpg", "exif"), max_pixels=10**8)
    assert rgb.shape[:2] == (80, 40)


def test_duplicates_within_and_across_classes():
    images = pd.DataFrame(
        {"expression": ["a", "a", "a", "b", "c"], "source_sha256": ["x", "x", "y", "z", "z"]}
    )
    assert data.mark_duplicates(images).tolist() == [
        "",
        "duplicate",
        "",
        "duplicate across classes",
        "duplicate across classes",
    ]


def test_missing_or_empty_source(tmp_path):
    with pytest.raises(data.DataError, match="not a folder"):
        data.scan(tmp_path / "nope")
    with pytest.raises(data.DataError, match="no class sub-folders"):
        data.scan(tmp_path)


def test_unreadable_folder_stops_with_its_path(tmp_path, monkeypatch):
    (tmp_path / "joy").mkdir()
    real = Path.iterdir

    def iterdir(self):
        if self.name == "joy":
            raise PermissionError("permission denied")
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(data.DataError, match="joy.*readable"):
        data.scan(tmp_path)


# ----------------------------------------------------------------- the stage on an Emo135-like folder


@pytest.fixture(scope="module")
def emo_like(tmp_path_factory):
    """3 classes x 60 good faces, plus bad files of every kind; names with spaces and unicode."""
    root = tmp_path_factory.mktemp("emo")
    src = root / "emo135"
    n = 0
    for name in ("delight", "rage", "sorrow"):
        folder = src / name
        folder.mkdir(parents=True)
        for i in range(60):
            n += 1
            (folder / f"img {i:02d} – ü.png").write_bytes(_face_png(n))
    for kind in ("empty", "text", "truncated", "cmyk", "bomb", "exif"):  # once: copies would be duplicates
        _write(src / "delight" / f"bad_{kind}.{'jpg' if kind in ('text', 'cmyk', 'exif') else 'png'}", kind)
    (src / "delight" / "dup_in_class.png").write_bytes((src / "delight" / "img 00 – ü.png").read_bytes())
    (src / "rage" / "shared.png").write_bytes(_face_png(999))
    (src / "sorrow" / "shared.png").write_bytes(_face_png(999))
    return root


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        h.update(str(f.relative_to(folder)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def test_paper_sized_splits_disjoint_reproducible_and_source_untouched(emo_like, default, tmp_path):
    before = _tree_hash(emo_like)
    p = _params(default, emo_like / "emo135", finetune_per_class=8, eval_per_class=50)
    a = data.prepare(p, tmp_path / "a", emo_like, detector=WholeImage())
    assert _tree_hash(emo_like) == before
    counts = a[a.split != ""].groupby(["expression", "split"]).size().unstack()
    assert (counts["finetune"] == 8).all() and (counts["eval"] == 50).all()
    assert not set(a[a.split == "finetune"].source) & set(a[a.split == "eval"].source)
    b = data.prepare(p, tmp_path / "b", emo_like, detector=WholeImage())
    assert a["status"].tolist() == b["status"].tolist()
    assert (tmp_path / "a/data/manifest.csv").read_bytes() == (tmp_path / "b/data/manifest.csv").read_bytes()
    c = data.prepare(dict(p, seed=1), tmp_path / "c", emo_like, detector=WholeImage())
    assert a["split"].tolist() != c["split"].tolist()
    for row in a[a.split != ""].itertuples():
        assert sha256_file(tmp_path / "a/data" / row.file) == row.sha256
        assert Image.open(tmp_path / "a/data" / row.file).size == (64, 64)


def test_every_file_has_a_row_and_bad_ones_a_reason(emo_like, default, tmp_path):
    # more than any class has: every file gets examined, and the stage refuses to shrink the splits
    p = _params(default, emo_like / "emo135", finetune_per_class=8, eval_per_class=60)
    with pytest.raises(data.DataError, match="too few"):
        data.prepare(p, tmp_path, emo_like, detector=WholeImage())
    m = pd.read_csv(tmp_path / "data/manifest.csv", keep_default_na=False).set_index("source")
    assert len(m) == sum(1 for f in (emo_like / "emo135").rglob("*") if f.is_file())
    status = {Path(s).name: v for s, v in m["status"].items() if "delight" in s or "shared" in s}
    assert status["bad_empty.png"] == "empty file"
    assert status["bad_text.jpg"] == "not an image"
    assert status["bad_truncated.png"] == "corrupt or truncated"
    assert status["bad_bomb.png"] == "too large"
    assert status["bad_cmyk.jpg"] in ("finetune", "eval")  # readable once converted
    assert status["bad_exif.jpg"] in ("finetune", "eval")
    pair = [status["dup_in_class.png"], status["img 00 – ü.png"]]
    assert sorted(pair)[0] == "duplicate" and sorted(pair)[1] in ("finetune", "eval")
    assert m.loc[m.index.str.endswith("shared.png"), "status"].eq("duplicate across classes").all()
    assert "not examined" not in set(m["status"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["detector"] == WholeImage.name
    assert report["watermark_filter"] == "none (not checked)"
    assert report["status"]["empty file"] == 1
    assert set(report["classes_missing_from_data"]) >= {"love", "anger"}  # a missing class is reported


def test_short_classes_are_reported_not_shrunk(emo_like, default, tmp_path):
    p = _params(default, emo_like / "emo135", finetune_per_class=8, eval_per_class=60)
    with pytest.raises(data.DataError, match=r"3 class\(es\) have too few"):
        data.prepare(p, tmp_path, emo_like, detector=WholeImage())
    assert json.loads((tmp_path / "report.json").read_text())["short_classes"]["rage"] == {
        "eval": 52,
        "finetune": 8,
    }


def test_watermarked_images_are_dropped(emo_like, default, tmp_path):
    class Everything:  # test double for the watermark classifier: everything looks watermarked
        name, threshold = "test double", 0.5

        def probability(self, rgb):
            return 0.9

    p = _params(default, emo_like / "emo135", classes=1, finetune_per_class=1, eval_per_class=1)
    with pytest.raises(data.DataError):
        data.prepare(p, tmp_path, emo_like, detector=WholeImage(), watermark=Everything())
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"]["watermark"] > 0 and report["watermark_filter"] == "test double"


def test_prepare_writes_manifest_for_the_fixture(prepared):
    ft = images.read_split(prepared, "finetune")
    assert len(ft) == 12 and all(ft["path"].map(lambda p: p.endswith(".png")))
    assert len(images.read_split(prepared, "eval")) == 24


def test_read_split_without_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the prepare stage"):
        images.read_split(tmp_path, "finetune")


# ----------------------------------------------------------------- real detection


@pytest.fixture(scope="module", params=["auto", "dlib"])
def detector(request):
    """`auto` without an insightface pack: the fetched RetinaFace (WIDER FACE); and dlib's MMOD."""
    return face_detector(request.param, root="/nonexistent")


def test_auto_takes_the_fetched_retinaface_then_dlib(monkeypatch, tmp_path):
    assert (
        face_detector("auto", root="/nonexistent").name == "retinaface-torch (retinaface-mobilenet0.25.pth)"
    )
    with pytest.raises(FileNotFoundError, match="buffalo_l"):
        face_detector("retinaface", root="/nonexistent")
    from geneava.networks import pretrained

    monkeypatch.setattr(pretrained, "folder", lambda: tmp_path)  # nothing fetched: dlib is the last resort
    assert face_detector("auto", root="/nonexistent").name == "dlib-mmod"


def test_one_face_on_the_astronaut(detector):
    import skimage.data

    faces = detector.detect(skimage.data.astronaut())
    assert len(faces) == 1
    x0, y0, x1, y1 = faces[0].box
    assert 150 < (x0 + x1) / 2 < 280 and 50 < (y0 + y1) / 2 < 180  # her face, upper middle
    assert len(faces[0].landmarks) == 5


def test_several_faces_on_insightfaces_group_photo(detector):
    import insightface

    path = Path(insightface.__file__).parent / "data/images/t1.jpg"
    group = np.asarray(Image.open(path).convert("RGB").resize((960, 664)))
    assert len(detector.detect(group)) == 6  # the six people in the photo


def test_no_face_in_an_empty_picture(detector):
    assert detector.detect(np.full((128, 128, 3), 236, np.uint8)) == []


def test_no_face_and_several_faces_are_dropped_with_their_reason(emo_like, default, tmp_path):
    class CountsByName:  # detector double keyed on image content: 0 faces for dark, 2 for bright images
        name = "counting double"

        def detect(self, rgb):
            mean = rgb.mean()
            n = 0 if mean < 150 else 2 if mean > 230 else 1
            return [WholeImage().detect(rgb)[0]] * n

    folder = emo_like.parent / "faces_case" / "emo135" / "delight"
    folder.mkdir(parents=True)
    for i, value in enumerate((40, 240, 200, 201, 202)):  # distinct bytes: no duplicates
        Image.new("RGB", (64, 64), (value, value, value)).save(folder / f"{i}.png")
    p = _params(default, folder.parent, finetune_per_class=1, eval_per_class=3)  # 4 > 3 usable: all examined
    with pytest.raises(data.DataError, match="delight"):
        data.prepare(p, tmp_path, folder.parent.parent, detector=CountsByName())
    m = pd.read_csv(tmp_path / "data/manifest.csv", keep_default_na=False)
    status = dict(zip(m["source"].map(lambda s: Path(s).name), m["status"], strict=True))
    assert status["0.png"] == "no face" and status["1.png"] == "several faces"
    assert sorted(status[f"{i}.png"] for i in (2, 3, 4)) == ["eval", "eval", "finetune"]


def test_crop_margin_null_keeps_the_whole_image_a_margin_crops_the_face(emo_like, default, tmp_path):
    p = _params(default, emo_like / "emo135", classes=1, finetune_per_class=4, eval_per_class=4)
    for margin in (None, 0.0):
        m = data.prepare(
            {**p, "crop_margin": margin}, tmp_path / str(margin), emo_like, detector=CentreFace()
        )
        rows = m[(m.split != "") & m.source.str.contains("img ")]
        assert len(rows) > 0
        for row in rows.itertuples():
            src = np.asarray(Image.open(emo_like / row.source).convert("RGB"))
            got = np.asarray(Image.open(tmp_path / str(margin) / "data" / row.file))
            expected = (
                src
                if margin is None
                else np.asarray(square_crop(src, CentreFace().detect(src)[0].box, 0.0, 64))
            )
            assert np.array_equal(got, expected)
            assert np.array_equal(got, src) == (margin is None)  # the margin-0 crop is the face, upscaled


# ----------------------------------------------------------------- hostile folders


@pytest.fixture
def hostile(tmp_path) -> Path:
    """An Emo135-layout folder with everything a real download or a user's copy can hold."""
    src = tmp_path / "src" / "emo135"
    for name in ("delight", "rage"):
        (src / name).mkdir(parents=True)
        for i in range(3):
            (src / name / f"face{i}.png").write_bytes(_face_png(10 * i + len(name)))
    d = src / "delight"
    Image.open(io.BytesIO(_face_png(40))).save(d / "x.png")
    for i, suffix in enumerate((".jpg", ".bmp", ".tif")):  # one stem, four images
        Image.open(io.BytesIO(_face_png(41 + i))).convert("RGB").save(d / f"x{suffix}")
    (d / "noextension").write_bytes(_face_png(45))  # an image without an extension
    (d / "looks-like.png").mkdir()  # a folder named like an image, with a file in it
    (d / "looks-like.png" / "inner.png").write_bytes(_face_png(43))
    (d / "loop").symlink_to(d / "loop")  # a symlink loop
    (d / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (d / ".DS_Store").write_bytes(b"\0\0")
    (src / "empty").mkdir()  # an empty class folder
    (src / "notes.txt").write_text("files outside any class")
    return src


def test_every_entry_of_a_hostile_folder_has_a_row_or_a_counted_ignore_rule(hostile, default, tmp_path):
    p = _params(default, hostile, finetune_per_class=1, eval_per_class=1)
    with pytest.raises(data.DataError, match=r"empty \(0\+0\)"):  # the empty class is short, and said so
        data.prepare(p, tmp_path / "out", tmp_path, detector=WholeImage())
    m = pd.read_csv(tmp_path / "out/data/manifest.csv", keep_default_na=False)
    status = {Path(s).name: v for s, v in zip(m["source"], m["status"], strict=True)}
    assert status["loop"] == "broken link" and status["dangling.png"] == "broken link"
    assert status["looks-like.png"] == "folder"
    assert status["noextension"] in {"finetune", "eval", "not examined"}  # read as the image it is
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["empty_classes"] == ["empty"]
    assert report["ignored"] == {"hidden": 1, "files_outside_classes": 1, "files_in_nested_folders": 1}
    entries = [e for c in hostile.iterdir() if c.is_dir() for e in c.iterdir() if not e.name.startswith(".")]
    assert len(m) == len(entries)  # every visible entry of every class folder: one row each


def test_two_files_with_one_stem_never_share_an_output(hostile, default, tmp_path):
    # delight: 8 images, 4 of them x.*: at least two x.* share a split, whatever the seeded order
    p = _params(default, hostile, classes=1, finetune_per_class=6, eval_per_class=2)
    m = data.prepare(p, tmp_path / "out", tmp_path, detector=WholeImage())
    used = m[m["split"] != ""]
    assert len(used) == 8 and used["file"].is_unique
    names = {Path(s).name: f for s, f in zip(used["source"], used["file"], strict=True)}
    assert len({names[f"x{s}"] for s in (".png", ".jpg", ".bmp", ".tif")}) == 4
    assert "noextension" in names  # read as the image it is, and used
    for row in used.itertuples():  # every crop on disk is the one its row describes
        assert sha256_file(tmp_path / "out/data" / row.file) == row.sha256
