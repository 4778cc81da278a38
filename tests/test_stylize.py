"""Stylizers keep size, position and a clean background; preservation scores can fail."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from geneava import identity, models, stylize
from tests.conftest import write_generated


def _portrait(face: Image.Image, size: int = 256, at: tuple[int, int] = (48, 40)) -> Image.Image:
    """A face pasted on a plain white background, as the generated images are."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    img.paste(face.resize((160, 160)), at)
    return img


@pytest.mark.parametrize("name", ["cartoon", "dctnet"])
def test_stylizers_keep_size_position_and_a_clean_background(people, name, default):
    params = dict(default["stylize"], stylizer=name)
    styler = stylize.stylizer(params, default["models"], default["prompts"])
    src = _portrait(people[0])
    out = styler.stylize([src], pd.DataFrame({"expression": ["joy"], "seed_used": [1]}))[0]
    assert out.size == src.size
    a, b = np.asarray(src, dtype=float), np.asarray(out, dtype=float)
    if name == "cartoon":  # a real stylizer, not a pass-through: fewer colours, visibly changed
        assert len(np.unique(b.reshape(-1, 3), axis=0)) < len(np.unique(a.reshape(-1, 3), axis=0)) / 4
        assert np.abs(a - b).mean() > 2
        corner = b[:32, :32]  # the background stays one flat colour, close to white
        assert corner.std() < 1 and corner.mean() > 235

        # the face stays where it was: the non-background area's centroid moves by < 2 px
        def centroid(x):
            ys, xs = np.nonzero(np.abs(x - x[0, 0]).sum(-1) > 30)
            return np.array([ys.mean(), xs.mean()])

        assert np.abs(centroid(a) - centroid(b)).max() < 2


def test_passthrough_scores_perfect_preservation_and_a_shuffle_scores_badly(people, tmp_path, default):
    faces = [_portrait(p) for p in people]
    real = [tmp_path / f"real_{i}.png" for i in range(len(faces))]
    for f, p in zip(faces, real, strict=True):
        f.save(p)
    id_model = identity.DlibIdentity()
    encoder = models.expression_encoder("tiny", 0)
    same = stylize.preservation(real, real, id_model, encoder, 0.68)
    assert same["identity_similarity"].min() == pytest.approx(1.0)
    assert same["expression_distance"].max() == pytest.approx(0.0, abs=1e-6)
    assert same["identity_kept"].all() and same["expression_agrees"].all() and not same["flagged"].any()
    shuffled = stylize.preservation(real, real[1:] + real[:1], id_model, encoder, 0.68)
    assert not shuffled["identity_kept"].any()  # every avatar now shows someone else
    assert shuffled["flagged"].all()
    assert shuffled["identity_similarity"].mean() < same["identity_similarity"].mean() - 0.05
    assert shuffled["expression_distance"].mean() > 0


def test_the_stage_pairs_every_face_with_its_avatar_and_resumes(people, tmp_path, default, monkeypatch):
    gen = write_generated(
        tmp_path / "generate", [_portrait(p) for p in people[:3]], "joy", ["no face", "pass", "pass"]
    )
    params = dict(default["stylize"], include="all")
    pairs = stylize.stylize(default["models"], default["prompts"], params, gen, tmp_path / "out")
    assert len(pairs) == 3 and pairs["row_id"].is_unique
    for r in pairs.itertuples():
        assert (gen / r.realistic).is_file() and (tmp_path / "out" / r.avatar).is_file()
        assert Image.open(tmp_path / "out" / r.avatar).size == Image.open(gen / r.realistic).size
    # a rerun does nothing: every avatar has its record
    monkeypatch.setattr(
        stylize.Cartoon, "stylize", lambda *a: (_ for _ in ()).throw(AssertionError("redone"))
    )
    again = stylize.stylize(default["models"], default["prompts"], params, gen, tmp_path / "out")
    assert again.equals(pairs)
    kept = stylize.stylize(
        default["models"],
        default["prompts"],
        dict(params, include="kept", stylizer="passthrough"),
        gen,
        tmp_path / "out2",
    )
    assert kept["row_id"].tolist() == ["joy|1", "joy|2"]


def test_sdxl_img2img_stylizer_runs_through_diffusers(default):
    params = dict(default["stylize"], stylizer="sdxl_img2img", steps=2)
    styler = stylize.stylizer(params, default["models"], default["prompts"])
    src = [Image.new("RGB", (64, 64), (255, 255, 255)), Image.new("RGB", (64, 64), (200, 180, 160))]
    rows = pd.DataFrame({"expression": ["joy", "awe"], "seed_used": [1, 2]})
    out = styler.stylize(src, rows)
    assert [o.size for o in out] == [(64, 64), (64, 64)]
    again = styler.stylize(src, rows)  # seeded per row: the same avatars again
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out, again, strict=True))
