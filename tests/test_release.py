"""The release folder: removal lists honoured and counted, loadable with stock `datasets`, balance checked."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from geneava.core.io import save_png, write_csv
from geneava.stages import release
from tests.conftest import write_generated

CELLS = [("joy", "White", g, "adult") for g in ("female", "male")] + [
    ("awe", "White", g, "adult") for g in ("female", "male")
]


def _world(root: Path, memorized: list[str], failed_stylization: list[str]) -> Path:
    """A minimal outputs/ tree as the generate, stylize and memorization stages leave it."""
    out = root / "outputs"
    table = pd.DataFrame(CELLS, columns=["expression", "race", "gender", "age"])
    table["row_id"] = table[["expression", "race", "gender", "age"]].agg("|".join, axis=1)
    table["prompt"], table["negative_prompt"], table["seed"] = "a face", "", range(len(table))
    write_csv(out / "generate" / "prompts.csv", table)
    write_generated(out / "generate", [Image.new("RGB", (16, 16), (40 * i, 90, 90)) for i in range(4)])
    m = pd.read_csv(out / "generate" / "finetuned" / "manifest.csv")
    m = m.drop(columns=["row_id", "expression"]).join(table)
    m["model"], m["lora_sha256"] = "tiny", "abc"
    write_csv(out / "generate" / "finetuned" / "manifest.csv", m)
    avatars = [f"avatars/{f}" for f in m["file"]]
    for a in avatars:
        save_png(out / "stylize" / a, Image.new("RGB", (16, 16), (250, 200, 0)))
    pairs = pd.DataFrame({"row_id": m["row_id"], "realistic": "finetuned/" + m["file"], "avatar": avatars})
    write_csv(out / "stylize" / "pairs.csv", pairs.assign(stylizer="cartoon", expression=m["expression"]))
    scores = pairs.assign(
        identity_similarity=0.9, identity_kept=True, expression_distance=0.1, expression_agrees=True
    )
    write_csv(out / "stylize" / "preservation.csv", scores)
    write_csv(out / "stylize" / "removal.csv", pd.DataFrame({"row_id": failed_stylization}, dtype=str))
    nearest = pd.DataFrame({"row_id": m["row_id"], "finetune_similarity": 0.3, "reference_similarity": 0.4})
    nearest["finetune_same_paper"] = False  # a per-rule call: bool when every row was audited
    write_csv(out / "memorization" / "nearest.csv", nearest)
    write_csv(out / "memorization" / "removal.csv", pd.DataFrame({"row_id": memorized}, dtype=str))
    write_csv(out / "refill" / "manifest.csv", pd.DataFrame({"row_id": [], "accepted": []}))  # none yet
    return out


def _refilled(out: Path, row_id: str, append: bool = False) -> None:
    """The refill stage's record of one accepted replacement (attempt 3)."""
    name = row_id.split("|")[0] + "/refill.png"
    save_png(out / "refill" / "images" / name, Image.new("RGB", (16, 16), (0, 0, 255)))
    save_png(out / "refill" / "avatars" / name, Image.new("RGB", (16, 16), (0, 255, 255)))
    rec = {
        "row_id": row_id,
        "accepted": True,
        "stylizer": "cartoon",
        "attempt": 3,
        "seed_used": 777,
        "refill_file": f"images/{name}",
        "refill_avatar": f"avatars/{name}",
        "identity_similarity": 0.95,
        "identity_kept": True,
        "expression_distance": 0.2,
        "expression_agrees": True,
        "finetune_similarity": 0.1,
        "reference_similarity": 0.2,
    }
    name = row_id.replace("|", "_") + ".png"
    rec["refill_file"], rec["refill_avatar"] = f"images/{name}", f"avatars/{name}"
    save_png(out / "refill" / rec["refill_file"], Image.new("RGB", (16, 16), (0, 0, 255)))
    save_png(out / "refill" / rec["refill_avatar"], Image.new("RGB", (16, 16), (0, 255, 255)))
    old = pd.read_csv(out / "refill" / "manifest.csv") if append else pd.DataFrame()
    write_csv(out / "refill" / "manifest.csv", pd.concat([old, pd.DataFrame([rec])], ignore_index=True))


@pytest.fixture
def release_params(default) -> dict:
    return dict(default["release"], include="kept", balance="report")


