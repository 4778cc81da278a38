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
    for name in ("b_class", "a_class", "c_class", ".hidden"):
        (tmp_path / "emo135" / name).mkdir(parents=True)
    (tmp_path / "emo135" / "file.txt").write_text("")
    chosen = rehearsal.chosen_expressions(tmp_path, fraction)
    assert chosen == (None if fraction == 1 else ["a_class"])  # prepare's first class folders, sorted
    expressions = None if fraction == 1 else ["adoration", "affection"]
    params = rehearsal.check(ROOT / "params.yaml", rehearsal.overrides(fraction, expressions))
    p, g = params["prepare"]["default"], params["generate"]["default"]
    assert (p["finetune_per_class"], p["eval_per_class"], params["finetune"]["default"]["epochs"]) == (
        8,
        50,
        8,
    )
    table = prompts.prompt_table(params["prompts"]["default"], g["expressions"], g["seed"])
    assert g["limit"] is None and len(table) == (13_230 if fraction == 1 else 2 * 98)
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
