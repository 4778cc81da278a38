"""`make compare`: this run's metrics against the committed reference run's."""

from __future__ import annotations

import json

import pytest
import yaml

from geneava.tools import reference

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
    # the reference records its profile: a paper-profile reference does not judge a default run
    (root / "params.yaml").write_text("profile: default\n")
    (root / reference.REFERENCE / "machine.json").write_text(json.dumps({"profile": "paper"}))
    assert reference.main(["compare"]) == 2
    assert "reference run's is 'paper'" in capsys.readouterr().err


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
    from geneava.tools import results

    assert (ROOT / results.PAGE).read_text() == results.render(ROOT)
    readme = (ROOT / "README.md").read_text()
    assert results.with_block(readme, results.readme_block(ROOT)) == readme
    assert "Exp ↓" in readme  # the block is filled, not just marked


def test_the_readme_block_is_replaced_between_its_markers_only():
    from geneava.tools import results

    text = f"intro\n{results.BEGIN} (note) -->\nold table\n{results.END}\noutro\n"
    want = f"intro\n{results.BEGIN} (note) -->\nnew\n{results.END}\noutro\n"
    assert results.with_block(text, "new") == want
    with pytest.raises(KeyError, match="markers"):
        results.with_block("no markers", "new")


SHOWN = [  # every number docs/results.md states, as file:key patterns (fnmatch)
    "evaluate/metrics.json:per_class_pairs.*.*.*",
    "evaluate/metrics.json:recognition.*.*",
    "evaluate/metrics.json:recognition.chance",
    "evaluate/metrics.json:classes",
    "ablation/metrics.json:vs_*.*.*",
    "ablation/metrics.json:recognition.vs_*.*",
    "ablation/metrics.json:alpha",
    "finetune/metrics.json:steps",
    "finetune/metrics.json:images",
    "finetune/metrics.json:final_loss",
    "finetune/metrics.json:mean_loss_*_last_epoch",
    "generate/metrics.json:*.kept",
    "generate/metrics.json:*.rows",
    "generate/metrics.json:*.retried_rows",
    "generate/metrics.json:*.qc.face too close",
    "prepare/metrics.json:*",
    "memorization/metrics.json:removed_images",
    "memorization/metrics.json:generated_images",
    "memorization/metrics.json:threshold",
    "memorization/metrics.json:*.same_paper",
    "memorization/metrics.json:*.same_derived",
    "memorization/metrics.json:derived.threshold",
    "memorization/metrics.json:excess_over_reference.difference.*",
    "stylize/metrics.json:pairs",
    "stylize/metrics.json:*_share",
    "stylize/metrics.json:identity_similarity_mean",
    "stylize/metrics.json:flagged",
    "refill/report.json:rows_excluded",
    "refill/report.json:refilled",
    "refill/report.json:attempts_rendered",
    "refill/report.json:given_up",
    "refill/report.json:by_reason.*",
    "release/metrics.json:images",
    "release/metrics.json:cells",
    "release/metrics.json:cells_off",
    "world:vae.images",
    "world:vae.heldout_psnr_db",
    "world:base.*",
    "world:expression.images",
    "world:expression.*accuracy",
    "world:expression.chance",
    "world:identity.people",
    "world:identity.*_rate",
    "world:identity.threshold",
    "world:detector.images",
    "world:detector.faces",
    "world:detector.heldout_recall",
    "world:detector.right_count_share",
]


def _leaves(node, prefix=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*prefix, k))
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield prefix


def test_the_results_page_shows_each_number_from_its_metrics_file(tmp_path):
    """Each number the page states changes with its own metrics leaf, one leaf at a time (nothing on the
    page is typed in, and no number is read from the wrong key)."""
    import fnmatch
    import shutil

    from geneava.tools import results

    shutil.copytree(ROOT / reference.REFERENCE, tmp_path / reference.REFERENCE)
    (tmp_path / results.WORLD_REPORT).parent.mkdir(parents=True)
    shutil.copy(ROOT / results.WORLD_REPORT, tmp_path / results.WORLD_REPORT)
    # QC's failure reasons are keys only where a row failed; the reference run may have none, so one is
    # written in: the page must show it, and follow it
    gen = tmp_path / reference.REFERENCE / "outputs/generate/metrics.json"
    data = json.loads(gen.read_text())
    data["finetuned"]["qc"]["face too close"] = 3
    gen.write_text(json.dumps(data))
    before = results.render(tmp_path)
    assert "3 face too close" in before
    files = {
        str(p.relative_to(tmp_path / reference.REFERENCE / "outputs")): p
        for p in (tmp_path / reference.REFERENCE / "outputs").rglob("*.json")
    } | {"world": tmp_path / results.WORLD_REPORT}
    moved, every = set(), set()
    for name, path in files.items():
        original = path.read_text()
        data = json.loads(original)
        for leaf in _leaves(data):
            every.add(f"{name}:{'.'.join(leaf)}")
            changed = json.loads(original)
            node = changed
            for k in leaf[:-1]:
                node = node[k]
            node[leaf[-1]] = node[leaf[-1]] + 7
            path.write_text(json.dumps(changed))
            if results.render(tmp_path) != before:
                moved.add(f"{name}:{'.'.join(leaf)}")
        path.write_text(original)
    assert len(every) > 150
    for pattern in SHOWN:
        named = set(fnmatch.filter(every, pattern))
        assert named, f"{pattern}: no such number in the metrics"
        assert named <= moved, f"on the page, but the page does not follow: {sorted(named - moved)}"
    assert results.render(tmp_path) == before


def test_the_headline_block_reads_this_runs_metrics_and_names_only_figures_that_exist(
    tmp_path, monkeypatch, capsys
):
    """`make repro` ends with this block: this run's numbers (outputs/), not the reference run's."""
    import shutil

    from geneava.tools import results

    shutil.copytree(ROOT / "reference/metrics/outputs", tmp_path / "outputs")
    ev = json.loads((tmp_path / "outputs/evaluate/metrics.json").read_text())
    ev["per_class_pairs"]["difference"]["exp"] = {"mean": -0.123456, "lo": -0.2, "hi": -0.05}
    (tmp_path / "outputs/evaluate/metrics.json").write_text(json.dumps(ev))
    rel = json.loads((tmp_path / "outputs/release/metrics.json").read_text())
    ab = json.loads((tmp_path / "outputs/ablation/metrics.json").read_text())
    ab["vs_finetuned"]["exp"] = {"mean": 0.3, "lo": 0.1, "hi": 0.5}
    (tmp_path / "outputs/ablation/metrics.json").write_text(json.dumps(ab))
    (tmp_path / "outputs/stylize/pairs.png").write_bytes(b"png")
    text = results.headline(tmp_path)
    assert "| Exp ↓ |" in text and "-0.1235 [-0.2000, -0.0500] |" in text
    assert f"Release: {rel['images']} pairs in {rel['cells']} cells" in text
    assert "Exp +0.3000 [+0.1000, +0.5000]" in text  # the ablation's, as set above
    assert "outputs/stylize/pairs.png" in text and "outputs/finetune/loss.png" not in text
    assert len(text.splitlines()) < 30  # a terminal's worth, not `dvc metrics show`'s 300 columns

    monkeypatch.setattr(results.config, "project_root", lambda: tmp_path)
    assert results.main(["--headline"]) == 0 and capsys.readouterr().out.strip() == text
    (tmp_path / "outputs/release/metrics.json").unlink()
    assert results.main(["--headline"]) == 2
    assert "release/metrics.json not found: the release stage writes it" in capsys.readouterr().err
