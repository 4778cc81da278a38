"""`make compare`: this run's metrics against the committed reference run's."""

from __future__ import annotations

import json

import pytest
import yaml

from geneava import reference

from .conftest import ROOT


def _root(tmp_path, ref: dict, mine: dict | None):
    (tmp_path / "params.yaml").write_text("profile: default\n")
    stages = {
        "world": {"frozen": True, "metrics": [{"models/world/report.json": {"cache": False}}]},
        "evaluate": {"metrics": [{"outputs/evaluate/metrics.json": {"cache": False}}]},
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    path = tmp_path / "reference/metrics/outputs/evaluate/metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(ref))
    if mine is not None:
        (tmp_path / "outputs/evaluate").mkdir(parents=True)
        (tmp_path / "outputs/evaluate/metrics.json").write_text(json.dumps(mine))
    return tmp_path


REF = {"exp": {"mean": -0.8, "lo": -1.0, "hi": -0.6}, "rows": 270, "sha": "abc", "level": 0.95}


@pytest.mark.parametrize(
    ("mine", "verdicts", "code"),
    [
        (REF, {"identical"}, 0),
        ({**REF, "exp": {"mean": -0.7, "lo": -0.9, "hi": -0.5}}, {"identical", "within CI"}, 0),
        ({**REF, "sha": "def", "rows": 268}, {"identical", "differs (no CI)"}, 0),
        ({**REF, "exp": {"mean": -0.5, "lo": -0.7, "hi": -0.3}}, {"identical", "outside CI"}, 1),
        ({k: v for k, v in REF.items() if k != "rows"}, {"identical", "missing"}, 1),
        (
            {**REF, "exp": {"mean": -0.6, "lo": -0.8, "hi": -0.4}},
            {"identical", "within CI"},
            0,
        ),  # on the edge
        ({**REF, "new": 1}, {"identical", "new (no reference)"}, 0),
    ],
)
def test_each_number_gets_its_verdict_and_the_exit_code_follows(
    tmp_path, monkeypatch, capsys, mine, verdicts, code
):
    root = _root(tmp_path, REF, mine)
    monkeypatch.setattr(reference, "stale_stages", lambda root: [])
    rows = reference.compare(root)
    assert {r["verdict"] for r in rows} == verdicts
    assert {r["file"] for r in rows} == {"outputs/evaluate/metrics.json"}  # the frozen world is left out
    monkeypatch.setenv("GENEAVA_ROOT", str(root))
    assert reference.main(["compare"]) == code
    out = capsys.readouterr().out
    assert ("FAILED" in out) == bool(code)


def test_a_run_not_made_yet_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reference, "stale_stages", lambda root: [])
    monkeypatch.setenv("GENEAVA_ROOT", str(_root(tmp_path, REF, None)))
    assert reference.main(["compare"]) == 2
    assert "make repro" in capsys.readouterr().err


def test_the_committed_reference_covers_every_metrics_file_of_the_pipeline():
    files = reference.metrics_files(ROOT)
    assert len(files) >= 8
    for rel in files:
        assert (ROOT / reference.REFERENCE / rel).is_file(), f"reference/metrics lacks {rel}"
    machine = json.loads((ROOT / reference.REFERENCE / "machine.json").read_text())
    assert machine["threads"] >= 1 and machine["date"]


def test_outputs_of_another_configuration_are_not_compared(tmp_path, monkeypatch, capsys):
    """Stale stages (`dvc status`) or another profile: the metrics on disk are not the current
    configuration's, so the comparison refuses instead of judging them."""
    root = _root(tmp_path, REF, REF)
    monkeypatch.setenv("GENEAVA_ROOT", str(root))
    monkeypatch.setattr(reference, "stale_stages", lambda root: ["evaluate", "generate"])
    assert reference.main(["compare"]) == 2
    assert "evaluate, generate" in capsys.readouterr().err
    monkeypatch.setattr(reference, "stale_stages", lambda root: [])
    assert reference.main(["compare"]) == 0
    (root / "params.yaml").write_text("profile: paper\n")
    assert reference.main(["compare"]) == 2
    assert "'paper'" in capsys.readouterr().err


def test_stale_stages_asks_dvc(tmp_path):
    """A real DVC project with one stage whose dependency changed after it ran."""
    import subprocess
    import sys

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "in.txt").write_text("a")
    stage = {"cmd": "cp in.txt out.txt", "deps": ["in.txt"], "outs": [{"out.txt": {"cache": False}}]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"copy": stage}}))
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], cwd=tmp_path, check=True)
    assert reference.stale_stages(tmp_path) == []
    (tmp_path / "in.txt").write_text("b")
    assert reference.stale_stages(tmp_path) == ["copy"]


def test_the_results_page_is_what_the_committed_metrics_give():
    """docs/results.md is generated; editing it by hand or updating the metrics without it fails here."""
    from geneava import results

    assert (ROOT / results.PAGE).read_text() == results.render(ROOT)
    readme = (ROOT / "README.md").read_text()
    assert results.with_block(readme, results.readme_block(ROOT)) == readme
    assert "Exp ↓" in readme  # the block is filled, not just marked


def test_the_readme_block_is_replaced_between_its_markers_only():
    from geneava import results

    text = f"intro\n{results.BEGIN} (note) -->\nold table\n{results.END}\noutro\n"
    want = f"intro\n{results.BEGIN} (note) -->\nnew\n{results.END}\noutro\n"
    assert results.with_block(text, "new") == want
    with pytest.raises(KeyError, match="markers"):
        results.with_block("no markers", "new")


def test_the_results_page_follows_every_metrics_file(tmp_path):
    """Changed numbers in any stage's metrics change the page (nothing on it is typed in)."""
    import shutil

    from geneava import results

    shutil.copytree(ROOT / reference.REFERENCE, tmp_path / reference.REFERENCE)
    (tmp_path / results.WORLD_REPORT).parent.mkdir(parents=True)
    shutil.copy(ROOT / results.WORLD_REPORT, tmp_path / results.WORLD_REPORT)

    def bumped(node):
        if isinstance(node, dict):
            return {k: bumped(v) for k, v in node.items()}
        if isinstance(node, (int, float)) and not isinstance(node, bool):
            return node + 7
        return node

    before = results.render(tmp_path)
    files = sorted((tmp_path / reference.REFERENCE / "outputs").rglob("*.json"))
    assert len(files) >= 8
    for path in [*files, tmp_path / results.WORLD_REPORT]:
        original = path.read_text()
        path.write_text(json.dumps(bumped(json.loads(original))))
        assert results.render(tmp_path) != before, f"{path.relative_to(tmp_path)} is not on the page"
        path.write_text(original)
    assert results.render(tmp_path) == before
