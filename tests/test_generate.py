import collections
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from geneava.core import prompts
from geneava.core.io import sha256_file
from geneava.networks.faces import Face
from geneava.stages import generate, qc

from .conftest import ROOT, assert_ignored_never_read, kill_when, tree_files


class Passes:
    """Detector double: one well-placed face in every image (the QC logic, not detection, under test)."""

    name = "one-face double"

    def detect(self, rgb):
        h, w = rgb.shape[:2]
        return [Face((w * 0.3, h * 0.3, w * 0.7, h * 0.7), 1.0)]


class FailsFirst:
    """No face in the first `n` images it sees, one face after that."""

    name = "fails-first double"

    def __init__(self, n):
        self.calls, self.n = 0, n

    def detect(self, rgb):
        self.calls += 1
        return [] if self.calls <= self.n else Passes().detect(rgb)


def _p(default, **over):
    return {**default["generate"], "qc": False, **over}


def _gen(default, out, lora, detector=None, **over):
    return generate.generate(default["models"], default["prompts"], _p(default, **over), out, lora, detector)


# ----------------------------------------------------------------- QC rules


def test_qc_rules():
    ok = Face((20, 20, 44, 44), 1.0, ((25, 30), (39, 30), (32, 36), (27, 40), (37, 40)))
    assert qc.check([ok], 64, 64, 0.02) == ""
    assert qc.check([], 64, 64, 0.02) == "no face"
    assert qc.check([ok, ok], 64, 64, 0.02) == "several faces"
    assert qc.check([Face((0, 10, 40, 50), 1.0)], 64, 64, 0.02) == "face too close"  # touches the frame
    assert qc.check([Face((5, 5, 70, 60), 1.0)], 64, 64, 0.02) == "face too close"  # leaves it
    outside = Face((10, 10, 50, 50), 1.0, ((20, 20), (30, 20), (25, 30), (20, 70), (30, 40)))
    assert qc.check([outside], 64, 64, 0.02) == "face too close"


def test_retry_seeds_are_stable_and_distinct():
    assert generate.retry_seed(7, 0) == 7
    seeds = [generate.retry_seed(7, a) for a in range(6)]
    assert len(set(seeds)) == 6 and seeds == [generate.retry_seed(7, a) for a in range(6)]


# ----------------------------------------------------------------- the table and files


def test_image_names_are_unique_over_the_whole_table(params):
    table = prompts.prompt_table(params["prompts"]["paper"])
    names = [generate.image_name(r) for r in table.itertuples()]
    assert len(set(names)) == len(names) == 13_230


def test_select_rows_spreads_over_expressions(params):
    table = prompts.prompt_table(params["prompts"]["paper"])
    rows = generate.select_rows(table, 135)
    assert len(rows) == 135 and rows["expression"].nunique() > 100
    assert len(generate.select_rows(table, None)) == len(table)


def test_balance_of_the_kept_set_at_98_per_expression(default, trained, tmp_path):
    m = _gen(
        default,
        tmp_path,
        trained / "lora",
        Passes(),
        qc=True,
        limit=None,
        expressions=["delight", "rage"],
        resolution=32,
        steps=1,
        batch_size=28,
    )
    assert len(m) == 196 and (m["qc"] == "pass").all()
    kept = m[m["qc"] == "pass"]
    assert (kept.groupby("expression").size() == 98).all()
    assert (kept.groupby(["expression", "race"]).size() == 14).all()
    assert (kept.groupby(["expression", "gender"]).size() == 49).all()
    assert (kept.groupby(["expression", "age"]).size() == 14).all()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["kept_per_expression"] == {"min": 98, "max": 98} and report["never_passed"] == []


def test_failing_rows_are_retried_with_the_next_seed(default, trained, tmp_path):
    m = _gen(default, tmp_path, trained / "lora", FailsFirst(4), qc=True, limit=4, max_retries=2)
    assert (m["qc"] == "pass").all() and (m["attempt"] == 1).all()
    assert (m["seed_used"] == [generate.retry_seed(s, 1) for s in m["seed"]]).all()


def test_rows_that_never_pass_are_kept_flagged_and_reported(default, trained, tmp_path):
    class NoFace:
        name = "no-face double"

        def detect(self, rgb):
            return []

    m = _gen(default, tmp_path, trained / "lora", NoFace(), qc=True, limit=3, max_retries=2)
    assert (m["qc"] == "no face").all() and (m["attempt"] == 2).all()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["kept"] == 0 and len(report["never_passed"]) == 3


