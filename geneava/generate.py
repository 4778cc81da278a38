"""Generation from the balanced prompts (paper, "Prompts and generation").

Resumable: each image is written atomically as soon as its batch is done, and a rerun skips rows
whose image exists, so a killed run continues where it stopped. A `run.json` records the settings;
images made with other settings are cleared rather than mixed in.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from geneava import models, prompts
from geneava.io import save_png, sha256_file, write_csv, write_json

log = logging.getLogger(__name__)


def select_rows(table: pd.DataFrame, limit: int | None) -> pd.DataFrame:
    """All rows, or `limit` rows spread evenly over the table (so they span expressions)."""
    if limit is None or limit >= len(table):
        return table.reset_index(drop=True)
    index = np.unique(np.linspace(0, len(table) - 1, limit).round().astype(int))
    return table.iloc[index].reset_index(drop=True)


def image_name(row) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", f"{row.race} {row.gender} {row.age}".lower()).strip("-")
    return f"{row.expression}/{slug}.png"


def _settings(model_params: dict, params: dict, lora_sha256: str | None) -> dict:
    return {
        "model": model_params["sdxl"],
        "model_seed": model_params["seed"],
        "dtype": model_params["dtype"],
        "lora_sha256": lora_sha256,
        "steps": params["steps"],
        "guidance_scale": params["guidance_scale"],
        "resolution": params["resolution"],
    }


def generate(
    model_params: dict,
    prompt_params: dict,
    params: dict,
    out_dir: Path,
    lora_dir: Path | None = None,
) -> pd.DataFrame:
    """Generate every selected prompt row; write `images/`, `manifest.csv`; return the manifest."""
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    lora_file = Path(lora_dir) / "pytorch_lora_weights.safetensors" if lora_dir else None
    if lora_file is not None and not lora_file.is_file():
        raise FileNotFoundError(f"{lora_file} not found: run the finetune stage first (dvc repro finetune)")
    lora_sha = sha256_file(lora_file) if lora_file else None
    settings = _settings(model_params, params, lora_sha)
    run_file = out_dir / "run.json"
    if image_dir.exists() and (not run_file.exists() or json.loads(run_file.read_text()) != settings):
        log.warning("%s holds images made with other settings; clearing it", image_dir)
        shutil.rmtree(image_dir)
    write_json(run_file, settings)

    rows = select_rows(prompts.prompt_table(prompt_params, seed=params["seed"]), params["limit"])
    rows["file"] = [str(Path("images") / image_name(r)) for r in rows.itertuples()]
    todo = rows[[not (out_dir / f).exists() for f in rows["file"]]]
    if len(todo) < len(rows):
        log.info("resuming: %d of %d images already done", len(rows) - len(todo), len(rows))

    if len(todo):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe = models.sdxl_pipeline(
            model_params["sdxl"],
            seed=model_params["seed"],
            dtype=model_params["dtype"],
            local_files_only=model_params["local_files_only"],
            corpus=prompts.vocabulary(prompt_params),
        ).to(device)
        if lora_file is not None:
            pipe.load_lora_weights(str(lora_dir))
        bar = tqdm(total=len(todo), desc="generate", unit="img")
        for start in range(0, len(todo), params["batch_size"]):
            batch = todo.iloc[start : start + params["batch_size"]]
            # One generator per row: an image depends on its own seed, not on its batch-mates.
            generators = [torch.Generator(device).manual_seed(int(s)) for s in batch["seed"]]
            images = pipe(
                prompt=list(batch["prompt"]),
                negative_prompt=list(batch["negative_prompt"]),
                num_inference_steps=params["steps"],
                guidance_scale=params["guidance_scale"],
                height=params["resolution"],
                width=params["resolution"],
                generator=generators,
            ).images
            for file, img in zip(batch["file"], images, strict=True):
                save_png(out_dir / file, img)
            bar.update(len(batch))
        bar.close()

    for key, value in settings.items():
        rows[key] = value
    rows["sha256"] = [sha256_file(out_dir / f) for f in rows["file"]]
    write_csv(out_dir / "manifest.csv", rows)
    return rows


def image_grid(manifest: pd.DataFrame, out_dir: Path, columns: int = 4, save_to: Path | None = None):
    """A captioned grid of generated images (matplotlib figure)."""
    import matplotlib.pyplot as plt
    from PIL import Image

    n = len(manifest)
    cols = min(columns, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, manifest.itertuples(), strict=False):
        ax.imshow(Image.open(Path(out_dir) / row.file))
        ax.set_title(f"{row.expression}\n{row.age} {row.race} {row.gender}", fontsize=7)
    fig.tight_layout()
    if save_to:
        fig.savefig(save_to, dpi=120)
    return fig


def before_after(
    model_params: dict,
    prompt_params: dict,
    lora_dir: Path,
    expressions: list[str],
    resolution: int,
    steps: int = 20,
    guidance_scale: float = 5.0,
    seed: int = 0,
    save_to: Path | None = None,
):
    """The same prompts and seeds through the base model (top) and with the LoRA (bottom)."""
    import matplotlib.pyplot as plt

    table = prompts.prompt_table(prompt_params, expressions=expressions, seed=seed)
    rows = table.groupby("expression", sort=False).head(1).reset_index(drop=True)
    pipe = models.sdxl_pipeline(
        model_params["sdxl"],
        seed=model_params["seed"],
        dtype=model_params["dtype"],
        local_files_only=model_params["local_files_only"],
        corpus=prompts.vocabulary(prompt_params),
    ).to("cuda" if torch.cuda.is_available() else "cpu")
    kw = dict(
        prompt=list(rows["prompt"]),
        negative_prompt=list(rows["negative_prompt"]),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        height=resolution,
        width=resolution,
    )

    def sample():
        return pipe(
            generator=[torch.Generator(pipe.device).manual_seed(int(s)) for s in rows["seed"]], **kw
        ).images

    base = sample()
    pipe.load_lora_weights(str(lora_dir))
    tuned = sample()
    fig, axes = plt.subplots(2, len(rows), figsize=(2.2 * len(rows), 4.6), squeeze=False)
    for j, row in enumerate(rows.itertuples()):
        for i, (img, label) in enumerate(((base[j], "base"), (tuned[j], "fine-tuned"))):
            axes[i, j].imshow(img)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            axes[i, j].set_title(f"{row.expression} ({label})", fontsize=7)
    fig.tight_layout()
    if save_to:
        fig.savefig(save_to, dpi=120)
    return fig
