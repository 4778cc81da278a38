import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd

from geneava.core import emo135
from geneava.world import dataset, standin


def test_layout_and_attributes(standin_root):
    folders = sorted(p.name for p in (standin_root / "emo135").iterdir())
    assert folders == sorted(emo135.names())
    assert all(len(list((standin_root / "emo135" / f).glob("*.png"))) == 3 for f in folders)
    attrs = pd.read_csv(standin_root / dataset.ATTRIBUTES_FILE)
    assert len(attrs) == 135 * 3
    assert all((standin_root / f).is_file() for f in attrs["file"])


def test_rendering_is_byte_identical(tmp_path):
    a = dataset.write_standin(tmp_path / "a", per_class=1)
    b = dataset.write_standin(tmp_path / "b", per_class=1)
    for f in sorted(a.rglob("*.png")):
        assert f.read_bytes() == (b / f.relative_to(a)).read_bytes()


def test_hard_cases_are_planted_in_every_class(tmp_path):
    root = dataset.write_standin(tmp_path, per_class=10).parent
    attrs = pd.read_csv(root / dataset.ATTRIBUTES_FILE, keep_default_na=False)
    classes = emo135.classes()
    kinds = attrs.groupby("hard_case").size()
    assert kinds["empty"] == kinds["pair"] == 135 and kinds["copy"] == len(range(0, 135, 9))
    empties = [(root / f).read_bytes() for f in attrs.loc[attrs["hard_case"] == "empty", "file"]]
    assert len(set(empties)) == 135  # no two alike: prepare must find no face, not a duplicate
    for c in classes[::9]:  # a copy is the previous class's next image, byte for byte
        prev = classes[c.index - 1].name
        copy = root / "emo135" / c.name / f"{c.name}_008.png"
        assert copy.read_bytes() == (root / "emo135" / prev / f"{prev}_009.png").read_bytes()


def test_classes_have_distinct_expressions():
    vectors = np.array([standin.class_expression(c) for c in emo135.classes()])
    assert len(np.unique(vectors.round(3), axis=0)) == 135
    # the primary category shows: joy smiles more than sadness on average
    prim = np.array([c.primary for c in emo135.classes()])
    assert vectors[prim == "joy", 0].mean() > vectors[prim == "sadness", 0].mean() + 0.5


