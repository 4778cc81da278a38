"""Notebooks are committed clean, parameterised, and each one is a stage of the DAG."""

import json

import pytest
import yaml

from .conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean_and_parameterised(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), (
        f"{path.name} has outputs: clear them before committing (executed copies are DVC outputs)"
    )
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    spec = nb["metadata"]["kernelspec"]
    assert spec["name"] == "geneava" and spec["language"] == "python"
    assert nb["cells"][0]["cell_type"] == "markdown", "the first cell says what part of the paper this is"


def test_every_notebook_is_a_stage():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    commands = " ".join(
        " ".join(s["cmd"]) if isinstance(s["cmd"], list) else s["cmd"] for s in stages.values()
    )
    for nb in NOTEBOOKS:
        assert f"notebooks/{nb.name}" in commands, f"{nb.name} is run by no stage"
    for name, stage in stages.items():
        deps = stage["deps"]
        notebooks = [d for d in deps if str(d).startswith("notebooks/")]
        assert notebooks, f"stage {name} must depend on its notebook's source"
        assert not any(str(o).startswith("notebooks/") for o in stage.get("outs", [])), (
            f"stage {name} writes into notebooks/: executed copies go to the output folder"
        )
