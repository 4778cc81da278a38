"""The evaluate stage on a set where the right answer is known: the "fine-tuned" images are copies of
the evaluation images of their own class, the "baseline" images copies of another class's."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from geneava.core import metrics
from geneava.core.images import load_images, read_split
from geneava.core.io import sha256_file, write_csv
from geneava.networks import models
from geneava.stages import evaluate, recognition, tables
from tests.conftest import CentreFace, WholeImage


def fake_generation(prepared: Path, out: Path, qc: dict[str, str] | None = None) -> Path:
    """finetuned row k of class c = eval image k of c; baseline row k of c = eval image k of c's neighbour."""
    ev = read_split(prepared, "eval")
    classes = sorted(ev["expression"].unique())
    for variant, shift in (("finetuned", 0), ("baseline", 1)):
        rows = []
        for i, c in enumerate(classes):
            src = ev[ev["expression"] == classes[(i + shift) % len(classes)]]
            for k, path in enumerate(src["path"]):
                file = f"images/{c}/{k}.png"
                (out / variant / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, out / variant / file)
                rows.append(
                    {
                        "row_id": f"{c}|{k}",
                        "expression": c,
                        "file": file,
                        "qc": (qc or {}).get(variant, "pass"),
                        "sha256": sha256_file(out / variant / file),
                    }
                )
        write_csv(out / variant / "manifest.csv", pd.DataFrame(rows))
    return out


@pytest.fixture(scope="module")
def eval_params(default) -> dict:
    # crop_margin 0 with the whole-image detector double: the crop is the image itself
    return dict(default["evaluate"], include="kept", n_boot=300, crop_margin=0.0)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, prepared, default, eval_params):
    gen = fake_generation(prepared, tmp_path_factory.mktemp("gen"))
    out = tmp_path_factory.mktemp("evaluate")
    result = evaluate.evaluate(default["models"], eval_params, prepared, gen, out, detector=WholeImage())
    return gen, out, result


def test_a_shuffled_set_moves_every_metric_the_right_way(evaluated):
    _, out, ev = evaluated
    t = ev["result"]["per_class_pairs"]
    for m, (_, higher_is_better) in tables.METRICS.items():
        d = t["difference"][m]
        if higher_is_better:
            assert t["finetuned"][m]["mean"] > t["baseline"][m]["mean"] and d["lo"] > 0, m
        else:
            assert t["finetuned"][m]["mean"] < t["baseline"][m]["mean"] and d["hi"] < 0, m
        for v in tables.VARIANTS:
            assert t[v][m]["lo"] <= t[v][m]["mean"] <= t[v][m]["hi"]
    assert json.loads((out / "metrics.json").read_text()) == ev["result"]
    assert (out / "table1.md").read_text().count("|") > 30 and "GenEAva (fine-tuned)" in (
        out / "table1.md"
    ).read_text()
    assert (out / "table1.tex").read_text().startswith("\\begin{tabular}")
    assert len(ev["per_class"]) == 12 and (ev["per_class"]["exp_difference"] < 0).all()


def test_identical_images_score_perfectly_on_matching_pairs(evaluated, prepared, default, eval_params):
    gen, _, _ = evaluated
    rows = evaluate.generated_rows(gen, "kept")
    ev = read_split(prepared, "eval")
    embedder = evaluate.Embedder(default["models"], eval_params, torch.device("cpu"), WholeImage())
    emb_ev = embedder.embed(ev["path"].tolist(), None, "eval")
    emb_gen = {v: embedder.embed(rows[v]["path"].tolist(), 64, v) for v in tables.VARIANTS}
    gram = metrics.LpipsGram(models.lpips_model("random", 0))
    classes, mats, all_pairs = evaluate.class_matrices(rows, emb_gen, ev, emb_ev, gram, 64)
    for k in range(len(classes)):  # generated row j of class c is evaluation image j of class c
        assert np.diagonal(mats["clip"]["finetuned"][k]) == pytest.approx(1, abs=1e-5)
        assert np.diagonal(mats["dino"]["finetuned"][k]) == pytest.approx(1, abs=1e-5)
        assert np.abs(np.diagonal(mats["lpips"]["finetuned"][k])).max() < 1e-6
        assert np.abs(np.diagonal(mats["exp"]["finetuned"][k])).max() < 1e-5
    # the all-pairs LPIPS (linear in the features) equals the mean of the full Gram matrix
    full = metrics.LpipsGram.pairs(
        gram.features(load_images(rows["finetuned"]["path"].tolist(), 64)),
        gram.features(load_images(ev["path"].tolist(), 64)),
    )
    assert all_pairs["finetuned"]["lpips"] == pytest.approx(full.mean().item(), abs=1e-9)