def test_expression_changes_the_image():
    a = standin.sample_attributes(emo135.classes()[0], 0)
    happy = dict(a, mouth_curve=1.0, mouth_open=0.6)
    sad = dict(a, mouth_curve=-1.0, mouth_open=0.0)
    diff = np.abs(np.asarray(standin.render_face(happy), int) - np.asarray(standin.render_face(sad), int))
    assert diff.sum() > 0
    # only the lower face differs
    assert diff[: diff.shape[0] // 2].sum() == 0


def test_ensure_never_overwrites(tmp_path):
    real = tmp_path / "emo135" / "joy"
    real.mkdir(parents=True)
    (real / "mine.jpg").write_bytes(b"user data")
    assert dataset.main([str(tmp_path), "--ensure"]) == 0
    assert sorted(p.name for p in (tmp_path / "emo135").iterdir()) == ["joy"]
    assert (real / "mine.jpg").read_bytes() == b"user data"


def test_faces_leave_room_in_the_frame():
    """Every stand-in face's box keeps a tenth of the frame free on each side (the first world's filled
    0.88 of the height, and a fine-tuned model's pixel of drift put faces past QC's frame)."""
    boxes = np.array([standin.landmarks(standin.sample_attributes(c, i))[0] for c in emo135.classes()
                      for i in range(48)])  # fmt: skip
    assert boxes[:, :2].min() >= 0.1 and boxes[:, 2:].max() <= 0.9
    height = boxes[:, 3] - boxes[:, 1]
    assert 0.6 < height.mean() < 0.75  # still most of the frame: POSTER and ArcFace read the faces


def test_ensure_draws_a_standin_of_other_code_again(tmp_path, monkeypatch):
    """A checkout from before a drawing change (FACE_SCALE, say) keeps data/ from its own code: `ensure`
    sees from the marker that the stand-in is stale and draws it and the pairs again; a fresh one stays."""
    dataset.ensure(tmp_path, per_class=1)
    marker = json.loads((tmp_path / dataset.MARKER).read_text())
    assert marker == {"drawing": standin.drawing_fingerprint(), "per_class": 1, "size": standin.DEFAULT_SIZE}
    face, pair = tmp_path / "emo135/joy/joy_000.png", tmp_path / "pairs/identity/0000_a.png"
    drawn = face.read_bytes(), pair.read_bytes()
    for f in (face, pair):
        f.write_bytes(b"edited")
    dataset.ensure(tmp_path, per_class=1)
    assert face.read_bytes() == pair.read_bytes() == b"edited"  # fresh: left as it is
    monkeypatch.setattr(dataset, "drawing_fingerprint", lambda: "other code")
    dataset.ensure(tmp_path, per_class=1)
    assert (face.read_bytes(), pair.read_bytes()) == drawn
    assert json.loads((tmp_path / dataset.MARKER).read_text())["drawing"] == "other code"
    (tmp_path / dataset.MARKER).unlink()  # a stand-in from before markers, or a run killed before its marker
    face.write_bytes(b"edited")
    dataset.ensure(tmp_path, per_class=1)
    assert face.read_bytes() == drawn[0]
    dataset.ensure(tmp_path, per_class=2)  # other settings: drawn again too
    assert len(list((tmp_path / "emo135/joy").glob("*.png"))) == 2


def test_ensure_never_touches_real_data_beside_a_leftover_attributes_table(tmp_path):
    """prepare.md's recipe for real Emo135 replaces data/emo135 and may leave the stand-in's table."""
    dataset.ensure(tmp_path, per_class=1)
    (tmp_path / dataset.MARKER).unlink()  # as if drawn before markers: stale, were it the stand-in
    shutil.rmtree(tmp_path / "emo135")
    (tmp_path / "emo135" / "joy").mkdir(parents=True)
    (tmp_path / "emo135" / "joy" / "real.jpg").write_bytes(b"a real face")
    dataset.ensure(tmp_path, per_class=1)
    assert [p.name for p in (tmp_path / "emo135").rglob("*") if p.is_file()] == ["real.jpg"]
    assert not (tmp_path / dataset.MARKER).exists()


def test_people_carry_the_prompt_groups():
    rng = np.random.default_rng(0)
    person = standin.sample_identity(rng, race="Black", gender="male", age_group=6)
    assert (person["race"], person["gender"], person["age_group"]) == ("Black", "male", 6)
    skin = {
        r: np.mean(
            [
                sum(standin.sample_identity(rng, race=r)[k] for k in ("skin_r", "skin_g", "skin_b"))
                for _ in range(20)
            ]
        )
        for r in ("White", "Black")
    }
    assert skin["White"] > skin["Black"] + 200
    assert set(standin.IDENTITY_FIELDS) <= set(person)
    # the same person under two expressions differs only where the expression is drawn
    a = {**person, **standin._expression_dict(standin.coarse_expression("joy"))}
    b = {**person, **standin._expression_dict(standin.coarse_expression("anger"))}
    assert np.asarray(standin.render_face(a)).tolist() != np.asarray(standin.render_face(b)).tolist()
    assert np.asarray(standin.render_face(a)).tolist() == np.asarray(standin.render_face(dict(a))).tolist()


def test_the_module_is_the_command_make_repro_runs():
    """`make repro` runs `python -m geneava.world.dataset --ensure data`: the module must run main()
    (an edit once left it without its `__main__` guard, and a fresh clone drew nothing)."""
    out = subprocess.run(
        [sys.executable, "-m", "geneava.world.dataset", "--help"], capture_output=True, text=True, check=True
    )
    assert "--ensure" in out.stdout
