"""Generation from the balanced prompts (paper, "Prompts and generation"), with the paper's QC filter.

The fine-tuned model (SDXL + LoRA) and the baseline (plain SDXL) render the same prompt rows with the
same seeds. Each row's image is written atomically, then its JSON record (seed used, QC verdict, sha256,
and the key it was made under); geneava.core.resume reuses a row only when that key matches (its prompt,
negative prompt, seed, batch and every setting), so a parameter change never leaves a stale image and a
killed run resumes bit-identically. A row that fails QC (no face, several faces, face too close) is
rendered again in the next round with its next derived seed, up to `max_retries` times; rows that never
pass are kept, flagged and reported. Batches are dealt to `accelerate` processes, so any number of
processes renders exactly the batches a single process would.
"""

from __future__ import annotations

import hashlib
import logging
import re
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from geneava.core import cli, config, parallel, prompts, resume
from geneava.core.io import (
    save_png,
    sha256_bytes,
    sha256_file,
    source_fingerprint,
    write_csv,
    write_json,
)
from geneava.networks import models
from geneava.networks.faces import face_detector
from geneava.stages import qc

log = logging.getLogger(__name__)
VARIANTS = ("finetuned", "baseline")


def select_rows(table: pd.DataFrame, limit: int | None) -> pd.DataFrame:
    """All rows, or `limit` rows spread evenly over the table (so they span expressions)."""
    if limit is None or limit >= len(table):
        return table.reset_index(drop=True)
    index = np.unique(np.linspace(0, len(table) - 1, limit).round().astype(int))
    return table.iloc[index].reset_index(drop=True)


def image_name(row) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", f"{row.race} {row.gender} {row.age}".lower()).strip("-")
    return f"{row.expression}/{slug}.png"


def retry_seed(seed: int, attempt: int) -> int:
    """The seed of attempt k of a row (attempt 0 is the row's own seed)."""
    if attempt == 0:
        return int(seed)
    return int.from_bytes(hashlib.sha256(f"{seed}:retry:{attempt}".encode()).digest()[:4], "little")


def _settings(model_params: dict, params: dict, lora_sha256: str | None) -> dict:
    keys = ("steps", "sampler", "guidance_scale", "resolution", "qc_border", "max_retries", "detector")
    return {
        "model": model_params["sdxl"],
        "model_weights": source_fingerprint(model_params["sdxl"]),  # retrained in place: new images
        "detector_weights": source_fingerprint(params["detector"]),
        "model_seed": model_params["seed"],
        "dtype": model_params["dtype"],
        "lora_sha256": lora_sha256,
        "qc_enabled": params["qc"],
        **{k: params[k] for k in keys},
    }


def build_pipeline(model_params: dict, prompt_params: dict, params: dict, lora_dir: Path | None, device):
    """SDXL (+ LoRA) on `device` with the sampler and the speed options from params."""
    pipe = models.sdxl_from_params(model_params, prompt_params).to(device)
    models.use_sampler(pipe, params["sampler"])
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))
    if params["vae_slicing"]:
        pipe.vae.enable_slicing()
    if params["vae_tiling"]:
        pipe.vae.enable_tiling()
    if params["channels_last"]:
        pipe.unet.to(memory_format=torch.channels_last)
    if params["compile"]:
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
    return pipe


def render(pipe, rows: pd.DataFrame, seeds: list[int], params: dict) -> list:
    """One image per row; one generator per row, so an image depends on its seed, not its batch-mates."""
    negative = [str(n) if isinstance(n, str) else "" for n in rows["negative_prompt"]]
    return pipe(
        prompt=list(rows["prompt"]),
        # no negative text: SDXL's unconditional branch (zero embeddings, force_zeros_for_empty_prompt)
        negative_prompt=negative if any(negative) else None,
        num_inference_steps=params["steps"],
        guidance_scale=params["guidance_scale"],
        height=params["resolution"],
        width=params["resolution"],
        generator=[torch.Generator(pipe.device).manual_seed(s) for s in seeds],
    ).images


# Parameters that cannot change a rendered row, with why; every other value of the blocks generate reads
# enters each row's key (resume.settings), and a test checks that changing any of them changes the keys.
IGNORED = {
    "models": {
        "expression": "POSTER is not used to render",
    },
    "generate": {
        "limit": "selects rows: a row is keyed by its own prompt, seed and batch",
        "expressions": "selects rows: a row is keyed by its own prompt, seed and batch",
        "num_processes": "deals the same batches to processes (tests/test_generate.py: two equal one)",
    },
}


# The maximum number of tries: not in the key, so raising it continues the rows that gave up
# (resume.run_rounds)
TRIES = ("generate", "max_retries")


def row_items(rows: pd.DataFrame, out_dir: Path) -> list[resume.Item]:
    """Each row as a resumable item: its own inputs, and its record beside its image."""
    return [
        resume.Item(
            id=r.row_id,
            inputs={"prompt": r.prompt, "negative": r.negative_prompt, "seed": int(r.seed)},
            record=out_dir / Path(r.file).with_suffix(".json"),
            base=out_dir,
        )
        for r in rows.itertuples()
    ]


