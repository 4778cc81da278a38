import json

import numpy as np
import pytest
from PIL import Image

from geneava import generate, prompts
from geneava.io import sha256_file


def _gen(default, out, lora, **over):
    p = dict(default["generate"], **over)
    return generate.generate(default["models"], default["prompts"], p, out, lora)


def test_image_names_are_unique_over_the_whole_table(params):
    table = prompts.prompt_table(params["prompts"]["paper"])
    names = [generate.image_name(r) for r in table.itertuples()]
    assert len(set(names)) == len(names) == 13_230


def test_select_rows_spreads_over_expressions(params):
    table = prompts.prompt_table(params["prompts"]["paper"])
    rows = generate.select_rows(table, 135)
    assert len(rows) == 135 and rows["expression"].nunique() > 100
    assert len(generate.select_rows(table, None)) == len(table)


def test_manifest_and_resume(default, trained, tmp_path):
    lora = trained / "lora"
    first = _gen(default, tmp_path, lora, limit=4, batch_size=2)
    assert len(first) == 4 and first["lora_sha256"].nunique() == 1
    for row in first.itertuples():
        assert sha256_file(tmp_path / row.file) == row.sha256
        assert Image.open(tmp_path / row.file).size == (64, 64)
    # a "killed" run: two images missing, the others must be kept untouched
    gone = first["file"].iloc[2:]
    kept = first["file"].iloc[:2]
    mtimes = {f: (tmp_path / f).stat().st_mtime_ns for f in kept}
    before = {f: np.asarray(Image.open(tmp_path / f), int) for f in gone}
    for f in gone:
        (tmp_path / f).unlink()
    again = _gen(default, tmp_path, lora, limit=4, batch_size=2)
    assert {f: (tmp_path / f).stat().st_mtime_ns for f in kept} == mtimes
    for f in gone:  # same seed, same batch -> the same image
        assert np.array_equal(np.asarray(Image.open(tmp_path / f), int), before[f])
    assert again["sha256"].tolist() == first["sha256"].tolist()
    assert not list(tmp_path.rglob("*.tmp"))


def test_other_settings_clear_stale_images(default, trained, tmp_path):
    lora = trained / "lora"
    _gen(default, tmp_path, lora, limit=2, steps=2)
    stale = tmp_path / "images" / "stale.png"
    stale.write_bytes(b"x")
    _gen(default, tmp_path, lora, limit=2, steps=3)
    assert not stale.exists()
    assert json.loads((tmp_path / "run.json").read_text())["steps"] == 3


def test_missing_lora_is_an_error(default, tmp_path):
    with pytest.raises(FileNotFoundError, match="finetune"):
        _gen(default, tmp_path, tmp_path / "nope", limit=1)
