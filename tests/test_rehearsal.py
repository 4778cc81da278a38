"""benchmarks/rehearsal.py's pieces (the run itself is a benchmark, docs/rehearsal.md): its overrides are
valid params, its reference set is read by memorization as CelebA is, and a fraction keeps 98 rows per
expression."""

from __future__ import annotations

import importlib.util

import pytest

from geneava.core import prompts
from geneava.stages import memorization

from .conftest import ROOT


@pytest.fixture(scope="module")
def rehearsal():
    spec = importlib.util.spec_from_file_location("rehearsal", ROOT / "benchmarks/rehearsal.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("fraction", [0.1, 1.0])
def test_overrides_are_valid_params_with_the_papers_counts(rehearsal, fraction, tmp_path):
    names = ["love", "adoration", "affection", "fondness", "liking", "attraction", "caring", "tenderness",
             "compassion", "sentimentality", ".hidden"]  # fmt: skip
    for name in names:
        (tmp_path / "emo135" / name).mkdir(parents=True)
    (tmp_path / "emo135" / "0_file.txt").write_text("")  # sorts first: not a class folder
    expressions = rehearsal.chosen_expressions(tmp_path, fraction)
    # prepare's `classes: N` keeps the first N class folders, sorted: the same ones
    assert expressions == (None if fraction == 1 else ["adoration"])
    params = rehearsal.check(ROOT / "params.yaml", rehearsal.overrides(fraction, expressions))
    p, g = params["prepare"]["default"], params["generate"]["default"]
    assert (p["finetune_per_class"], p["eval_per_class"], params["finetune"]["default"]["epochs"]) == (
        8,
        50,
        8,
    )
    table = prompts.prompt_table(params["prompts"]["default"], g["expressions"], g["seed"])
    assert g["limit"] is None and len(table) == (13_230 if fraction == 1 else 98)
    assert p["classes"] == (None if fraction == 1 else 1)
    assert table.groupby("expression").size().eq(98).all()
    limit = params["memorization"]["default"]["reference_limit"]
    assert limit == (None if fraction == 1 else 1_018)
    with pytest.raises(KeyError, match="no such key"):
        rehearsal.apply(params, {"generate.default.stepz": 4})


def test_reference_set_is_read_as_celeba(rehearsal, tmp_path, default):
    root = rehearsal.write_reference(tmp_path / "celeba", 5)
    names = sorted(p.name for p in (root / "img_align_celeba").iterdir())
    assert names == [f"{i:06d}.png" for i in range(1, 6)]
    assert not (tmp_path / "celeba.tmp").exists()
    params = {
        **default["memorization"],
        "reference": str(root / "img_align_celeba"),
        "reference_identities": str(root / "identity_CelebA.txt"),
        "reference_limit": 3,
    }
    rows, what = memorization.reference_set(params, tmp_path, tmp_path)
    assert len(rows) == 3 and "(5 identities, one image each); the first 3 searched" in what
    # faces of different people (the identity is drawn per line)
    from PIL import Image

    pixels = [Image.open(root / "img_align_celeba" / n).tobytes() for n in names]
    assert len(set(pixels)) == 5


def test_stages_are_the_pipelines_and_found_by_their_notebooks(rehearsal):
    """STAGES is dvc.yaml's stages but the frozen world; each stage's papermill command names its notebook
    as `_<stage>.ipynb`, which is how the peak sampler and the record find it."""
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(rehearsal.STAGES) == set(stages) - {"world"}
    for stage in rehearsal.STAGES:
        cmd = (
            " ".join(stages[stage]["cmd"]) if isinstance(stages[stage]["cmd"], list) else stages[stage]["cmd"]
        )
        assert rehearsal.stage_of(cmd) == stage
    assert rehearsal.stage_of("python -m geneava.stages.generate") is None


def test_page_shows_a_missing_peak_as_a_dash(rehearsal):
    import json

    record = json.loads((ROOT / "benchmarks/rehearsal/10.json").read_text())
    record["stages"]["prepare"]["peak_rss_gib"] = None
    text = rehearsal.page([record])
    seconds = record["stages"]["prepare"]["seconds"]
    assert f"| prepare | {seconds:.0f} (-) |" in text and "passed" in text


def test_growth_is_shown_only_between_runs_of_the_same_code_and_steps(rehearsal):
    import copy
    import json

    small = json.loads((ROOT / "benchmarks/rehearsal/10.json").read_text())
    small["stages"]["finetune"]["seconds"] = 50.0
    big = copy.deepcopy(small)
    big["fraction"], big["stages"]["finetune"]["seconds"] = 1.0, 700.0
    assert "| finetune | 50 (" in rehearsal.page([big, small])
    assert "x14.0 for x10 the work |" in rehearsal.page([big, small])
    big["overrides"]["generate.default.steps"] += 1
    assert "the runs used different steps" in rehearsal.page([small, big])
    assert "x14.0" not in rehearsal.page([small, big])
    big["overrides"]["generate.default.steps"] -= 1
    big["commit"] = "0000000"
    assert "different commits" in rehearsal.page([small, big])