def test_embeddings_are_cached_by_file_and_model(
    evaluated, prepared, default, eval_params, monkeypatch, tmp_path
):
    gen, out, first = evaluated
    cache = tmp_path / "out" / "embeddings"
    shutil.copytree(out / "embeddings", cache)

    def no_embedding(*args, **kwargs):
        raise AssertionError("embedded again despite a valid cache")

    monkeypatch.setattr(evaluate.Embedder, "embed", no_embedding)
    again = evaluate.evaluate(
        default["models"], eval_params, prepared, gen, tmp_path / "out", detector=WholeImage()
    )
    assert again["result"] == first["result"]
    # another model invalidates the cache
    with pytest.raises(AssertionError, match="embedded again"):
        evaluate.evaluate(
            dict(default["models"], seed=1),
            eval_params,
            prepared,
            gen,
            tmp_path / "out",
            detector=WholeImage(),
        )


def test_qc_failures_are_left_out_and_a_variant_without_images_is_an_error(
    prepared, default, eval_params, tmp_path
):
    gen = fake_generation(prepared, tmp_path / "gen", qc={"baseline": "no face"})
    with pytest.raises(ValueError, match="include: all"):
        evaluate.evaluate(
            default["models"], eval_params, prepared, gen, tmp_path / "out", detector=WholeImage()
        )
    kept = evaluate.generated_rows(gen, "all")
    assert kept["baseline"]["use"].all()
    m = pd.read_csv(gen / "baseline" / "manifest.csv")
    write_csv(gen / "baseline" / "manifest.csv", m.iloc[1:])
    with pytest.raises(ValueError, match="different prompt rows"):
        evaluate.generated_rows(gen, "all")


