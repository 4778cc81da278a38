"""Refill: every row the release would leave out gets later seeds until a candidate passes QC, the
stylization checks and the memorization rule; accepted rows are written once, a rerun resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from geneava.core import prompts
from geneava.core.io import write_csv, write_json
from geneava.stages import generate, refill, stylize

from .conftest import ROOT, assert_ignored_never_read, kill_when, tree_files
from .test_generate import FailsFirst, Passes


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, default, trained, prepared):
    """outputs/ as the stages before refill leave it: row 0 failed QC, row 1 is on the stylization removal
    list, row 2 on the memorization removal list, row 3 is fine."""
    out = tmp_path_factory.mktemp("refill") / "outputs"
    out.mkdir()
    (out / "prepare").symlink_to(prepared)
    (out / "finetune").symlink_to(trained)
    p = {**default["generate"], "limit": 4, "steps": 2, "batch_size": 4, "qc": True, "max_retries": 0}
    m = generate.generate(
        default["models"],
        default["prompts"],
        p,
        out / "generate" / "finetuned",
        trained / "lora",
        FailsFirst(1),
    )
    assert (m["qc"] == "pass").tolist() == [False, True, True, True]
    table = generate.select_rows(prompts.prompt_table(default["prompts"], None, p["seed"]), p["limit"])
    write_csv(out / "generate" / "prompts.csv", table)  # as the generate notebook writes it
    write_csv(out / "stylize" / "removal.csv", pd.DataFrame({"row_id": [m.at[1, "row_id"]]}))
    write_csv(out / "memorization" / "removal.csv", pd.DataFrame({"row_id": [m.at[2, "row_id"]]}))
    write_json(out / "memorization" / "metrics.json", {"removal_rule": "paper"})
    return out, m


def _run(default, outputs, out_dir, stylize_over=None, **over):
    out, _ = outputs
    return refill.refill(
        default["models"],
        default["prompts"],
        {**default["generate"], "steps": 2, "batch_size": 4},
        {
            **default["stylize"],
            "stylizer": "passthrough",
            "expression_level": "class",
            **(stylize_over or {}),
        },
        {**default["memorization"], "threshold": 0.999},
        {**default["refill"], **over},
        out,
        out_dir,
        out.parent,
        detector=Passes(),
    )


def test_excluded_rows_get_later_seeds_that_pass_every_check(default, outputs, tmp_path, monkeypatch):
    out, m = outputs
    got = _run(default, outputs, tmp_path / "refill", max_attempts=2)
    assert got["row_id"].tolist() == m["row_id"][:3].tolist()
    assert got["reason"].tolist() == ["failed QC", "stylization", "memorization"]
    assert got["accepted"].all()
    for r in got.itertuples():
        first = int(m.loc[m["row_id"] == r.row_id, "attempt"].iloc[0])
        assert r.attempt == first + 1  # the next seed after the ones generate used
        assert (
            r.seed_used
            == generate.retry_seed(int(r.seed), r.attempt)
            != generate.retry_seed(int(r.seed), first)
        )
        assert (tmp_path / "refill" / r.refill_file).is_file() and (
            tmp_path / "refill" / r.refill_avatar
        ).is_file()
    report = json.loads((tmp_path / "refill" / "report.json").read_text())
    assert report["refilled"] == 3 and report["given_up"] == 0
    assert not (tmp_path / "refill" / "candidates").exists()

    # a rerun renders nothing: every row has its record
    monkeypatch.setattr(generate, "render", lambda *a, **k: pytest.fail("rendered again"))
    again = _run(default, outputs, tmp_path / "refill", max_attempts=2)
    pd.testing.assert_frame_equal(again, got)


def test_rows_that_never_pass_are_given_up_after_max_attempts(default, outputs, tmp_path, monkeypatch):
    real = stylize.preservation

    def identity_lost(*a, **k):  # every avatar fails the identity check
        return real(*a, **k).assign(identity_kept=False)

    monkeypatch.setattr(stylize, "preservation", identity_lost)
    got = _run(default, outputs, tmp_path / "refill", max_attempts=2)
    assert not got["accepted"].any()
    assert (got["candidates"] == 2).all()
    assert (got["failures"] == "stylization; stylization").all()
    assert not list((tmp_path / "refill" / "images").rglob("*.png"))  # nothing released for them
    report = json.loads((tmp_path / "refill" / "report.json").read_text())
    assert report["given_up"] == 3 and report["attempts_rendered"] == 6


def test_raising_max_attempts_continues_the_rows_given_up(default, outputs, tmp_path, monkeypatch):
    """max_attempts is not in the rows' key: raising it renders only the new attempts of the rows given up,
    and lowering it back gives the first run's manifest."""
    real, rendered = stylize.preservation, []
    monkeypatch.setattr(stylize, "preservation", lambda *a, **k: real(*a, **k).assign(identity_kept=False))
    real_render = generate.render
    monkeypatch.setattr(
        generate, "render", lambda pipe, rows, *a: rendered.append(len(rows)) or real_render(pipe, rows, *a)
    )
    first = _run(default, outputs, tmp_path / "refill", max_attempts=2)
    assert sum(rendered) == 6 and (first["candidates"] == 2).all()
    rendered.clear()
    more = _run(default, outputs, tmp_path / "refill", max_attempts=3)
    assert sum(rendered) == 3  # the third attempt of each row, nothing made again
    assert (more["candidates"] == 3).all() and not more["accepted"].any()
    assert (more["attempt"] == first["attempt"] + 1).all()
    rendered.clear()
    back = _run(default, outputs, tmp_path / "refill", max_attempts=2)
    assert sum(rendered) == 3  # the second attempts made again as the last ones
    pd.testing.assert_frame_equal(back, first)


