"""Training you can watch: validation images every N steps from fixed prompts and seeds, and the losses in
TensorBoard (through accelerate's tracker, offline: event files under `outputs/finetune/logs/`).

The validation prompts are rows of the generate stage's prompt table (one person per expression, spread
over race, gender and age), rendered with those rows' own seeds, so each image is comparable across steps
and with the generated set. Each snapshot is one PNG strip, `validation/step-NNNNNN.png`: a series the
notebook shows and `dvc plots show` draws. Rendering draws from its own generators only: training's random
numbers, and so its weights, are the same with validation on or off (tested).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from geneava.core import io, prompts

FOLDER = "validation"
LOGS = "logs"
SETTINGS = "validation_settings.json"  # what the series in FOLDER was rendered with


def validation_rows(prompt_params: dict, expressions: list[str], seed: int) -> pd.DataFrame:
    """One prompt-table row per expression, a different person each (stepping through the 98 rows)."""
    table = prompts.prompt_table(prompt_params, expressions, seed)
    per = len(table) // len(expressions)
    return table.iloc[[i * per + (i * 37) % per for i in range(len(expressions))]].reset_index(drop=True)


def snapshot(pipe, unet, rows: pd.DataFrame, steps: int, resolution: int, out_dir: Path, step: int) -> Path:
    """Render `rows` with the LoRA as trained so far and write them side by side as the step's PNG."""
    was_training = unet.training
    unet.eval()
    images = []
    vae = pipe.vae
    with torch.no_grad():
        for _, row in rows.iterrows():  # one image per call: each with its row's own seed, as generate does
            g = torch.Generator(pipe.device).manual_seed(int(row["seed"]))
            half = pipe.unet.dtype != torch.float32  # as training computes (fp16/bf16 UNet, fp32 LoRA)
            with torch.autocast(pipe.device.type, dtype=pipe.unet.dtype, enabled=half):
                latents = pipe(
                    prompt=row["prompt"],
                    negative_prompt=row["negative_prompt"] or None,
                    num_inference_steps=steps,
                    height=resolution,
                    width=resolution,
                    generator=g,
                    output_type="latent",
                ).images
            # decoded in fp32 as training decodes x̂0 (SDXL's VAE overflows in fp16; the UNet may be fp16)
            with torch.autocast(latents.device.type, enabled=False):
                x = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
            images.append(pipe.image_processor.postprocess(x, output_type="pil")[0])
    unet.train(was_training)
    strip = Image.new("RGB", (resolution * len(images), resolution))
    for i, im in enumerate(images):
        strip.paste(im, (i * resolution, 0))
    path = Path(out_dir) / FOLDER / f"step-{step:06d}.png"
    io.save_png(path, strip)
    return path


def fresh_start(out_dir: Path) -> None:
    """A run that resumes nothing starts its image series and its TensorBoard logs anew."""
    (Path(out_dir) / SETTINGS).unlink(missing_ok=True)
    for name in (FOLDER, LOGS):
        shutil.rmtree(Path(out_dir) / name, ignore_errors=True)


def series(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the validation images written so far, in step order."""
    found = [(int(re.findall(r"\d+", p.stem)[0]), p) for p in (Path(out_dir) / FOLDER).glob("step-*.png")]
    return sorted(found)


def plot_series(out_dir: Path, rows: pd.DataFrame | None = None, save_to: Path | None = None):
    """The validation strips one under the other, labelled by step (and columns by expression)."""
    import matplotlib.pyplot as plt

    shots = series(out_dir)
    if not shots:
        print(
            f"no validation images in {Path(out_dir) / FOLDER} (is finetune.<profile>.validation_every null?)"
        )
        return None
    first = Image.open(shots[0][1])
    fig, axes = plt.subplots(len(shots), 1, figsize=(first.width / 32, 1.1 * len(shots) * first.height / 32))
    for ax, (step, path) in zip(fig.axes if len(shots) > 1 else [axes], shots, strict=True):
        ax.imshow(Image.open(path))
        ax.set_yticks([])
        ax.set_ylabel(f"step {step}", rotation=0, ha="right", va="center")
        ax.set_xticks([])
    if rows is not None:
        width = first.width // len(rows)
        top = fig.axes[0]
        top.set_xticks([width * (i + 0.5) for i in range(len(rows))])
        top.set_xticklabels(rows["expression"], fontsize=8)
        top.xaxis.tick_top()
    fig.tight_layout()
    if save_to:
        fig.savefig(save_to, dpi=120)
    return fig


KEYS = ("validation_every", "validation_expressions", "validation_steps")  # they never change the weights


class Watch:
    """One training run's watchers: the losses of every step to TensorBoard (accelerate's tracker; event
    files in `out_dir/logs/`) and a validation snapshot at the start, every `validation_every` steps and at
    the end. A run that resumes keeps the logs (TensorBoard purges the steps after the checkpoint it resumed
    from) and the series, unless the validation settings changed (then the series starts anew at the step
    it resumed from); a run that resumes nothing starts both anew. The validation settings are not part of
    the training run's key: changing them never discards checkpoints."""

    def __init__(self, accelerator, pipe, prompt_params: dict, params: dict, resolution, out_dir, resumed):
        """`resumed`: the step the run resumed from (0: it resumed nothing)."""
        self.accelerator, self.pipe, self.out_dir = accelerator, pipe, Path(out_dir)
        self.every, self.steps = params["validation_every"], params["validation_steps"]
        self.resolution = resolution
        self.rows = None
        if self.every:
            self.rows = validation_rows(prompt_params, params["validation_expressions"], params["seed"])
        settings = {k: params[k] for k in KEYS} | {"seed": params["seed"], "resolution": resolution}
        if accelerator.is_main_process:
            if not resumed:
                fresh_start(self.out_dir)
            elif _settings(self.out_dir) != settings:
                shutil.rmtree(self.out_dir / FOLDER, ignore_errors=True)
            if self.rows is not None:
                io.write_json(self.out_dir / SETTINGS, settings)
        purge = {"tensorboard": {"purge_step": resumed + 1}} if resumed else {}  # steps after the checkpoint
        accelerator.init_trackers(LOGS, init_kwargs=purge)
        if not series(self.out_dir):
            self.look(resumed)

    def look(self, step: int) -> None:
        if self.rows is not None and self.accelerator.is_main_process:
            snapshot(self.pipe, self.pipe.unet, self.rows, self.steps, self.resolution, self.out_dir, step)

    def after_step(self, step: int, total: int, losses: dict[str, float]) -> None:
        self.accelerator.log(losses, step=step)
        if self.every and (step % self.every == 0 or step == total):
            self.look(step)

    def flush(self) -> None:
        """Write the logged steps to disk (called with each checkpoint, so a killed run loses none of the
        steps it will resume after)."""
        for tracker in self.accelerator.trackers:
            writer = getattr(tracker, "writer", None)
            if writer is not None:
                writer.flush()


def _settings(out_dir: Path) -> dict | None:
    path = Path(out_dir) / SETTINGS
    return json.loads(path.read_text()) if path.is_file() else None