def test_lpips_trunk_loads_from_a_torchvision_state_dict(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import alexnet

    torch.manual_seed(3)
    state = {k: v for k, v in alexnet().state_dict().items() if k.startswith("features.")}
    save_file(state, tmp_path / "alexnet.safetensors")
    model = models.lpips_model(str(tmp_path / "alexnet.safetensors"))
    assert torch.equal(getattr(model.net.slice2, "3").weight, state["features.3.weight"])
    assert torch.equal(getattr(model.net.slice5, "10").bias, state["features.10.bias"])
    save_file({"features.0.weight": state["features.0.weight"]}, tmp_path / "partial.safetensors")
    with pytest.raises(RuntimeError, match="Missing key"):
        models.lpips_model(str(tmp_path / "partial.safetensors"))


def test_other_variant_pairs_are_labelled_and_the_ablation_summary_reads_both(
    evaluated, prepared, default, eval_params, tmp_path
):
    from geneava.stages import ablation

    gen, out, first = evaluated
    cache = tmp_path / "embeddings"
    shutil.copytree(out / "embeddings", cache)
    results = {
        "vs_finetuned": evaluate.evaluate(
            default["models"],
            eval_params,
            prepared,
            gen,
            tmp_path / "a",
            detector=WholeImage(),
            variants={"finetuned": gen / "finetuned", "alpha0": gen / "baseline"},
            cache_dir=cache,
        ),
        "vs_baseline": evaluate.evaluate(
            default["models"],
            eval_params,
            prepared,
            gen,
            tmp_path / "b",
            detector=WholeImage(),
            variants={"alpha0": gen / "finetuned", "baseline": gen / "baseline"},
            cache_dir=cache,
        ),
    }
    table = (tmp_path / "a" / "table1.md").read_text()
    assert "GenEAva, α = 0 (no L_exp)" in table and "Δ fine-tuned − α = 0" in table
    assert "paper:" not in table  # the paper's rows belong beside fine-tuned vs baseline only
    delta = next(line for line in table.splitlines() if line.startswith("| Δ"))
    signed = re.compile(r"^[+-]\d+\.\d{4} \[[+-]\d+\.\d{4}, [+-]\d+\.\d{4}\]$")
    assert all(signed.match(c.strip()) for c in delta.split("|")[2:-1]), delta  # differences carry a sign
    diff = results["vs_finetuned"]["result"]["per_class_pairs"]["difference"]["exp"]
    assert diff == first["result"]["per_class_pairs"]["difference"]["exp"]  # same images, same draws
    summary = ablation.summary_table(results, 1.0, 0.0)
    assert summary.loc["Exp. ↓", "α = 1"] == pytest.approx(
        first["result"]["per_class_pairs"]["finetuned"]["exp"]["mean"]
    )
    baseline = first["result"]["per_class_pairs"]["baseline"]["exp"]["mean"]
    assert summary.loc["Exp. ↓", "α = 0"] == pytest.approx(baseline)  # "α = 0" was the baseline's images
    assert summary.loc["Exp. ↓", "baseline"] == pytest.approx(baseline)
    assert "[" in summary.loc["Exp. ↓", "α = 1 − α = 0"]
    recog = first["result"]["recognition"]  # the same images again, so the same recognition
    assert summary.loc["Recognition ↑", "α = 1"] == pytest.approx(recog["finetuned"]["mean"])
    assert summary.loc["Recognition ↑", "α = 0"] == pytest.approx(recog["baseline"]["mean"])
    assert ablation.summary_markdown(summary, 1.0, 0.0).count("|") > 20


def test_crop_margin_null_gives_poster_the_whole_image(prepared, default, eval_params):
    paths = list(read_split(prepared, "eval")["path"][:3])
    whole = evaluate.Embedder(default["models"], {**eval_params, "crop_margin": None}, "cpu", CentreFace())
    cropped = evaluate.Embedder(default["models"], {**eval_params, "crop_margin": 0.0}, "cpu", CentreFace())
    faces, found = whole.crop_faces(paths, 64)
    assert found.all() and torch.allclose(faces, evaluate._image_tensor(paths), atol=1e-6)
    assert not torch.equal(cropped.crop_faces(paths, 64)[0], faces)
    assert whole.settings["crop_margin"] is None  # part of the embedding cache key


def test_recognition_of_copies_equals_the_real_faces_own(evaluated):
    # the "fine-tuned" images are the evaluation images themselves, class by class: POSTER names the
    # same primaries for them, so their recognition is the evaluation set's, to the last digit
    _, out, ev = evaluated
    r = ev["result"]["recognition"]
    assert r["finetuned"]["mean"] == pytest.approx(r["eval"]["mean"], abs=1e-12)
    assert r["difference"]["mean"] == pytest.approx(r["finetuned"]["mean"] - r["baseline"]["mean"], abs=1e-12)
    for v in ("finetuned", "baseline", "eval", "difference"):
        assert r[v]["lo"] <= r[v]["mean"] <= r[v]["hi"]
    assert 0 <= r["baseline"]["mean"] <= 1 and r["chance"] == pytest.approx(1 / 6)
    assert "Recognition (↑)" in (out / "table1.md").read_text()


class _Encoder(torch.nn.Module):
    """An expression encoder double whose prediction is feature[0], as an integer class index."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.config = type("Config", (), {"num_classes": num_classes})()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def head(self, features):
        return torch.nn.functional.one_hot(features[:, 0].long(), self.config.num_classes).float()


def test_recognition_reads_predictions_as_primaries():
    from geneava.core import emo135

    fine = emo135.classes()
    by_name = {c.name: c for c in fine}
    # a 135-class head: right when the predicted class shares the intended class's primary
    love = [c.index for c in fine if c.primary == "love"]
    anger = [c.index for c in fine if c.primary == "anger"]
    feats = torch.tensor([[love[1]], [anger[0]], [love[0]]], dtype=torch.float32)
    intended = [fine[love[0]].name, fine[love[0]].name, fine[anger[1]].name]
    assert recognition.recognised(_Encoder(135), feats, intended).tolist() == [True, False, False]
    # a 7-class head is read in RAF-DB's order: happiness (3) fits love and joy, disgust (2) anger,
    # neutral (6) nothing
    joy = next(c.name for c in fine if c.primary == "joy")
    contempt = by_name["contempt"].name
    assert by_name[contempt].primary == "anger"
    feats = torch.tensor([[3], [3], [2], [6], [0]], dtype=torch.float32)
    intended = [fine[love[0]].name, joy, contempt, joy, joy]
    assert recognition.recognised(_Encoder(7), feats, intended).tolist() == [True, True, True, False, False]
    assert recognition.primary_compatibility(7).sum(1).tolist() == [1, 1, 1, 2, 1, 1, 0]
    assert (recognition.primary_compatibility(135).sum(1) == 1).all()
    assert recognition.recognised(_Encoder(10), feats, intended) is None
    with pytest.raises(ValueError, match="outside the 135"):
        recognition.recognised(_Encoder(7), feats[:1], ["not an emotion"])


def test_primary_grid_shows_posters_verdict_under_each_face(
    evaluated, prepared, default, eval_params, tmp_path
):
    import matplotlib.pyplot as plt

    from geneava.core import emo135

    gen, _, _ = evaluated
    fig = recognition.primary_grid(
        default["models"], eval_params, prepared, gen, classes_per_primary=1, detector=WholeImage(),
        save_to=tmp_path / "grid.png",
    )  # fmt: skip
    classes = sorted(read_split(prepared, "eval")["expression"].unique())
    primaries = {c.primary for c in emo135.classes() if c.name in classes}
    axes = np.array(fig.axes).reshape(3, -1)  # real, fine-tuned, baseline
    assert axes.shape[1] == len(primaries) and (tmp_path / "grid.png").stat().st_size > 0
    labels = [[ax.get_xlabel() for ax in row] for row in axes]
    assert all(lab.endswith(("✓", "✗")) for row in labels for lab in row)
    assert labels[0] == labels[1]  # the "fine-tuned" faces are the real ones: POSTER says the same
    plt.close(fig)


def test_differences_carry_their_sign():
    d = {"mean": 0.0017, "lo": -0.001, "hi": 0.003}
    assert tables.cell(d, 4, signed=True) == "+0.0017 [-0.0010, +0.0030]"
    assert tables.cell(d, 3) == "0.002 [-0.001, 0.003]"