def test_removal_lists_are_honoured_and_the_release_loads_with_datasets(tmp_path, release_params):
    out = _world(tmp_path, memorized=["joy|White|female|adult"], failed_stylization=["awe|White|male|adult"])
    built = release.build(release_params, out, tmp_path / "release")
    s = built["summary"]
    assert s["images"] == 2 and s["excluded"] == 2 and s["rows_loaded_by_datasets"] == 2
    assert s["excluded_by"]["memorization"] == 1 and s["excluded_by"]["stylization"] == 1
    assert s["cells_off"] == 2
    from datasets import load_dataset

    ds = load_dataset(
        "imagefolder", data_dir=str(tmp_path / "release" / release.NAME), cache_dir=str(tmp_path / "c")
    )
    train = ds["train"]
    assert sorted(train["row_id"]) == ["awe|White|female|adult", "joy|White|male|adult"]
    first = train[0]
    assert first["image"].size == (16, 16) and first["realistic"].size == (16, 16)
    assert {
        "race",
        "gender",
        "age",
        "prompt",
        "seed",
        "lora_sha256",
        "identity_similarity",
        "finetune_similarity",
    } <= set(train.column_names)
    card = (tmp_path / "release" / release.NAME / "README.md").read_text()
    assert "2 avatar/realistic pairs" in card and "memorization: 1" in card and "CreativeML" in card
    fig = release.figure2(built["released"], tmp_path / "release" / release.NAME)
    assert len([ax for ax in fig.axes if ax.images]) == 2 * 2  # two faces above their two avatars
    labels = [t.get_text() for ax in fig.axes[:: len(fig.axes) // 2] for t in ax.texts]
    assert labels == ["face (generated)", "avatar"]  # the rows say which is which


def test_a_strict_balance_check_fails_the_stage_when_a_cell_is_off(tmp_path, release_params):
    out = _world(tmp_path, memorized=["joy|White|female|adult"], failed_stylization=[])
    with pytest.raises(release.BalanceError, match="1 of 4"):
        release.build(dict(release_params, balance="strict"), out, tmp_path / "release")
    # the report is written before the stage fails, so people can see which cells
    cells = pd.read_csv(tmp_path / "release" / "balance.csv")
    assert cells["off"].sum() == 1
    assert json.loads((tmp_path / "release" / "report.json").read_text())["cells_off"] == 1
    # nothing removed: every cell holds what the table asks, strict passes
    out = _world(tmp_path / "b", memorized=[], failed_stylization=[])
    assert (
        release.build(dict(release_params, balance="strict"), out, tmp_path / "b" / "release")["summary"][
            "cells_off"
        ]
        == 0
    )


def test_qc_failures_are_left_out_when_only_kept_images_are_released(tmp_path, release_params):
    out = _world(tmp_path, memorized=[], failed_stylization=[])
    m = pd.read_csv(out / "generate" / "finetuned" / "manifest.csv")
    m.loc[0, "qc"] = "no face"
    write_csv(out / "generate" / "finetuned" / "manifest.csv", m)
    built = release.build(release_params, out, tmp_path / "release")
    assert built["summary"]["excluded_by"]["failed QC"] == 1 and built["summary"]["images"] == 3
    assert release.build(dict(release_params, include="all"), out, tmp_path / "r2")["summary"]["images"] == 4


def test_an_empty_release_is_reported_not_broken(tmp_path, release_params):
    """The default profile's case: the audits flag every generated image."""
    out = _world(tmp_path, memorized=["|".join(c) for c in CELLS], failed_stylization=[])
    built = release.build(release_params, out, tmp_path / "release")
    assert built["summary"]["images"] == 0 and built["summary"]["cells_off"] == 4
    assert list(built["cells"].columns[:4]) == release.CELL
    release.plot_balance(built["cells"], built["released"], save_to=tmp_path / "balance.png")
    release.figure2(built["released"], tmp_path / "release" / release.NAME, save_to=tmp_path / "figure2.png")
    assert (tmp_path / "figure2.png").stat().st_size > 0
    assert "0 avatar/realistic pairs" in (tmp_path / "release" / release.NAME / "README.md").read_text()


def test_refilled_rows_take_their_replacement_and_fill_the_cell(tmp_path, release_params):
    row, failed = "joy|White|female|adult", "awe|White|male|adult"
    out = _world(tmp_path, memorized=[row], failed_stylization=[])
    m = pd.read_csv(out / "generate" / "finetuned" / "manifest.csv")
    m.loc[m["row_id"] == failed, "qc"] = "no face"  # failed QC: no avatar, no scores (default run's case)
    write_csv(out / "generate" / "finetuned" / "manifest.csv", m)
    for stage, name in (
        ("stylize", "pairs.csv"),
        ("stylize", "preservation.csv"),
        ("memorization", "nearest.csv"),
    ):
        t = pd.read_csv(out / stage / name)
        write_csv(out / stage / name, t[t["row_id"] != failed])
    _refilled(out, row)
    _refilled(out, failed, append=True)
    built = release.build(dict(release_params, balance="strict"), out, tmp_path / "release")
    s = built["summary"]
    assert s["images"] == 4 and s["refilled"] == 2 and s["excluded"] == 0 and s["cells_off"] == 0
    assert s["rows_loaded_by_datasets"] == s["images"]
    r = built["released"].set_index("row_id").loc[row]
    assert r["refilled"] and r["seed_used"] == 777 and r["finetune_similarity"] == 0.1
    folder = tmp_path / "release" / release.NAME / "train"
    meta = {json.loads(line)["row_id"]: json.loads(line) for line in (folder / "metadata.jsonl").open()}
    # the released pair is the replacement's face and avatar, not the removed original
    avatar = Image.open(folder / meta[row]["file_name"]).convert("RGB").getpixel((0, 0))
    face = Image.open(folder / meta[row]["realistic_file_name"]).convert("RGB").getpixel((0, 0))
    assert avatar == (0, 255, 255) and face == (0, 0, 255)
    assert meta[row]["refilled"] and meta[failed]["refilled"] and meta[failed]["stylizer"] == "cartoon"
    assert not meta["awe|White|female|adult"]["refilled"]
    # without refill both rows stay out
    plain = release.build(dict(release_params, refill=False), out, tmp_path / "r2")["summary"]
    assert plain["images"] == 2 and plain["refilled"] == 0


def test_a_refilled_row_of_a_fully_audited_set_drops_the_audit_calls(tmp_path, release_params):
    """Every row audited: the audit's per-rule columns are bool; the replacement has no such call (None)."""
    row = "joy|White|female|adult"
    out = _world(tmp_path, memorized=[row], failed_stylization=[])
    _refilled(out, row)
    built = release.build(dict(release_params, balance="strict"), out, tmp_path / "release")
    released = built["released"].set_index("row_id")
    assert released.loc[row, "finetune_same_paper"] is None
    assert not released.loc["awe|White|male|adult", "finetune_same_paper"]
    assert built["summary"]["rows_loaded_by_datasets"] == built["summary"]["images"]