def test_lowering_max_attempts_gives_up_rows_accepted_past_it(default, outputs, tmp_path, monkeypatch):
    """Rows accepted at the third attempt, then max_attempts 2: they are given up, as a run with 2 from the
    start gives them up, and their accepted face and avatar go with their records."""
    real, calls = stylize.preservation, []

    def fails_twice(*a, **k):  # each call checks one attempt of every row (one batch)
        calls.append(1)
        return real(*a, **k).assign(identity_kept=len(calls) > 2)

    monkeypatch.setattr(stylize, "preservation", fails_twice)
    out = tmp_path / "refill"
    got = _run(default, outputs, out, max_attempts=3)
    assert got["accepted"].all() and (got["candidates"] == 3).all()
    assert len(list((out / "images").rglob("*.png"))) == len(list((out / "avatars").rglob("*.png"))) == 3
    monkeypatch.setattr(stylize, "preservation", lambda *a, **k: real(*a, **k).assign(identity_kept=False))
    back = _run(default, outputs, out, max_attempts=2)
    assert not back["accepted"].any() and (back["candidates"] == 2).all()
    assert not list((out / "images").rglob("*.png")) and not list((out / "avatars").rglob("*.png"))


def test_nothing_to_refill_still_writes_every_record_column(default, outputs, tmp_path):
    """Every row passed and no removal list names one (the default run at test size): the manifest is
    empty but has the record columns the notebook shows and the release reads."""
    out, m = outputs
    clean = tmp_path / "outputs"
    (clean / "generate" / "finetuned").mkdir(parents=True)
    for d in ("prepare", "finetune"):
        (clean / d).symlink_to((out / d).resolve())
    (clean / "generate" / "finetuned" / "images").symlink_to(out / "generate" / "finetuned" / "images")
    manifest = pd.read_csv(out / "generate" / "finetuned" / "manifest.csv", keep_default_na=False)
    write_csv(clean / "generate" / "finetuned" / "manifest.csv", manifest.assign(qc="pass"))
    write_csv(clean / "generate" / "prompts.csv", pd.read_csv(out / "generate" / "prompts.csv"))
    for stage in ("stylize", "memorization"):
        write_csv(clean / stage / "removal.csv", pd.DataFrame({"row_id": []}))
    write_json(clean / "memorization" / "metrics.json", {"removal_rule": "paper"})
    got = _run(default, (clean, m), tmp_path / "refill")
    assert got.empty
    assert {"row_id", "reason", "accepted", "candidates", "failures", "attempt", "seed_used"} <= set(
        got.columns
    )
    written = pd.read_csv(tmp_path / "refill" / "manifest.csv")
    assert list(written.columns) == list(got.columns)
    assert json.loads((tmp_path / "refill" / "report.json").read_text())["rows_excluded"] == 0
    for sub in ("records", "images", "avatars", "embeddings"):  # the stage's DVC outputs
        assert (tmp_path / "refill" / sub).is_dir()
    refill.replacement_sheet(
        got, clean, tmp_path / "refill", save_to=tmp_path / "refill" / "replacements.png"
    )
    assert (tmp_path / "refill" / "replacements.png").is_file()