def plan(model_params: dict, prompt_params: dict, params: dict, lora_sha256: str | None):
    """The rows to render and the settings key their items are made under (nothing is rendered)."""
    rows = select_rows(
        prompts.prompt_table(prompt_params, params["expressions"], params["seed"]), params["limit"]
    )
    rows["file"] = [str(Path("images") / image_name(r)) for r in rows.itertuples()]
    blocks = {"models": model_params, "prompts": prompt_params, "generate": params}
    return rows, resume.digest(resume.settings(blocks, IGNORED, TRIES), lora_sha256)


def generate(
    model_params: dict,
    prompt_params: dict,
    params: dict,
    out_dir: Path,
    lora_dir: Path | None = None,
    detector=None,
) -> pd.DataFrame:
    """Render every selected row into `out_dir/images`, QC it, and write `manifest.csv` + `report.json`.

    Resumable (geneava.core.resume): a row is reused only when its record's key matches its prompt, seed,
    batch and every setting; a row that fails QC is tried again in the next round with its next seed."""
    state = PartialState(cpu=not torch.cuda.is_available())
    out_dir = Path(out_dir)
    lora_file = Path(lora_dir) / "pytorch_lora_weights.safetensors" if lora_dir else None
    if lora_file is not None and not lora_file.is_file():
        raise FileNotFoundError(f"{lora_file} not found: run the finetune stage first (dvc repro finetune)")
    lora_sha = sha256_file(lora_file) if lora_file else None
    settings = _settings(model_params, params, lora_sha)
    rows, key = plan(model_params, prompt_params, params, lora_sha)
    items = row_items(rows, out_dir)
    if state.is_main_process:  # temporaries of a killed run, and rows no longer asked for, go
        resume.start(out_dir)
        resume.prune(out_dir / "images", [out_dir / f for f in rows["file"]] + [it.record for it in items])
        write_json(out_dir / "run.json", settings)
    state.wait_for_everyone()

    by_id = rows.set_index("row_id", drop=False)
    made: dict = {}  # the pipeline and detector, built on the first batch that needs them

    def process(batch: list[tuple[resume.Item, int]]) -> list[resume.Outcome]:
        nonlocal detector
        if not made:
            made["pipe"] = build_pipeline(
                model_params, prompt_params, params, lora_file and lora_file.parent, state.device
            )
            if params["qc"] and detector is None:
                detector = face_detector(params["detector"], params["detector_root"], params["detector_pack"])
        frame = by_id.loc[[it.id for it, _ in batch]]
        seeds = [retry_seed(s, k) for s, (_, k) in zip(frame["seed"], batch, strict=True)]
        outcomes = []
        for row, seed, (_, k), img in zip(
            frame.itertuples(), seeds, batch, render(made["pipe"], frame, seeds, params), strict=True
        ):
            verdict, n_faces = ("", -1)
            if params["qc"]:
                verdict, n_faces = qc.image_check(detector, np.asarray(img), params["qc_border"])

            qc_label = (verdict or "pass") if params["qc"] else "not checked"
            found = {"seed_used": seed, "attempt": k, "qc": qc_label, "faces": n_faces}
            finish = partial(_row_record, out_dir, row, img, found)
            outcomes.append(resume.Outcome(verdict, finish))
        return outcomes

    with tqdm(
        total=len(items) if state.num_processes == 1 else None,
        desc=f"generate {out_dir.name}",
        unit="img",
        position=state.process_index,
    ) as bar:
        records = resume.run_rounds(
            items,
            key,
            rounds=params["max_retries"] + 1 if params["qc"] else 1,
            batch_size=params["batch_size"],
            process=process,
            rank=state.process_index,
            world=state.num_processes,
            barrier=state.wait_for_everyone,
            progress=bar.update,
        )
    return write_manifest(rows, records, settings, out_dir) if state.is_main_process else rows


def _row_record(out_dir: Path, row, img, found: dict, final: bool) -> dict:
    """A rendered row's record: written out (PNG, hash) when it is the row's final attempt."""
    if not final:
        return {"row_id": row.row_id}
    data = save_png(out_dir / row.file, img)
    return {"row_id": row.row_id, **found, "sha256": sha256_bytes(data), "files": [row.file]}


def write_manifest(rows: pd.DataFrame, records: dict, settings: dict, out_dir: Path) -> pd.DataFrame:
    """manifest.csv (each row with its seed used, attempt, QC outcome, hash and the run's settings) and
    report.json (balance_report)."""
    columns = ["row_id", "seed_used", "attempt", "qc", "faces", "sha256"]
    done = pd.DataFrame([{c: records[r][c] for c in columns} for r in rows["row_id"]], columns=columns)
    manifest = rows.merge(done, on="row_id", validate="one_to_one")
    for name, value in settings.items():
        manifest[name] = value
    write_csv(out_dir / "manifest.csv", manifest)
    write_json(out_dir / "report.json", balance_report(manifest))
    return manifest