def test_manifest_resume_and_no_partial_files(default, trained, tmp_path):
    lora = trained / "lora"
    first = _gen(default, tmp_path, lora, limit=4, batch_size=2)
    assert len(first) == 4 and first["lora_sha256"].nunique() == 1 and first["row_id"].is_unique
    for row in first.itertuples():
        assert sha256_file(tmp_path / row.file) == row.sha256
        assert Image.open(tmp_path / row.file).size == (64, 64)
    gone, kept = first["file"].iloc[2:], first["file"].iloc[:2]
    mtimes = {f: (tmp_path / f).stat().st_mtime_ns for f in kept}
    for f in gone:  # a "killed" run: two rows without their record
        (tmp_path / f).with_suffix(".json").unlink()
    again = _gen(default, tmp_path, lora, limit=4, batch_size=2)
    assert {f: (tmp_path / f).stat().st_mtime_ns for f in kept} == mtimes
    assert again["sha256"].tolist() == first["sha256"].tolist()  # same seed, same batch: same image
    assert not list(tmp_path.rglob("*.tmp"))


def test_other_settings_clear_stale_images(default, trained, tmp_path):
    _gen(default, tmp_path, trained / "lora", limit=2, steps=2)
    stale = tmp_path / "images" / "stale.png"
    stale.write_bytes(b"x")
    _gen(default, tmp_path, trained / "lora", limit=2, steps=3)
    assert not stale.exists()
    assert json.loads((tmp_path / "run.json").read_text())["steps"] == 3


def test_a_base_model_retrained_in_place_renders_its_rows_anew(default, trained, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    base = tmp_path / "sdxl"
    shutil.copytree(ROOT / default["models"]["sdxl"], base)
    models = {**default["models"], "sdxl": str(base)}
    out = tmp_path / "out"

    def gen():
        return generate.generate(
            models, default["prompts"], _p(default, limit=2, steps=2), out, trained / "lora"
        )

    first = gen()
    # the same models.<profile>.sdxl path, other weights behind it (as when the world stage retrains it)
    weights = next((base / "unet").glob("*.safetensors"))
    state = load_file(weights)
    name = next(k for k in sorted(state) if k.endswith("conv_out.bias"))
    state[name] = state[name] + 0.5
    save_file(state, weights)
    again = gen()
    assert again["model_weights"].iloc[0] != first["model_weights"].iloc[0]
    assert all(a != b for a, b in zip(again["sha256"], first["sha256"], strict=True))  # rendered anew
    for row in again.itertuples():
        assert sha256_file(out / row.file) == row.sha256


def test_baseline_and_finetuned_share_prompts_and_seeds(default, trained, tmp_path):
    ft = _gen(default, tmp_path / "ft", trained / "lora", limit=3)
    base = _gen(default, tmp_path / "base", None, limit=3)
    assert ft["prompt"].tolist() == base["prompt"].tolist() and ft["seed"].tolist() == base["seed"].tolist()
    assert base["lora_sha256"].isna().all() and ft["lora_sha256"].notna().all()
    assert ft["sha256"].tolist() != base["sha256"].tolist()


def test_missing_lora_is_an_error(default, tmp_path):
    with pytest.raises(FileNotFoundError, match="finetune"):
        _gen(default, tmp_path, tmp_path / "nope", limit=1)


# ----------------------------------------------------------------- processes


def _params_file(tmp_path, **over) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["generate"]["default"].update({"qc": False, **over})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _cmd(out: Path, lora: Path | None, params_file: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "geneava.stages.generate",
        "--out-dir",
        str(out),
        *(["--lora-dir", str(lora)] if lora else []),
        "--params",
        str(params_file),
    ]


def _records(out: Path) -> list[dict]:
    found = []
    for p in (out / "images").rglob("*.json"):
        try:
            found.append(json.loads(p.read_text()))
        except ValueError:
            pass
    return found


def test_sigkill_at_any_point_then_resume_is_bit_identical(trained, tmp_path):
    """Killed at random points, during QC retries among them; each resumed run ends with exactly the
    files of an uninterrupted run, byte for byte, and nothing left behind. (The world's faces keep about
    0.13-0.2 of the frame free above and below; QC at a 15.5% border fails many of these rows at first,
    so rows wait for retries in later rounds.)"""
    import random

    params_file = _params_file(
        tmp_path, limit=12, steps=4, batch_size=4, qc=True, qc_border=0.155, max_retries=2
    )
    whole = tmp_path / "whole"
    subprocess.run(_cmd(whole, trained / "lora", params_file), check=True, capture_output=True)
    reference = tree_files(whole)
    report = json.loads((whole / "report.json").read_text())
    assert report["retried_rows"] >= 3, "the kills below should land among QC retries"

    rng = random.Random(0)
    early, later = rng.randint(1, 4), rng.randint(5, 9)  # drawn once: records written before the kill
    points = {
        f"after {early} records": lambda out: len(_records(out)) >= early,
        f"after {later} records": lambda out: len(_records(out)) >= later,
        "with a row waiting for its retry": lambda out: any(not r.get("done") for r in _records(out)),
        "inside a retry round": lambda out: any(
            len(r.get("tries", [])) >= 2 and r.get("done") for r in _records(out)
        ),
    }
    reused = 0
    for name, ready in points.items():
        out = tmp_path / name.replace(" ", "-")
        cmd = _cmd(out, trained / "lora", params_file)
        assert kill_when(cmd, lambda out=out, ready=ready: ready(out)), f"{name}: the run ended first"
        # the kill landed mid-run: no manifest yet, some rows recorded, not all of them finished
        records = _records(out)
        assert not (out / "manifest.csv").exists(), f"killed {name}: the run had finished"
        assert records and sum(bool(r.get("done")) for r in records) < 12
        before = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in (out / "images").rglob("*.json")}
        subprocess.run(cmd, check=True, capture_output=True)
        assert tree_files(out) == reference, f"killed {name}: the resumed run differs"
        kept = [p for p, stamp in before.items() if (p.stat().st_mtime_ns, p.stat().st_ino) == stamp]
        # a first-round batch (4 rows) whose every row was recorded is reused as it is: its rows that
        # passed QC keep their records untouched (a batch cut short is made again whole, as it must be:
        # an image depends on its batch-mates)
        recorded = {p: json.loads(p.read_text()) for p in before}
        first = collections.Counter(r["tries"][0]["batch"] for r in recorded.values())
        reusable = {
            p
            for p, r in recorded.items()
            if first[r["tries"][0]["batch"]] == 4 and r["tries"][0]["why"] == ""
        }
        assert reusable <= set(kept), f"killed {name}: finished rows were made again"
        reused += len(reusable)
    assert reused, "no kill point left a finished batch: the reuse check above never ran"


