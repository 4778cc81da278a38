"""benchmarks/rehearsal.py's pieces (the run itself is a benchmark, docs/rehearsal.md): its overrides are
valid params, its reference set is read by memorization as CelebA is, and a fraction keeps 98 rows per
expression."""

from __future__ import annotations

import importlib.util
import os

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
    # the LoRA's lr x steps stays the default profile's (540 images, 4 epochs), never a higher lr
    d = rehearsal.check(ROOT / "params.yaml", {})
    own, dp = d["finetune"]["default"], d["prepare"]["default"]
    default_steps = own["epochs"] * -(-dp["finetune_per_class"] * (dp["classes"] or 135) // own["batch_size"])
    f = params["finetune"]["default"]
    steps = 8 * -(-8 * (135 if fraction == 1 else 1) // f["batch_size"])
    if fraction == 1:
        assert f["lr"] < own["lr"]
        assert f["lr"] * steps == pytest.approx(own["lr"] * default_steps, rel=1e-2)
    else:
        assert f["lr"] == own["lr"]
    middle = 8 * -(-8 * 40 // own["batch_size"])  # neither clamped nor the paper's count
    assert middle > default_steps  # else pick more classes: this case must scale, not clamp
    assert rehearsal.world_lr(40, d) == pytest.approx(own["lr"] * default_steps / middle)
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


def test_page_names_each_runs_world_and_lr(rehearsal, monkeypatch):
    import json

    monkeypatch.setattr(rehearsal, "world_of", lambda c, root=None: f"w-{c}")
    record = json.loads((ROOT / "benchmarks/rehearsal/10.json").read_text())
    record["overrides"].pop("finetune.default.lr", None)  # records before world_lr
    record["commit"] = c = "0000000"  # whose params.yaml git cannot show
    row = f"| {c} | w-{c} | {record['cpus']} | 8 | default's | {record['wall_seconds']} |"
    assert row in rehearsal.page([record])
    record["overrides"]["finetune.default.lr"] = 1.26e-4
    assert f"| w-{c} | {record['cpus']} | 8 | 0.000126 |" in rehearsal.page([record])


def test_growth_is_shown_only_between_runs_of_the_same_code_and_steps(rehearsal, monkeypatch):
    import copy
    import json

    small = json.loads((ROOT / "benchmarks/rehearsal/10.json").read_text())
    small["stages"]["finetune"]["seconds"] = 50.0
    big = copy.deepcopy(small)
    big["fraction"], big["stages"]["finetune"]["seconds"] = 1.0, 700.0
    assert "| finetune | 50 (" in rehearsal.page([big, small])
    assert "x14.0 for x10 the work |" in rehearsal.page([big, small])
    assert "Grew faster than the work (x10): finetune (x14.0)." in rehearsal.page([big, small])
    assert rehearsal.growth_verdict([big, small]) == rehearsal.growth_verdict([small, big])  # sorted inside
    big["stages"]["finetune"]["seconds"] = 450.0
    assert "Grew faster" not in rehearsal.page([big, small])
    # every other stage took the same time in both runs (a copy): x1.0; finetune x9.0 is the most
    assert (
        rehearsal.growth_verdict([small, big])[1]
        == "No stage grew faster than the work (x10); the most, finetune: x9.0."
    )
    big["stages"]["finetune"]["seconds"] = 500.0  # exactly x10 for x10: as fast as the work, not faster
    assert "Grew faster" not in rehearsal.page([big, small])
    # a stage under a second in the small run: no ratio, said so, and not a "faster" stage
    small["stages"]["userstudy"]["seconds"], big["stages"]["userstudy"]["seconds"] = 0.0, 3.0
    assert "| userstudy | 0 (" in rehearsal.page([small, big]) and "under 1 s at 10% |" in rehearsal.page(
        [small, big]
    )
    assert rehearsal.growth_verdict([small, big])[1].endswith(
        "Under a second at 10%, not compared: userstudy."
    )
    assert rehearsal.growth_verdict([small, {**small}]) == []  # the same fraction: no growth to read
    small["stages"]["userstudy"]["seconds"] = big["stages"]["userstudy"]["seconds"] = 3.0
    big["stages"]["finetune"]["seconds"] = 700.0
    big["overrides"]["generate.default.steps"] += 1
    assert "the runs used different steps" in rehearsal.page([small, big])
    assert "x14.0" not in rehearsal.page([small, big]) and "faster than the work" not in rehearsal.page(
        [small, big]
    )
    big["overrides"]["generate.default.steps"] -= 1
    big["commit"] = "0000000"  # a commit git does not know
    assert "different code or world" in rehearsal.page([small, big])
    monkeypatch.setattr(rehearsal, "same_pipeline", lambda a, b, root=None: True)  # commits differ, code not
    assert "x14.0 for x10 the work |" in rehearsal.page([small, big])


def test_runs_compare_by_the_pipeline_they_ran_and_name_their_world(rehearsal, tmp_path):
    """Two commits that differ only in docs ran the same pipeline; one that changes the code or the
    world did not; a run's world is the last commit that changed models/world."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}  # never the real repository

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True, env=env
        ).stdout

    def commit(path: str, text: str) -> str:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
        git("add", "-A")
        git("-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", "commit", "-qm", path)
        return git("rev-parse", "--short", "HEAD").strip()

    git("init", "-q")
    first = commit("models/world/vae.txt", "1")
    docs = commit("docs/x.md", "a page")
    code = commit("geneava/a.py", "x = 1")
    world = commit("models/world/vae.txt", "2")
    assert rehearsal.same_pipeline(first, docs, tmp_path)
    assert not rehearsal.same_pipeline(docs, code, tmp_path)
    assert not rehearsal.same_pipeline(code, world, tmp_path)
    assert not rehearsal.same_pipeline(first, "0000000", tmp_path)
    assert [rehearsal.world_of(c, tmp_path) for c in (docs, code, world)] == [first, first, world]
    assert rehearsal.world_of(f"{code}-dirty", tmp_path) == first
    assert rehearsal.world_of("0000000", tmp_path) == "?"
    prev = world
    for path in ("notebooks/01_x.ipynb", "dvc.yaml", "params.yaml"):
        nxt = commit(path, path)
        assert not rehearsal.same_pipeline(prev, nxt, tmp_path), path
        prev = nxt
    bench = commit("benchmarks/b.py", "y")
    assert rehearsal.same_pipeline(prev, bench, tmp_path)
    assert not rehearsal.same_pipeline(f"{bench}-dirty", f"{bench}-dirty", tmp_path)  # edits unknown
    assert not rehearsal.same_pipeline("", "", tmp_path)  # no git where the benchmark ran
    base = {"overrides": {"generate.default.steps": 8}}
    assert rehearsal.comparable({**base, "commit": first}, {**base, "commit": docs}, tmp_path) is None
    why = rehearsal.comparable({**base, "commit": docs}, {**base, "commit": code}, tmp_path)
    assert "different code or world" in why
    assert rehearsal.failed_name(1.0, 8, "219e755") == "100-8steps-219e755-failed.json"
    older = commit("params.yaml", "finetune:\n  default:\n    lr: 0.0007\n")  # a record before world_lr
    assert rehearsal._lr({"overrides": {}, "commit": older}, tmp_path) == "0.0007"
    assert rehearsal._lr({"overrides": {}, "commit": code}, tmp_path) == "default's"  # no such key there
    assert (
        rehearsal._lr({"overrides": {"finetune.default.lr": 1.26e-4}, "commit": older}, tmp_path)
        == "0.000126"
    )
    assert rehearsal.failed_name(0.1, 4, "").startswith("10-4steps-2")  # the time's, not an empty name


def test_a_run_that_stops_is_recorded_with_its_stage_and_error(rehearsal, tmp_path):
    """A stopped rehearsal is a finding: the stage DVC names, the last error line, the stages this run
    finished (not those of an earlier run, nor the one that raised), and the page shows it."""
    import json
    import time
    from datetime import UTC, datetime

    since = time.time()

    def executed(stage: str, start: float, exception: bool = False) -> None:
        folder = tmp_path / "outputs" / stage
        folder.mkdir(parents=True)
        stamp = datetime.fromtimestamp(start, UTC).isoformat()  # as papermill writes it
        meta = {"start_time": stamp, "duration": 12.5, "exception": exception}
        (folder / f"01_{stage}.ipynb").write_text(json.dumps({"metadata": {"papermill": meta}}))

    executed("prepare", since + 5)
    executed("finetune", since + 60, exception=True)
    executed("generate", since - 3600)  # an earlier run's notebook
    log = tmp_path / "run.log"
    log.write_text(
        "x\ngeneava.core.schema.ParamsError: lr must be > 0\nERROR: failed to reproduce 'finetune': failed\n"
    )
    over = rehearsal.overrides(0.1, ["awe"], 4)
    record = rehearsal.failure(tmp_path, 0.1, over, {"prepare": 2**30}, 99.0, since, log)
    assert (
        record["failed_stage"] == "finetune"
        and record["error"] == "geneava.core.schema.ParamsError: lr must be > 0"
    )
    assert (
        record["stages"] == {"prepare": {"seconds": 12.5, "peak_rss_gib": 1.0}}
        and record["refill"] is None
        and record["qc_failures"] is None
        and record["given_up"] is None
    )
    done = json.loads((ROOT / "benchmarks/rehearsal/10.json").read_text())
    text = rehearsal.page([done], [record])
    assert "## A run that stopped: 10% at 4 sampling steps" in text and "Stopped in **finetune**" in text
    assert f"world {rehearsal.world_of(record['commit'])}, LoRA lr 0.0005," in text
    assert "Stages it finished: prepare 12 s, 1.0 GiB." in text


def test_qc_failures_are_counted_by_race_and_expression(rehearsal, tmp_path):
    import pandas as pd

    rows = {
        "finetuned": [("rage", "Black", "face too close"), ("rage", "Black", "face too close"),
                      ("joy", "White", "pass"), ("awe", "White", "no face")],
        "baseline": [("rage", "Black", "pass"), ("joy", "White", "pass")],
    }  # fmt: skip
    for variant, rs in rows.items():
        (tmp_path / "generate" / variant).mkdir(parents=True)
        pd.DataFrame(rs, columns=["expression", "race", "qc"]).to_csv(
            tmp_path / "generate" / variant / "manifest.csv", index=False
        )
    found = rehearsal.qc_failures(tmp_path)
    assert found["finetuned"] == {
        "by_race": {"Black": 2, "White": 1},
        "top_expressions": [["rage", 2], ["awe", 1]],  # most failures first
    }
    assert found["baseline"] == {"by_race": {}, "top_expressions": []}


def test_the_drift_benchmark_counts_and_intervals(tmp_path, monkeypatch):
    """qc_drift's summary counts failures by race and verdict from the rows it rendered, and its Wilson
    interval brackets the rate (and matches a value computed by hand)."""
    import math

    import pandas as pd

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import qc_drift

    frame = pd.DataFrame({"race": ["Black", "Black", "White", "White"]})
    found = [("face too close", 58.0, 34.0, -1.0), ("pass", 56.0, 33.0, 2.0),
             ("no face", math.nan, math.nan, math.nan), ("pass", 55.0, 33.0, 3.0)]  # fmt: skip
    s = qc_drift.summary(frame, found)
    assert (s["n"], s["failed"], s["rate"]) == (4, 2, 0.5)
    assert s["by_race"] == {"Black": 1, "White": 1}
    assert s["by_verdict"] == {"face too close": 1, "no face": 1}
    assert s["face_height"] == (58 + 56 + 55) / 3 and s["margin"] == (-1 + 2 + 3) / 3
    assert s["face_centre_y"] == (34 + 33 + 33) / 3
    lo, hi = s["ci95"]
    assert lo < 0.5 < hi and (lo, hi) == qc_drift.wilson(2, 4)
    lo, hi = qc_drift.wilson(20, 100)
    assert abs(lo - 0.1333) < 1e-3 and abs(hi - 0.2888) < 1e-3  # the textbook values for 20/100


def test_the_page_shows_each_drift_record(rehearsal):
    import json

    point = {"step": 0, "rate": 0.1, "ci95": [0.08, 0.12], "face_height": 56.8, "face_centre_y": 33.5,
             "margin": 2.04, "by_race": {"Black": 3}}  # fmt: skip
    record = {"alpha": 0.0, "lr": 5e-4, "train_steps": 1080, "rows": 980, "per_race": 140,
              "sampling_steps": 8, "date": "2026-12-04", "commit": "abc1234", "same_lora_as_run": False,
              "points": [point, {**point, "step": 1080, "rate": 0.25, "ci95": [0.22, 0.28]}]}  # fmt: skip
    runs = [json.loads((ROOT / "benchmarks/rehearsal/10.json").read_text())]
    text = rehearsal.page(runs, [], [record, {**record, "alpha": 1.0}])
    assert "alpha 0, lr 0.0005, 1080 training steps, 980 rows" in text and "alpha 1, lr" in text
    assert "| 1080 | 25.0% | 22.0%-28.0% | 56.80 | 33.50 | 2.04 |" in text
    assert text.index("alpha 0,") < text.index("alpha 1,")
    assert "QC against training steps" not in rehearsal.page(runs, [], [])
    detector = {
        "per_race": 300,
        "size": 64,
        "by_race": {"Black": {"width_ratio": 1.007, "too_close_when_inside": 0.1}},
    }
    assert "QC detector on" not in text
    assert "Black 1.007, 10.0%." in rehearsal.page(runs, [], [record], detector)


def test_the_memorization_audit_is_recorded_and_shown(rehearsal, tmp_path):
    """A run's audit at its counts (nearest-neighbour similarity, faces called the same person) is in its
    record and on the page: the 100% rehearsal stopped on it."""
    import json

    sets = {
        "finetune": {"images": 1080, "same_derived": 228, "same_paper": 13223, "mean_nn_similarity": 0.88564},
        "reference": {
            "images": 10177,
            "same_derived": 1400,
            "same_paper": 13230,
            "mean_nn_similarity": 0.93152,
        },
    }
    metrics = {"derived": {"threshold": 0.967212}, "generated_images": 13230, **sets}
    (tmp_path / "memorization").mkdir()
    (tmp_path / "memorization" / "metrics.json").write_text(json.dumps(metrics))
    found = rehearsal.audit(tmp_path)
    assert found["derived_threshold"] == 0.9672 and found["generated"] == 13230
    assert "pairs_threshold" not in found and "same_pairs_called_same" not in found  # not checked at scale
    assert found["reference"] == {**sets["reference"], "mean_nn_similarity": 0.932}
    assert found["finetune"]["same_derived"] == 228 and found["finetune"]["mean_nn_similarity"] == 0.886
    done = json.loads((ROOT / "benchmarks/rehearsal/10.json").read_text())
    stopped = {**done, "failed_stage": "release", "error": "BalanceError: 4 of 13230", "memorization": found}
    assert '"same_derived": 1400' in rehearsal.page([done], [stopped])
    assert "Memorization audit: " in rehearsal.page([{**done, "memorization": found}])
    # a threshold raised to the reference's scale: the pairs' own and the share it called the same
    scaled = {
        "threshold": 0.99247,
        "pairs_threshold": 0.967212,
        "strangers_same_at_pairs_threshold": 0.39943,
        "same_pairs_called_same": 0.41667,
    }
    (tmp_path / "memorization" / "metrics.json").write_text(json.dumps({**metrics, "derived": scaled}))
    found = rehearsal.audit(tmp_path)
    assert found["derived_threshold"] == 0.9925 and found["pairs_threshold"] == 0.9672
    assert found["strangers_same_at_pairs_threshold"] == 0.399 and found["same_pairs_called_same"] == 0.417