def balance_report(manifest: pd.DataFrame) -> dict:
    """QC outcome counts and the balance of the kept images over every attribute."""
    kept = manifest[manifest["qc"].isin(qc.KEPT)]
    report = {
        "rows": len(manifest),
        "kept": len(kept),
        "qc": {k: int(v) for k, v in manifest["qc"].value_counts().sort_index().items()},
        "retried_rows": int((manifest["attempt"] > 0).sum()),
        "never_passed": sorted(manifest.loc[~manifest.index.isin(kept.index), "row_id"].tolist()),
    }
    for column in ("expression", "race", "gender", "age"):
        counts = kept.groupby(column).size().reindex(manifest[column].unique(), fill_value=0)
        report[f"kept_per_{column}"] = {"min": int(counts.min()), "max": int(counts.max())}
    return report


# ------------------------------------------------------------------ the stage


def stage_params(profile: str | None, params_file: Path | None = None) -> dict:
    """The parameter blocks the stage reads (the file is read once)."""
    b = config.blocks("models", "prompts", "generate", profile=profile, path=params_file)
    return {"model_params": b["models"], "prompt_params": b["prompts"], "params": b["generate"]}


def run(profile: str | None, lora_dir: Path | None, out_dir: Path, params_file: Path | None = None):
    """Generate one variant (with `lora_dir`: fine-tuned; without: the SDXL baseline), in this process or
    under `accelerate launch` when generate.<profile>.num_processes > 1."""
    p = stage_params(profile, params_file)
    paths = {"lora_dir": lora_dir, "out_dir": out_dir}
    if parallel.run_here(p["params"]["num_processes"]):
        return generate(**p, **paths)
    parallel.launch_stage(
        "geneava.stages.generate", p["params"]["num_processes"], profile, params_file, paths
    )
    return pd.read_csv(Path(out_dir) / "manifest.csv", keep_default_na=False)


def write_prompt_table(profile: str | None, path: Path, params_file: Path | None = None) -> pd.DataFrame:
    """The rows both variants render (a DVC output)."""
    p = stage_params(profile, params_file)
    g = p["params"]
    rows = select_rows(prompts.prompt_table(p["prompt_params"], g["expressions"], g["seed"]), g["limit"])
    write_csv(path, rows)
    return rows


def _one_process(profile, lora_dir, out_dir, params_file=None):
    return generate(**stage_params(profile, params_file), lora_dir=lora_dir, out_dir=out_dir)


def main(argv: list[str] | None = None) -> int:
    return cli.stage_main(run, argv, __doc__, _one_process)


def write_metrics(manifests: dict[str, pd.DataFrame], path: Path) -> dict:
    """Rows, kept images and QC outcomes per variant, as a DVC metrics file."""
    metrics = {name: balance_report(m) for name, m in manifests.items()}
    for m in metrics.values():
        m.pop("never_passed")
    write_json(path, metrics)
    return metrics


# ------------------------------------------------------------------ figures


def image_grid(
    manifest: pd.DataFrame, out_dir: Path, columns: int = 4, save_to: Path | None = None, most: int = 48
):
    """A captioned grid of generated images (matplotlib figure); QC failures are marked. At most `most`
    rows, evenly spaced over the manifest (so over expressions and people): a figure of every row of the
    paper's 13,230 would be hundreds of thousands of pixels tall."""
    import matplotlib.pyplot as plt
    from PIL import Image

    if len(manifest) > most:
        manifest = manifest.iloc[np.linspace(0, len(manifest) - 1, most).round().astype(int)]
    n = len(manifest)
    cols = min(columns, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, manifest.itertuples(), strict=False):
        ax.imshow(Image.open(Path(out_dir) / row.file))
        flag = "" if row.qc in ("pass", "not checked") else f"\n[QC: {row.qc}]"
        ax.set_title(f"{row.expression}\n{row.age} {row.race} {row.gender}{flag}", fontsize=7)
    fig.tight_layout()
    if save_to:
        fig.savefig(save_to, dpi=120)
    return fig


def plot_qc(manifests: dict[str, pd.DataFrame], save_to: Path | None = None):
    """QC outcomes per variant (seaborn)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    counts = pd.concat([m.assign(variant=name) for name, m in manifests.items()])
    counts = counts.groupby(["variant", "qc"]).size().rename("images").reset_index()
    fig, ax = plt.subplots(figsize=(6, 3))
    sns.barplot(data=counts, x="qc", y="images", hue="variant", ax=ax)
    ax.set(title="QC outcome of the final image of each row", xlabel="")
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
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = models.sdxl_from_params(model_params, prompt_params).to(device)
    opts = {"steps": steps, "guidance_scale": guidance_scale, "resolution": resolution}
    base = render(pipe, rows, list(rows["seed"]), opts)
    pipe.load_lora_weights(str(lora_dir))
    tuned = render(pipe, rows, list(rows["seed"]), opts)
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


if __name__ == "__main__":
    raise SystemExit(main())
