"""GenEAva 1.0 release (paper, "GenEAva 1.0"): avatars paired with their realistic faces, a metadata row
per pair, a dataset card, and a balance check.

The folder loads with stock Hugging Face `datasets`:
`load_dataset("imagefolder", data_dir=<release>)` gives an `image` (avatar) and a `realistic` column
(metadata's `file_name` and `realistic_file_name`) plus every metadata field. Images on the removal lists
of the memorization audit and of the stylization checks are left out and counted; with `refill: true` such
a row takes the refill stage's replacement (a later seed that passed every check, `refilled` in its
metadata) instead. The balance check
compares every expression x race x gender x age cell with the prompt table the parameters selected;
`balance: strict` fails the stage when a cell is off, `report` only reports it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd
from PIL import Image

from geneava.core import cli, config
from geneava.core.io import temp_dir, write_csv, write_json
from geneava.stages import lora_export, qc

log = logging.getLogger(__name__)

CELL = ["expression", "race", "gender", "age"]
NAME = "GenEAva-1.0"


class BalanceError(RuntimeError):
    """A cell of the release holds more or fewer images than the parameters ask for."""


def stage_params(profile: str | None, params_file: Path | None = None) -> dict:
    return config.stage_params("release", profile, params_file)


def _read(path: Path, what: str) -> pd.DataFrame:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found: run the {what} stage first (dvc repro {what})")
    return pd.read_csv(path, keep_default_na=False)


def assemble(params: dict, outputs: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(released rows with their metadata, excluded rows with the reason, the selected prompt table)."""
    outputs = Path(outputs)
    table = _read(outputs / "generate" / "prompts.csv", "generate")
    gen = qc.generated(outputs / "generate", "finetuned", "all")
    pairs = _read(outputs / "stylize" / "pairs.csv", "stylize")
    scores = _read(outputs / "stylize" / "preservation.csv", "stylize")
    nearest = _read(outputs / "memorization" / "nearest.csv", "memorization")
    rows = gen.merge(pairs[["row_id", "realistic", "avatar", "stylizer"]], on="row_id", how="left")
    score_cols = ["identity_similarity", "identity_kept", "expression_distance", "expression_agrees"]
    rows = rows.merge(scores[["row_id", *score_cols]], on="row_id", how="left")
    nn_cols = [c for c in nearest if c.endswith(("_similarity", "_distance")) or "_same_" in c]
    rows = rows.merge(nearest[["row_id", *nn_cols]], on="row_id", how="left")

    reasons: dict[str, list[str]] = {r: [] for r in rows["row_id"]}
    if params["include"] == "kept":
        for r in rows.loc[~rows["kept"], "row_id"]:
            reasons[r].append("failed QC")
    for r in rows.loc[rows["avatar"].isna() | (rows["avatar"] == ""), "row_id"]:
        reasons[r].append("no avatar")
    if params["honour_memorization"]:
        for r in _read(outputs / "memorization" / "removal.csv", "memorization")["row_id"]:
            reasons[r].append("memorization")
    if params["honour_stylization"]:
        for r in _read(outputs / "stylize" / "removal.csv", "stylize")["row_id"]:
            reasons[r].append("stylization")
    rows["excluded"] = [", ".join(dict.fromkeys(reasons[r])) for r in rows["row_id"]]
    rows["avatar_path"] = [str(outputs / "stylize" / a) if a else "" for a in rows["avatar"].fillna("")]
    rows["refilled"] = False
    if params["refill"]:
        rows = take_refills(rows, outputs)
    released = rows[rows["excluded"] == ""].reset_index(drop=True)
    excluded = rows.loc[rows["excluded"] != "", ["row_id", "file", "excluded"]].reset_index(drop=True)
    return released, excluded, table