def test_a_write_cut_short_is_swept_and_made_again(default, trained, tmp_path):
    """What a kill inside a write leaves (a temp file; an image without its record) is cleaned up."""
    whole = _gen(default, tmp_path / "whole", trained / "lora", limit=4, batch_size=2)
    out = tmp_path / "cut"
    first = _gen(default, out, trained / "lora", limit=4, batch_size=2)
    victim = out / first["file"].iloc[3]
    victim.with_suffix(".json").unlink()
    victim.write_bytes(victim.read_bytes()[:100])  # killed inside the write
    (victim.parent / f".{victim.name}.x8k2.tmp").write_bytes(b"partial")  # or before its rename
    again = _gen(default, out, trained / "lora", limit=4, batch_size=2)
    assert again["sha256"].tolist() == whole["sha256"].tolist()
    assert not list(out.rglob("*.tmp")) and sha256_file(victim) == again["sha256"].iloc[3]


@pytest.mark.parametrize(
    ("block", "key", "value"),
    [("generate", "seed", 7), ("prompts", "negative", "blurry"), ("generate", "steps", 3)],
)
def test_a_changed_parameter_leaves_no_stale_image(default, trained, tmp_path, block, key, value):
    """Render, change one parameter, render again into the same folder (as `dvc repro` does with persist
    outputs): every image is the one a fresh run with the new value makes."""
    out = tmp_path / "same-folder"
    old = _gen(default, out, trained / "lora", limit=6, batch_size=3)
    changed = {**default, block: {**default[block], key: value}}
    again = _gen(changed, out, trained / "lora", limit=6, batch_size=3)
    fresh = _gen(changed, tmp_path / "fresh", trained / "lora", limit=6, batch_size=3)
    assert again["sha256"].tolist() == fresh["sha256"].tolist()
    assert not set(again["sha256"]) & set(old["sha256"])
    for row in again.itertuples():
        assert sha256_file(out / row.file) == row.sha256


def test_rows_no_longer_selected_leave_the_folder(default, trained, tmp_path):
    many = _gen(default, tmp_path, trained / "lora", limit=6, batch_size=3)
    few = _gen(default, tmp_path, trained / "lora", limit=3, batch_size=3)
    on_disk = {str(p.relative_to(tmp_path)) for p in (tmp_path / "images").rglob("*.png")}
    assert on_disk == set(few["file"]) and len(many) == 6


def test_raising_max_retries_renders_only_the_new_tries(default, trained, tmp_path, monkeypatch):
    """max_retries is not in the rows' keys: raised, only the rows that gave up are rendered again, to the
    images a run with that maximum from the start makes; lowered back, the first run's images."""
    real, rendered = generate.render, []
    monkeypatch.setattr(
        generate, "render", lambda pipe, rows, *a: rendered.append(len(rows)) or real(pipe, rows, *a)
    )
    kw = dict(limit=3, qc=True)
    first = _gen(default, tmp_path / "g", trained / "lora", FailsFirst(99), max_retries=1, **kw)
    assert (first["attempt"] == 1).all() and (first["qc"] == "no face").all() and sum(rendered) == 6
    rendered.clear()
    more = _gen(default, tmp_path / "g", trained / "lora", Passes(), max_retries=3, **kw)
    assert sum(rendered) == 3 and (more["attempt"] == 2).all() and (more["qc"] == "pass").all()
    fresh = _gen(default, tmp_path / "fresh", trained / "lora", FailsFirst(6), max_retries=3, **kw)
    assert fresh["sha256"].tolist() == more["sha256"].tolist()
    rendered.clear()
    back = _gen(default, tmp_path / "g", trained / "lora", FailsFirst(99), max_retries=1, **kw)
    assert sum(rendered) == 3 and back["sha256"].tolist() == first["sha256"].tolist()


