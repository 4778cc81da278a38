"""Generation from the balanced prompts (paper, "Prompts and generation"), with the paper's QC filter.

The fine-tuned model (SDXL + LoRA) and the baseline (plain SDXL) render the same prompt rows with the
same seeds. Each row's image is written atomically, then a small JSON record of it (seed used, QC
verdict, sha256); a row is done when its record exists, so a killed run resumes where it stopped and a
row can never appear twice. A row that fails QC (no face, several faces, face too close) is rendered
again with the next derived seed, up to `max_retries` times; rows that never pass are kept, flagged and
reported. Rows are sharded by batch over `accelerate` processes, so any number of processes renders
exactly the batches a single process would.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import shutil
from collections import deque
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from geneava import config, models, parallel, prompts, qc
from geneava.faces import face_detector
from geneava.io import (
    atomic_write_text,
    save_png,
    sha256_bytes,
    sha256_file,
    source_fingerprint,
    write_csv,
    write_json,
)

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
    keys = ("steps", "guidance_scale", "resolution", "qc_border", "max_retries", "detector")
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
    """SDXL (+ LoRA) on `device` with the speed options from params."""
    pipe = models.sdxl_from_params(model_params, prompt_params).to(device)
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


def generate(
    model_params: dict,
    prompt_params: dict,
    params: dict,
    out_dir: Path,
    lora_dir: Path | None = None,
    detector=None,
) -> pd.DataFrame:
    """Render every selected row into `out_dir/images`, QC it, and write `manifest.csv` + `report.json`."""
    state = PartialState(cpu=not torch.cuda.is_available())
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    lora_file = Path(lora_dir) / "pytorch_lora_weights.safetensors" if lora_dir else None
    if lora_file is not None and not lora_file.is_file():
        raise FileNotFoundError(f"{lora_file} not found: run the finetune stage first (dvc repro finetune)")
    settings = _settings(model_params, params, sha256_file(lora_file) if lora_file else None)
    run_file = out_dir / "run.json"
    if state.is_main_process:
        if image_dir.exists() and (not run_file.exists() or json.loads(run_file.read_text()) != settings):
            log.warning("%s holds images made with other settings; clearing it", image_dir)
            shutil.rmtree(image_dir)
        write_json(run_file, settings)
    state.wait_for_everyone()

    rows = select_rows(
        prompts.prompt_table(prompt_params, params["expressions"], params["seed"]), params["limit"]
    )
    rows["file"] = [str(Path("images") / image_name(r)) for r in rows.itertuples()]
    record = {f: out_dir / Path(f).with_suffix(".json") for f in rows["file"]}
    todo = rows[[not record[f].exists() for f in rows["file"]]]
    if len(todo) < len(rows) and state.is_main_process:
        log.info("resuming: %d of %d rows already done", len(rows) - len(todo), len(rows))
    bs = params["batch_size"]
    batches = [todo.iloc[i : i + bs] for i in range(0, len(todo), bs)]
    mine = batches[state.process_index :: state.num_processes]

    if mine:
        pipe = build_pipeline(
            model_params, prompt_params, params, lora_file and lora_file.parent, state.device
        )
        if params["qc"] and detector is None:
            detector = face_detector(params["detector"], params["detector_root"], params["detector_pack"])
        bar = tqdm(
            total=sum(len(b) for b in mine),
            desc=f"generate {out_dir.name}",
            unit="img",
            position=state.process_index,
        )
        queue = deque((b, [0] * len(b)) for b in mine)
        while queue:
            batch, attempts = queue.popleft()
            images = render(
                pipe, batch, [retry_seed(s, a) for s, a in zip(batch["seed"], attempts, strict=True)], params
            )
            retry = []
            for row, attempt, img in zip(batch.itertuples(), attempts, images, strict=True):
                verdict, n_faces = ("not checked", -1)
                if params["qc"]:
                    verdict, n_faces = qc.image_check(detector, np.asarray(img), params["qc_border"])
                if verdict not in ("", "not checked") and attempt < params["max_retries"]:
                    retry.append((row.Index, attempt + 1))
                    continue
                data = save_png(out_dir / row.file, img)  # the image first, then its record
                atomic_write_text(
                    record[row.file],
                    json.dumps(
                        {
                            "row_id": row.row_id,
                            "seed_used": retry_seed(row.seed, attempt),
                            "attempt": attempt,
                            "qc": verdict or "pass",
                            "faces": n_faces,
                            "sha256": sha256_bytes(data),
                        },
                        sort_keys=True,
                    ),
                )
                bar.update(1)
            for i in range(0, len(retry), bs):
                chunk = retry[i : i + bs]
                queue.append((batch.loc[[ix for ix, _ in chunk]], [a for _, a in chunk]))
        bar.close()
    state.wait_for_everyone()
    if not state.is_main_process:
        return rows

    records = pd.DataFrame([json.loads(record[f].read_text()) for f in rows["file"]])
    manifest = rows.merge(records, on="row_id", validate="one_to_one")
    for key, value in settings.items():
        manifest[key] = value
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


def run(profile: str | None, out_dir: Path, lora_dir: Path | None, params_file: Path | None = None):
    """Generate one variant (with `lora_dir`: fine-tuned; without: the SDXL baseline), in this process or
    under `accelerate launch` when generate.<profile>.num_processes > 1."""
    p = stage_params(profile, params_file)
    paths = {"out_dir": out_dir, "lora_dir": lora_dir}
    if parallel.run_here(p["params"]["num_processes"]):
        return generate(**p, **paths)
    parallel.launch_stage("geneava.generate", p["params"]["num_processes"], profile, params_file, paths)
    return pd.read_csv(Path(out_dir) / "manifest.csv", keep_default_na=False)


def write_prompt_table(profile: str | None, path: Path, params_file: Path | None = None) -> pd.DataFrame:
    """The rows both variants render (a DVC output)."""
    p = stage_params(profile, params_file)
    g = p["params"]
    rows = select_rows(prompts.prompt_table(p["prompt_params"], g["expressions"], g["seed"]), g["limit"])
    write_csv(path, rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate faces for the prompt table (one process of it).")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--lora-dir", type=Path, default=None, help="omit for the plain-SDXL baseline")
    parser.add_argument("--profile", default=None)
    parser.add_argument("--params", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    generate(**stage_params(args.profile, args.params), out_dir=args.out_dir, lora_dir=args.lora_dir)
    return 0


def write_metrics(manifests: dict[str, pd.DataFrame], path: Path) -> dict:
    """Rows, kept images and QC outcomes per variant, as a DVC metrics file."""
    metrics = {name: balance_report(m) for name, m in manifests.items()}
    for m in metrics.values():
        m.pop("never_passed")
    write_json(path, metrics)
    return metrics


# ------------------------------------------------------------------ figures


def image_grid(manifest: pd.DataFrame, out_dir: Path, columns: int = 4, save_to: Path | None = None):
    """A captioned grid of generated images (matplotlib figure); QC failures are marked."""
    import matplotlib.pyplot as plt
    from PIL import Image

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
