"""The explore notebook's library (notebooks/explore.ipynb; not a stage, nothing here writes outputs/).

Browse the release by expression, race, gender and age (ipywidgets); put the plain base model's face, the
fine-tuned face and the avatar of one prompt side by side; draw new faces and avatars for a chosen
expression and person with the trained LoRA, through the generate and stylize stages' own code.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from PIL import Image

from geneava.stages import release

CELL = ["expression", "race", "gender", "age"]


def load(outputs: Path) -> pd.DataFrame:
    """The release's pairs (metadata.jsonl) with the paths of each pair's avatar, fine-tuned face and the
    baseline's face of the same prompt and seed (generate's baseline manifest)."""
    outputs = Path(outputs)
    split = outputs / "release" / release.NAME / "train"
    if not (split / "metadata.jsonl").is_file():
        raise FileNotFoundError(
            f"no release in {split}: run the pipeline first (`make repro` or `dvc repro`)"
        )
    pairs = pd.read_json(split / "metadata.jsonl", lines=True, dtype={"seed": "int64", "seed_used": "int64"})
    pairs["avatar_path"] = [str(split / f) for f in pairs["file_name"]]
    pairs["face_path"] = [str(split / f) for f in pairs["realistic_file_name"]]
    base = pd.read_csv(outputs / "generate" / "baseline" / "manifest.csv", keep_default_na=False)
    base_file = dict(zip(base["row_id"], base["file"], strict=True))
    pairs["baseline_path"] = [
        str(outputs / "generate" / "baseline" / base_file[r]) if r in base_file else ""
        for r in pairs["row_id"]
    ]
    return pairs.sort_values(CELL).reset_index(drop=True)


def pick(pairs: pd.DataFrame, **cell) -> pd.Series:
    """The released pair of one expression x race x gender x age cell (the first, if several)."""
    chosen = pairs
    for c, v in cell.items():
        chosen = chosen[chosen[c] == v]
    if chosen.empty:
        raise LookupError(f"no released pair for {cell}; the release's cells: pairs[{CELL}]")
    return chosen.iloc[0]


def side_by_side(row: pd.Series | dict, save_to: Path | None = None):
    """Baseline face, fine-tuned face and avatar of one prompt (one released pair), in a row."""
    import matplotlib.pyplot as plt

    row = dict(row)
    panels = [
        (row["baseline_path"], f"plain base model\nseed {row['seed']}"),
        (
            row["face_path"],
            f"fine-tuned (LoRA)\nseed {row['seed_used']}" + (", refilled" if row["refilled"] else ""),
        ),
        (row["avatar_path"], f"avatar ({row['stylizer']})"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 3))
    for ax, (path, title) in zip(axes, panels, strict=True):
        if path and Path(path).is_file():
            ax.imshow(Image.open(path))
        else:
            ax.text(0.5, 0.5, "not rendered", ha="center", va="center")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(" | ".join(str(row[c]) for c in CELL), fontsize=10)
    fig.tight_layout()
    if save_to:
        fig.savefig(save_to, dpi=120)
    return fig


def browser(pairs: pd.DataFrame, start: dict | None = None):
    """Four dropdowns (expression, race, gender, age) and the chosen pair side by side below them."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    start = start or {}
    pick = {}
    for c in CELL:
        options = sorted(pairs[c].unique())
        value = start.get(c) if start.get(c) in options else options[0]
        pick[c] = widgets.Dropdown(options=options, value=value, description=c)
    out = widgets.Output()

    def show(_=None) -> None:
        chosen = pairs
        for c, w in pick.items():
            chosen = chosen[chosen[c] == w.value]
        with out:
            out.clear_output(wait=True)
            if chosen.empty:
                print("no released pair in this cell")
                return
            fig = side_by_side(chosen.iloc[0])
            display(fig)
            plt.close(fig)

    for w in pick.values():
        w.observe(show, names="value")
    show()
    return widgets.VBox([widgets.HBox(list(pick.values())), out])


def draw(
    expression: str, race: str, gender: str, age: str, n: int, seed: int, lora_dir: Path, profile=None
) -> tuple[list[Image.Image], list[Image.Image]]:
    """`n` new faces of one person and expression with the trained LoRA (seeds seed, seed+1, ...), and
    their avatars, by the generate and stylize stages' own pipeline, renderer and stylizer."""
    import torch

    from geneava.core import prompts
    from geneava.networks import stylizers
    from geneava.stages import generate, stylize

    g, s = generate.stage_params(profile), stylize.stage_params(profile)
    table = prompts.prompt_table(g["prompt_params"], [expression], seed)
    row = table[(table["race"] == race) & (table["gender"] == gender) & (table["age"] == age)]
    if row.empty:
        raise ValueError(f"no prompt for {race} / {gender} / {age}: see prompts.<profile> in params.yaml")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = generate.build_pipeline(g["model_params"], g["prompt_params"], g["params"], lora_dir, device)
    rows = pd.concat([row] * n, ignore_index=True)
    faces = generate.render(pipe, rows, [seed + i for i in range(n)], g["params"])
    styler = stylizers.stylizer(s["params"], s["model_params"], s["prompt_params"], device)
    return faces, styler.stylize(faces, rows)


def drawn_grid(faces: list[Image.Image], avatars: list[Image.Image], title: str = ""):
    """New faces (top) over their avatars (bottom)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(faces), figsize=(2.2 * len(faces), 4.6), squeeze=False)
    for i, (face, avatar) in enumerate(zip(faces, avatars, strict=True)):
        for r, im in enumerate((face, avatar)):
            axes[r][i].imshow(im)
            axes[r][i].axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
