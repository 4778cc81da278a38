"""Stylizers keep size, position and a clean background; preservation scores can fail."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from geneava.core import config
from geneava.networks import identity, models, stylizers
from geneava.stages import stylize
from tests.conftest import assert_ignored_never_read, kill_when, tree_files, write_generated


def _portrait(face: Image.Image, size: int = 256, at: tuple[int, int] = (48, 40)) -> Image.Image:
    """A face pasted on a plain white background, as the generated images are."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    img.paste(face.resize((160, 160)), at)
    return img


@pytest.mark.parametrize("name", ["cartoon", "dctnet"])
def test_stylizers_keep_size_position_and_a_clean_background(people, name, default):
    params = dict(default["stylize"], stylizer=name)
    styler = stylizers.stylizer(params, default["models"], default["prompts"])
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
        stylizers.Cartoon, "stylize", lambda *a: (_ for _ in ()).throw(AssertionError("redone"))
    )
    again = stylize.stylize(default["models"], default["prompts"], params, gen, tmp_path / "out")
    assert again.equals(pairs)
    # a new revision of the stylizer's code redoes the avatars instead of resuming old ones
    monkeypatch.setitem(stylizers.REVISION, "cartoon", stylizers.REVISION["cartoon"] + 1)
    with pytest.raises(AssertionError, match="redone"):
        stylize.stylize(default["models"], default["prompts"], params, gen, tmp_path / "out")
    kept = stylize.stylize(
        default["models"],
        default["prompts"],
        dict(params, include="kept", stylizer="passthrough"),
        gen,
        tmp_path / "out2",
    )
    assert kept["row_id"].tolist() == ["joy|1", "joy|2"]


def test_a_face_rendered_again_gets_a_new_avatar(people, tmp_path, default, monkeypatch):
    faces = [_portrait(p) for p in people[:2]]
    gen = write_generated(tmp_path / "generate", faces, "joy")
    params = dict(default["stylize"], include="all", stylizer="passthrough")
    first = stylize.stylize(default["models"], default["prompts"], params, gen, tmp_path / "out")
    # the generate stage renders row 1 again (a retrained base model): same file name, other pixels
    write_generated(tmp_path / "generate", [faces[0], _portrait(people[2])], "joy")
    calls = []
    real = stylizers.Passthrough.stylize
    monkeypatch.setattr(
        stylizers.Passthrough, "stylize", lambda self, im, m: calls.append(len(im)) or real(self, im, m)
    )
    again = stylize.stylize(default["models"], default["prompts"], params, gen, tmp_path / "out")
    assert calls == [1]  # row 0 resumed, row 1 redone
    assert again["avatar_sha256"][0] == first["avatar_sha256"][0]
    assert again["avatar_sha256"][1] != first["avatar_sha256"][1]
    same = np.asarray(Image.open(tmp_path / "out" / again["avatar"][1]))
    assert (same == np.asarray(Image.open(gen / again["realistic"][1]))).all()  # passthrough of the new face


def test_sdxl_img2img_stylizer_runs_through_diffusers(default):
    params = dict(default["stylize"], stylizer="sdxl_img2img", steps=2)
    styler = stylizers.stylizer(params, default["models"], default["prompts"])
    src = [Image.new("RGB", (64, 64), (255, 255, 255)), Image.new("RGB", (64, 64), (200, 180, 160))]
    rows = pd.DataFrame({"expression": ["joy", "awe"], "seed_used": [1, 2]})
    out = styler.stylize(src, rows)
    assert [o.size for o in out] == [(64, 64), (64, 64)]
    again = styler.stylize(src, rows)  # seeded per row: the same avatars again
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out, again, strict=True))