def test_sigkill_during_refill_then_resume_is_bit_identical(default, outputs, tmp_path):
    out, _ = outputs
    args = {
        "model_params": default["models"],
        "prompt_params": default["prompts"],
        "gen_params": {**default["generate"], "steps": 2, "batch_size": 1},
        "sty_params": {**default["stylize"], "stylizer": "passthrough", "expression_level": "class"},
        "mem_params": {**default["memorization"], "threshold": 0.999},
        "params": {**default["refill"], "max_attempts": 2},
    }
    (tmp_path / "args.json").write_text(json.dumps(args))
    script = tmp_path / "run.py"
    script.write_text(
        "import json, sys\nfrom pathlib import Path\nfrom geneava.stages import refill\n"
        "from tests.test_generate import Passes\n"
        "a = json.loads(Path(sys.argv[1]).read_text())\n"
        f"refill.refill(**a, outputs=Path({str(out)!r}), out_dir=Path(sys.argv[2]), "
        f"root=Path({str(out.parent)!r}), detector=Passes())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def cmd(dest):
        return [sys.executable, str(script), str(tmp_path / "args.json"), str(dest)]

    subprocess.run(cmd(tmp_path / "whole"), check=True, capture_output=True, env=env, cwd=ROOT)
    killed = tmp_path / "killed"
    done = lambda: len(list((killed / "records").rglob("*.json"))) >= 1  # noqa: E731
    assert kill_when(cmd(killed), done, env=env, cwd=ROOT), "the run ended before the kill"
    assert not (killed / "manifest.csv").exists(), "the kill came after the last row"
    before = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in (killed / "records").rglob("*.json")}
    subprocess.run(cmd(killed), check=True, capture_output=True, env=env, cwd=ROOT)
    assert tree_files(killed) == tree_files(tmp_path / "whole")
    assert all((p.stat().st_mtime_ns, p.stat().st_ino) == stamp for p, stamp in before.items())


def test_refilling_reads_no_parameter_listed_as_ignored(default, outputs, tmp_path, reads_outside_settings):
    log, wrap = reads_outside_settings
    out, _ = outputs
    refill.refill(
        wrap("models", default["models"]),
        wrap("prompts", default["prompts"]),
        wrap("generate", {**default["generate"], "steps": 2, "batch_size": 4}),
        wrap("stylize", {**default["stylize"], "stylizer": "passthrough", "expression_level": "class"}),
        wrap("memorization", {**default["memorization"], "threshold": 0.999}),
        wrap("refill", {**default["refill"], "max_attempts": 1}),
        out,
        tmp_path / "refill",
        out.parent,
        detector=Passes(),
    )
    assert {("generate", "steps"), ("stylize", "stylizer"), ("refill", "max_attempts")} <= log
    assert assert_ignored_never_read(log, refill.IGNORED) == 2  # num_processes, max_retries