def take_refills(rows: pd.DataFrame, outputs: Path) -> pd.DataFrame:
    """Excluded rows the refill stage found a passing candidate for take that candidate: its face, avatar,
    seed and scores (nearest-neighbour similarities from the refill's own memorization check)."""
    refill = _read(outputs / "refill" / "manifest.csv", "refill")
    if refill.empty:
        return rows
    refill = refill[refill["accepted"].astype(str).str.lower() == "true"].set_index("row_id")
    rows = rows.copy()
    hit = rows["row_id"].isin(refill.index) & (rows["excluded"] != "")
    unmade = [c for c in rows if "_same_" in c or c.endswith("_distance") and c != "expression_distance"]
    rows[unmade] = rows[unmade].astype(object)  # bool when every row was audited: must take None below
    for i in rows.index[hit]:
        r = refill.loc[rows.at[i, "row_id"]]
        rows.at[i, "path"] = str(outputs / "refill" / r["refill_file"])
        rows.at[i, "avatar_path"] = str(outputs / "refill" / r["refill_avatar"])
        rows.at[i, "seed_used"] = int(r["seed_used"])
        rows.at[i, "attempt"] = int(r["attempt"])
        rows.at[i, "qc"] = "pass"
        rows.at[i, "stylizer"] = str(r["stylizer"])
        for col in (
            "identity_similarity",
            "expression_distance",
            "finetune_similarity",
            "reference_similarity",
        ):
            if col in rows and col in r:
                rows.at[i, col] = float(r[col])
        for col in ("identity_kept", "expression_agrees"):
            rows.at[i, col] = str(r[col]).lower() == "true"
        for col in unmade:
            rows.at[i, col] = None  # the audit's per-rule calls were not made for the replacement
        rows.at[i, "refilled"] = True
        rows.at[i, "excluded"] = ""
    return rows