def test_cartoon_of_a_small_face_matches_the_cartoon_of_the_large_one():
    """The cartoonizer's filters are sized for 256 px; a 64 px face (the default's) must come out like
    the 256 px cartoon brought down to 64 px, not with edges four times too wide (blackened eyes)."""
    from geneava.core import emo135
    from geneava.world import standin

    cartoon = stylizers.Cartoon()
    for i, c in enumerate(emo135.classes()[::45]):
        face = standin.render_face(standin.sample_attributes(c, i), 256)
        small = face.resize((64, 64), Image.Resampling.LANCZOS)
        out = cartoon.one(small)
        assert out.size == (64, 64)
        ref = np.asarray(cartoon.one(face).resize((64, 64), Image.Resampling.LANCZOS), dtype=float)
        assert np.abs(np.asarray(out, dtype=float) - ref).mean() < 8  # measured ~2.5-5.3 (at 64 px: ~10-21)


def test_tone_bands_keep_each_groups_skin_colour_where_the_palette_shifts_it():
    """Median cut shares 12 colours over skin, hair, shirt and background, so mid skin tones snap to a
    neighbour's (world identity kept for 57% of Middle Eastern faces); lightness bands keep hue and
    chroma. Measured on the skin of the cheek, in CIELAB a*b* (0-255 scale)."""
    import cv2

    from geneava.core import emo135
    from geneava.world import standin

    rng = np.random.default_rng(0)
    shift = {"tone": [], "colors": []}
    for k, race in enumerate(standin.RACES):
        a = {**standin.sample_attributes(emo135.classes()[k], k), **standin.sample_identity(rng, race=race)}
        a.update(beard=0, mole_x=0.0)
        # a generated face has thousands of colours: shading and noise on the render
        light = np.linspace(0.85, 1.1, 64)[None, :, None] * np.linspace(1.05, 0.9, 64)[:, None, None]
        noisy = np.asarray(standin.render_face(a, 64), dtype=float) * light + rng.normal(0, 4, (64, 64, 3))
        face = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
        box, _ = standin.landmarks(a)
        x, y = int((box[0] + 0.2 * (box[2] - box[0])) * 64), int((box[1] + 0.6 * (box[3] - box[1])) * 64)

        def ab(img, x=x, y=y):
            lab = cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2LAB)
            return lab[y - 1 : y + 2, x - 1 : x + 2, 1:].reshape(-1, 2)

        for mode in shift:
            out = stylizers.Cartoon(quantize=mode).one(face)
            shift[mode].append(np.linalg.norm(ab(out).mean(0) - ab(face).astype(float).mean(0)))
    assert max(shift["tone"]) < 4, shift
    assert np.mean(shift["colors"]) > 2 * np.mean(shift["tone"]), shift
    with pytest.raises(ValueError, match="quantize"):
        stylizers.Cartoon(quantize="kmeans")


def test_expression_agreement_by_primary_needs_a_135_class_encoder(people, tmp_path):
    from geneava.core import emo135
    from geneava.networks import poster

    paths = []
    for i, p in enumerate(people[:4]):
        paths.append(tmp_path / f"{i}.png")
        _portrait(p).save(paths[-1])
    fine = poster.tiny_poster(0, num_classes=len(emo135.classes())).eval()
    id_model = identity.DlibIdentity()
    by_class = stylize.preservation(paths, paths[::-1], id_model, fine, 0.68, expression_level="class")
    by_primary = stylize.preservation(paths, paths[::-1], id_model, fine, 0.68, expression_level="primary")
    # a primary groups classes: every class agreement is also a primary agreement
    assert (by_primary["expression_agrees"] >= by_class["expression_agrees"]).all()
    with torch.no_grad():
        from geneava.core.images import load_images

        pred = fine.classify(load_images([str(p) for p in paths], fine.config.image_size))[0].argmax(1)
    primary = [emo135.classes()[int(k)].primary for k in pred]
    assert by_primary["expression_agrees"].tolist() == [
        a == b for a, b in zip(primary, primary[::-1], strict=True)
    ]
    with pytest.raises(config.ParamsError, match="135 Emo135 classes"):
        stylize.preservation(
            paths, paths, id_model, models.expression_encoder("tiny", 0), 0.68, expression_level="primary"
        )


