import pandas as pd
import pytest
from PIL import Image

from geneava import data
from geneava.io import sha256_file


def _images(n_classes=5, per_class=6):
    return pd.DataFrame(
        [
            {"source": f"c{c}/{i}.png", "expression": f"c{c}"}
            for c in range(n_classes)
            for i in range(per_class)
        ]
    )


def test_splits_are_balanced_disjoint_and_seeded():
    out = data.sample_splits(_images(), 2, 3, seed=0)
    counts = out[out.split != ""].groupby(["expression", "split"]).size().unstack()
    assert (counts["finetune"] == 2).all() and (counts["eval"] == 3).all()
    assert not set(out[out.split == "finetune"].source) & set(out[out.split == "eval"].source)
    again = data.sample_splits(_images(), 2, 3, seed=0)
    assert out["split"].tolist() == again["split"].tolist()
    other = data.sample_splits(_images(), 2, 3, seed=1)
    assert out["split"].tolist() != other["split"].tolist()


def test_adding_a_class_keeps_the_others_splits():
    small = data.sample_splits(_images(3), 1, 2, seed=0)
    extra = pd.DataFrame([{"source": f"a/{i}.png", "expression": "a-first"} for i in range(6)])
    big = data.sample_splits(pd.concat([extra, _images(3)], ignore_index=True), 1, 2, seed=0)
    assert small["split"].tolist() == big["split"].tolist()[len(extra) :]


def test_short_classes_are_reported_not_shrunk():
    images = _images()
    images = images[~((images.expression == "c3") & (images.index % 6 > 2))]
    with pytest.raises(data.DataError, match=r"c3 \(3\)"):
        data.sample_splits(images, 2, 3, seed=0)


def test_missing_or_empty_source(tmp_path):
    with pytest.raises(data.DataError, match="not a folder"):
        data.scan(tmp_path / "nope")
    with pytest.raises(data.DataError, match="no class sub-folders"):
        data.scan(tmp_path)


def test_prepare_writes_manifest_with_hashes(prepared):
    manifest = pd.read_csv(prepared / "data" / "manifest.csv", keep_default_na=False)
    assert manifest.groupby("split").size().to_dict() == {"eval": 24, "finetune": 12}
    for row in manifest.itertuples():
        path = prepared / "data" / row.file
        assert sha256_file(path) == row.sha256
        assert Image.open(path).size == (64, 64)
    ft = data.read_split(prepared, "finetune")
    assert len(ft) == 12 and all(ft["path"].map(lambda p: p.endswith(".png")))


def test_read_split_without_prepare(tmp_path):
    with pytest.raises(data.DataError, match="run the prepare stage"):
        data.read_split(tmp_path, "finetune")