def balance(released: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Per expression x race x gender x age cell of the prompt table: expected and released images."""
    expected = table.groupby(CELL).size()
    got = released.groupby(CELL).size() if len(released) else pd.Series(0, index=expected.index)
    idx = expected.index.union(got.index)
    cells = pd.DataFrame(
        {"expected": expected.reindex(idx, fill_value=0), "released": got.reindex(idx, fill_value=0)}
    ).reset_index()
    cells["off"] = cells["expected"] != cells["released"]
    return cells


def metadata(released: pd.DataFrame) -> list[dict]:
    """One record per pair, in `datasets` imagefolder form (`file_name` = avatar)."""
    keep = [
        "row_id",
        "expression",
        "race",
        "gender",
        "age",
        "prompt",
        "negative_prompt",
        "seed",
        "seed_used",
        "model",
        "lora_sha256",
        "stylizer",
        "qc",
        "identity_similarity",
        "identity_kept",
        "expression_distance",
        "expression_agrees",
        "refilled",
    ]
    keep += [c for c in released if c.startswith(("finetune_", "reference_"))]
    out = []
    for r in released.to_dict("records"):
        rec = {
            "file_name": f"avatars/{r['file'].removeprefix('images/')}",
            "realistic_file_name": f"realistic/{r['file'].removeprefix('images/')}",
        }
        rec |= {k: r[k] for k in keep if k in r}
        out.append(rec)
    return out


def build(params: dict, outputs: Path, out_dir: Path) -> dict:
    """Write `out_dir/GenEAva-1.0` (atomically: built aside, then moved into place), the balance table,
    the exclusions and a report. Raises BalanceError afterwards when `balance: strict` and a cell is off."""
    outputs, out_dir = Path(outputs), Path(out_dir)
    released, excluded, table = assemble(params, outputs)
    cells = balance(released, table)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out_dir, NAME)
    try:
        split = tmp / "train"
        for r in released.itertuples():
            name = r.file.removeprefix("images/")
            for kind, src in (("avatars", Path(r.avatar_path)), ("realistic", Path(r.path))):
                (split / kind / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, split / kind / name)
        records = metadata(released)
        split.mkdir(parents=True, exist_ok=True)
        (split / "metadata.jsonl").write_text("".join(json.dumps(x, sort_keys=True) + "\n" for x in records))
        summary = {
            "images": len(released),
            "rows": len(released) + len(excluded),
            "excluded": len(excluded),
            "refilled": int(released["refilled"].sum()),
            "excluded_by": {
                reason: int(excluded["excluded"].str.contains(reason).sum())
                for reason in ("failed QC", "no avatar", "memorization", "stylization")
            },
            "cells": len(cells),
            "cells_off": int(cells["off"].sum()),
            "balance": params["balance"],
        }
        (tmp / "README.md").write_text(dataset_card(summary, released, outputs))
        target = out_dir / NAME
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_csv(out_dir / "balance.csv", cells)
    write_csv(out_dir / "excluded.csv", excluded)
    write_json(out_dir / "metrics.json", summary)
    if summary["images"]:
        summary["rows_loaded_by_datasets"] = check_loads(out_dir / NAME, summary["images"])
    write_json(out_dir / "report.json", summary)
    if summary["cells_off"] and params["balance"] == "strict":
        off = cells[cells["off"]].head(5).to_dict("records")
        raise BalanceError(
            f"{summary['cells_off']} of {summary['cells']} expression x race x gender x age cells are off "
            f"the parameters (first: {off}); regenerate those rows or set release.<profile>.balance: report"
        )
    return {"summary": summary, "released": released, "excluded": excluded, "cells": cells}


def check_loads(folder: Path, n: int) -> int:
    """Load the release with stock `datasets` (offline); returns the rows it loaded, and raises when they
    are not the `n` pairs with both images and the expression."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from datasets import load_dataset

    with tempfile.TemporaryDirectory() as cache:
        ds = load_dataset("imagefolder", data_dir=str(folder), cache_dir=cache)["train"]
        ok = ds.num_rows == n and {"image", "realistic", "expression"} <= set(ds.column_names)
        if not ok:
            raise RuntimeError(
                f"{folder}: datasets loaded {ds.num_rows} rows {ds.column_names}, expected {n}"
            )
        return int(ds.num_rows)


def run(profile: str | None, outputs: Path, out_dir: Path, params_file: Path | None = None) -> dict:
    """The LoRA as released (`out_dir/lora`: its files and a card with Table 1), then the dataset."""
    lora_export.package(Path(outputs), Path(out_dir) / "lora")
    return build(stage_params(profile, params_file), outputs, out_dir)


# ------------------------------------------------------------------ dataset card


LICENCES = [
    ("SDXL base 1.0", "CreativeML Open RAIL++-M (stabilityai/stable-diffusion-xl-base-1.0)"),
    ("POSTER", "MIT (github zczcwh/POSTER)"),
    ("DCT-Net 3D cartoon", "see its ModelScope model card and github menyifang/DCT-Net (not verified here)"),
    ("insightface buffalo_l (RetinaFace, ArcFace)", "non-commercial research use (insightface model zoo)"),
    ("dlib models", "released into the public domain by their author (davisking/dlib-models)"),
    ("Emo135", "IEEE DataPort terms of the 135-class Emotional Facial Expression Dataset"),
]


def _counts(released: pd.DataFrame, column: str) -> str:
    if released.empty:
        return "(no images)\n"
    c = released[column].value_counts().sort_index()
    return "| " + column + " | images |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in c.items())


def dataset_card(summary: dict, released: pd.DataFrame, outputs: Path) -> str:
    table1 = (
        (outputs / "evaluate" / "table1.md").read_text()
        if (outputs / "evaluate" / "table1.md").is_file()
        else ""
    )
    memo = (
        (outputs / "memorization" / "summary.md").read_text()
        if (outputs / "memorization" / "summary.md").is_file()
        else ""
    )
    per_expr = released.groupby("expression").size() if len(released) else pd.Series(dtype=int)
    provenance = {}
    if len(released):
        for col in ("model", "lora_sha256", "stylizer"):
            provenance[col] = ", ".join(sorted(map(str, released[col].unique())))
    lines = [
        "---",
        "pretty_name: GenEAva 1.0 (regenerated)",
        "task_categories: [image-to-image, image-classification]",
        "tags: [avatars, facial-expression, synthetic]",
        "---",
        "",
        "# GenEAva 1.0 — cartoon avatars with fine-grained facial expressions",
        "",
        f"{summary['images']} avatar/realistic pairs, {summary['refilled']} of them replacements rendered by "
        "the refill stage (a later seed of the same prompt that passed QC, stylization and memorization "
        f"checks; `refilled` in the metadata); {summary['excluded']} generated rows left out "
        f"({', '.join(f'{k}: {v}' for k, v in summary['excluded_by'].items())}). Load with "
        '`datasets.load_dataset("imagefolder", data_dir=<this folder>)`: column `image` is the avatar, '
        "`realistic` its realistic face; every other column is metadata.",
        "",
        f"Balance: {summary['cells'] - summary['cells_off']} of {summary['cells']} expression x race x "
        f"gender x age cells as the parameters ask (check: {summary['balance']}). Images per expression: "
        + (f"min {per_expr.min()}, max {per_expr.max()}." if len(per_expr) else "none."),
        "",
        "## Balance",
        "",
        *(_counts(released, c) for c in ("race", "gender", "age")),
        "## Provenance",
        "",
        *(f"- {k}: {v}" for k, v in provenance.items()),
        "- Every record holds its prompt, seed, QC verdict, preservation scores and memorization scores.",
        "",
        "## Table 1 (this build)",
        "",
        table1,
        "## Identity memorization audit (this build)",
        "",
        memo,
        "## Licences of the upstream models and data",
        "",
        *(f"- {k}: {v}" for k, v in LICENCES),
        "",
    ]
    return "\n".join(lines)


def plot_balance(cells: pd.DataFrame, released: pd.DataFrame, save_to: Path | None = None):
    """Released images per race, gender and age group (bars), and cells off the parameters."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.5))
    for ax, col in zip(axes, ("race", "gender", "age"), strict=False):
        counts = released[col].value_counts() if len(released) else pd.Series(dtype=int)
        sns.barplot(x=counts.values, y=counts.index.astype(str), ax=ax, color="steelblue")
        ax.set(title=f"by {col}", xlabel="images", ylabel="")
    off = cells.groupby("expression")["off"].sum().sort_values(ascending=False).head(20)
    sns.barplot(x=off.values, y=off.index, ax=axes[3], color="indianred")
    axes[3].set(title="cells off the parameters (top 20)", xlabel="cells", ylabel="")
    fig.tight_layout()
    if save_to:
        fig.savefig(save_to, dpi=120)
    return fig


def figure2(released: pd.DataFrame, folder: Path, n: int = 8, save_to: Path | None = None):
    """Fig. 2 style: realistic faces above their avatars, one per expression, groups rotated so the
    columns show different races, genders and ages."""
    import matplotlib.pyplot as plt

    picks = []
    for k, (_, group) in enumerate(released.groupby("expression")):
        if len(picks) == n:
            break
        group = group.sort_values(["race", "gender", "age"])
        picks.append(group.iloc[k % len(group)])
    fig, axes = plt.subplots(2, max(1, len(picks)), figsize=(1.8 * max(1, len(picks)), 4.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if not picks:
        axes[0, 0].text(0, 0.5, "no released images (see report.json)", fontsize=9)
    for j, r in enumerate(picks):
        name = r["file"].removeprefix("images/")
        axes[0, j].imshow(Image.open(Path(folder) / "train" / "realistic" / name))
        axes[0, j].set_title(f"{r['expression']}\n{r['race']}, {r['gender']}, {r['age']}", fontsize=6)
        axes[1, j].imshow(Image.open(Path(folder) / "train" / "avatars" / name))
    for ax, label in zip(axes[:, 0], ("face (generated)", "avatar"), strict=True):
        ax.text(-0.06, 0.5, label, transform=ax.transAxes, rotation=90, va="center", ha="right", fontsize=7)
    fig.tight_layout()
    if save_to:
        fig.savefig(save_to, dpi=120)
    return fig


def main(argv: list[str] | None = None) -> int:
    return cli.stage_main(run, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