def test_derived_expression_check_separates_own_avatars_from_other_expressions(default, tmp_path):
    """The world-calibrated check: with a pass-through "stylizer" a face's own avatar is at distance 0 and
    the split is near perfect; the cartoonizer's pairs are reported with their (weaker) accuracy."""
    from geneava.world import dataset

    csv = dataset.write_pairs(tmp_path, identity=1, expression=20) / "expression.csv"
    encoder = models.expression_encoder(default["models"]["expression"], 0)
    control = stylize.derive_expression_threshold(stylizers.Passthrough(), encoder, csv)
    assert control["mean_distance_same"] == pytest.approx(0.0, abs=1e-6)
    assert control["accuracy"] >= 0.9 and control["threshold"] < control["mean_distance_different"]
    cartoon = stylize.derive_expression_threshold(stylizers.Cartoon(), encoder, csv)
    assert cartoon["mean_distance_same"] < cartoon["mean_distance_different"]
    assert 0.5 < cartoon["accuracy"] <= 1.0 and cartoon["pairs"] == 20


def test_expression_pairs_file_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="geneava.world.dataset --ensure data"):
        stylize.read_expression_pairs(tmp_path / "missing.csv")
    (tmp_path / "p.csv").write_text("face\na.png\n")
    with pytest.raises(ValueError, match=r"missing \['other'\]"):
        stylize.read_expression_pairs(tmp_path / "p.csv")
    (tmp_path / "p.csv").write_text("face,other\n")
    with pytest.raises(ValueError, match=r"needs rows"):
        stylize.read_expression_pairs(tmp_path / "p.csv")


def test_sigkill_during_stylization_then_resume_is_bit_identical(people, tmp_path, default):
    faces = [_portrait(p).resize((64, 64)) for p in people] * 6  # several dozen faces, one at a time
    gen = write_generated(tmp_path / "generate", faces, "joy")
    args = {
        "model_params": default["models"],
        "prompt_params": default["prompts"],
        "params": {**default["stylize"], "include": "all", "batch_size": 1},
        "generate_dir": str(gen),
    }
    script = tmp_path / "run.py"
    script.write_text(
        "import json, sys\nfrom pathlib import Path\nfrom geneava.stages import stylize\n"
        "a = json.loads(Path(sys.argv[1]).read_text())\n"
        "stylize.stylize(a['model_params'], a['prompt_params'], a['params'], Path(a['generate_dir']), "
        "Path(sys.argv[2]))\n"
    )
    (tmp_path / "args.json").write_text(json.dumps(args))

    def cmd(out):
        return [sys.executable, str(script), str(tmp_path / "args.json"), str(out)]

    subprocess.run(cmd(tmp_path / "whole"), check=True, capture_output=True)
    for n in (3, len(faces) // 2):
        out = tmp_path / f"killed-{n}"
        done = lambda out=out, n=n: len(list((out / "avatars").rglob("*.json"))) >= n  # noqa: E731
        assert kill_when(cmd(out), done), "the run ended before the kill"
        assert not (out / "pairs.csv").exists(), "the kill came after the last avatar"
        before = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in (out / "avatars").rglob("*.json")}
        subprocess.run(cmd(out), check=True, capture_output=True)
        assert tree_files(out) == tree_files(tmp_path / "whole")
        kept = [p for p, stamp in before.items() if (p.stat().st_mtime_ns, p.stat().st_ino) == stamp]
        assert len(kept) >= n - 1, "the resumed run made finished avatars again"


def test_stylizing_reads_no_parameter_listed_as_ignored(people, tmp_path, default, reads_outside_settings):
    """The avatar path never reads the preservation checks' keys (nor POSTER), which stylize.IGNORED
    lists as unable to change an avatar."""
    log, wrap = reads_outside_settings
    gen = write_generated(tmp_path / "generate", [_portrait(p) for p in people[:2]], "joy")
    stylize.stylize(
        wrap("models", default["models"]),
        wrap("prompts", default["prompts"]),
        wrap("stylize", {**default["stylize"], "include": "all"}),
        gen,
        tmp_path / "out",
    )
    assert {("stylize", "stylizer"), ("stylize", "levels")} <= log
    assert assert_ignored_never_read(log, stylize.IGNORED) == 7