def test_the_sampler_params_name_is_the_pipelines(default):
    from diffusers import EulerDiscreteScheduler, UniPCMultistepScheduler

    for name, cls in (("unipc", UniPCMultistepScheduler), ("euler", EulerDiscreteScheduler)):
        params = {**default["generate"], "sampler": name}
        pipe = generate.build_pipeline(default["models"], default["prompts"], params, None, "cpu")
        assert type(pipe.scheduler) is cls


def test_parameters_listed_as_ignored_do_not_change_images(default, trained, tmp_path):
    """Evidence for generate.IGNORED's claims (num_processes: the two-process test below)."""
    base = _gen(default, tmp_path / "base", trained / "lora", limit=2)
    valid = {("models", "expression"): "tiny", ("models", "local_files_only"): False}
    checked = 0
    for block, keys in generate.IGNORED.items():
        for key, why in keys.items():
            if why.startswith("selects") or key == "num_processes":
                continue
            value = valid.get((block, key), f"{default[block][key]} (changed)")
            changed = {**default, block: {**default[block], key: value}}
            other = _gen(changed, tmp_path / f"{block}-{key}", trained / "lora", limit=2)
            assert other["sha256"].tolist() == base["sha256"].tolist(), f"{block}.{key} changes images"
            checked += 1
    assert checked == 1


def test_rendering_reads_no_parameter_listed_as_ignored(default, trained, tmp_path, reads_outside_settings):
    """The render path (generate() itself, with QC) never reads a key generate.IGNORED lists as unable to
    change an image: so leaving it out of the key cannot leave a stale image."""
    log, wrap = reads_outside_settings
    p = {**default["generate"], "limit": 2, "steps": 1, "qc": True}
    generate.generate(
        wrap("models", default["models"]),
        wrap("prompts", default["prompts"]),
        wrap("generate", p),
        tmp_path,
        trained / "lora",
        Passes(),
    )
    assert {("generate", "steps"), ("generate", "qc_border"), ("models", "sdxl")} <= log  # it does record
    assert assert_ignored_never_read(log, generate.IGNORED) == 2


@pytest.mark.e2e
def test_two_process_shards_equal_a_single_process_run(trained, tmp_path, monkeypatch):
    # the environment a user has: no OMP_NUM_THREADS (accelerate would give each process one thread;
    # geneava.core.parallel gives them this process's count, so the reductions, and images, are the same)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    single = _params_file(tmp_path, limit=8, batch_size=2)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "geneava.stages.generate",
            "--out-dir",
            str(tmp_path / "one"),
            "--lora-dir",
            str(trained / "lora"),
            "--params",
            str(single),
        ],
        check=True,
        capture_output=True,
    )
    one = pd.read_csv(tmp_path / "one" / "manifest.csv", keep_default_na=False)
    (tmp_path / "p2").mkdir()
    two = generate.run(
        None,
        trained / "lora",
        tmp_path / "two",
        _params_file(tmp_path / "p2", limit=8, batch_size=2, num_processes=2),
    )
    assert len(two) == 8 and two["row_id"].tolist() == one["row_id"].tolist()
    assert two["sha256"].tolist() == one["sha256"].tolist()  # image for image


def test_image_grid_shows_a_spread_sample_of_a_large_run(tmp_path):
    """The paper's 13,230 rows would make a figure hundreds of thousands of pixels tall: the grid draws
    at most `most` rows, evenly spaced, first and last included."""
    import matplotlib.pyplot as plt
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    manifest = pd.DataFrame(
        {
            "file": ["x.png"] * 100,
            "qc": ["pass"] * 100,
            "expression": [f"e{i}" for i in range(100)],
            "age": "adult",
            "race": "White",
            "gender": "female",
        }  # fmt: skip
    )
    fig = generate.image_grid(manifest, tmp_path, most=12)
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    plt.close(fig)
    assert len(titles) == 12 and titles[0].startswith("e0\n") and titles[-1].startswith("e99\n")
    small = generate.image_grid(manifest.head(5), tmp_path, most=12)
    assert sum(bool(ax.images) for ax in small.axes) == 5
    plt.close(small)
