"""The α = 0 ablation (beyond the paper): what the expression loss adds to the fine-tuning.

The same LoRA is fine-tuned with the diffusion loss alone (α = 0; every other setting as the finetune
stage's), renders the same prompt rows with the same seeds as the generate stage, and is compared on
Table 1's metrics, paired per class with bootstrap CIs, with the α > 0 model (what L_exp adds) and with
the baseline (what fine-tuning on captions alone gives).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from geneava.core import cli, config
from geneava.core.io import atomic_write_text, write_json
from geneava.stages import evaluate, finetune, generate, tables

LABEL = "alpha0"


def stage_params(profile: str | None, params_file: Path | None = None) -> dict:
    b = config.blocks(
        "models",
        "prompts",
        "prepare",
        "finetune",
        "generate",
        "evaluate",
        "ablation",
        profile=profile,
        path=params_file,
    )
    return b


def alpha_params(profile: str | None, params_file: Path | None, alpha: float, out_dir: Path) -> Path:
    """The params file with finetune.<profile>.alpha set to the ablation's: the fine-tune then runs as the
    finetune stage runs (under `accelerate launch` when num_processes > 1: the same processes, shards and
    all-reduce, so the two LoRAs differ in alpha alone)."""
    return config.with_overrides({"finetune.alpha": alpha}, profile, params_file, Path(out_dir) / "finetune")


def run(
    profile: str | None, prepare_dir: Path, generate_dir: Path, out_dir: Path, params_file: Path | None = None
) -> dict:
    """Fine-tune with α = ablation.alpha, generate, and write the two comparisons and a summary."""
    b = stage_params(profile, params_file)
    out_dir, generate_dir = Path(out_dir), Path(generate_dir)
    alpha = b["ablation"]["alpha"]
    if alpha == b["finetune"]["alpha"]:
        raise config.ParamsError(
            f"ablation.{profile or 'default'}.alpha equals finetune's alpha ({alpha}): nothing to compare"
        )
    history = finetune.run(
        profile, prepare_dir, out_dir / "finetune", alpha_params(profile, params_file, alpha, out_dir)
    )
    alpha0 = out_dir / "generate" / LABEL  # as the generate stage renders (sharded when num_processes > 1)
    generate.run(profile, out_dir / "finetune" / "lora", alpha0, params_file)
    results = {}
    for name, variants in (
        ("vs_finetuned", {"finetuned": generate_dir / "finetuned", LABEL: alpha0}),
        ("vs_baseline", {LABEL: alpha0, "baseline": generate_dir / "baseline"}),
    ):
        results[name] = evaluate.evaluate(
            b["models"],
            b["evaluate"],
            prepare_dir,
            generate_dir,
            out_dir / name,
            variants=variants,
            cache_dir=out_dir / "embeddings",
        )
    summary = summary_table(results, b["finetune"]["alpha"], alpha)
    level = round(100 * b["evaluate"]["level"])
    atomic_write_text(
        out_dir / "ablation.md", summary_markdown(summary, b["finetune"]["alpha"], alpha, level)
    )
    metrics = {name: r["result"]["per_class_pairs"]["difference"] for name, r in results.items()} | {
        "recognition": {
            name: r["result"].get("recognition", {}).get("difference") for name, r in results.items()
        },
        "alpha": alpha,
        "finetune_alpha": b["finetune"]["alpha"],
        "steps": len(history),
    }
    write_json(out_dir / "metrics.json", metrics)
    return {"results": results, "summary": summary, "history": history}


def summary_table(results: dict, alpha: float, ablated: float) -> pd.DataFrame:
    """One row per metric: the per-class means of the three models and the two paired differences."""
    full = results["vs_finetuned"]["result"]["per_class_pairs"]
    base = results["vs_baseline"]["result"]["per_class_pairs"]
    rows = []
    for m, (title, up) in tables.METRICS.items():
        rows.append(
            {
                "metric": f"{title} {'↑' if up else '↓'}",
                "baseline": base["baseline"][m]["mean"],
                f"α = {ablated:g}": full[LABEL][m]["mean"],
                f"α = {alpha:g}": full["finetuned"][m]["mean"],
                f"α = {alpha:g} − α = {ablated:g}": tables.cell(full["difference"][m], 4, True),
                f"α = {ablated:g} − baseline": tables.cell(base["difference"][m], 4, True),
            }
        )
    full_r = results["vs_finetuned"]["result"].get("recognition", {})
    base_r = results["vs_baseline"]["result"].get("recognition", {})
    if "difference" in full_r and "difference" in base_r:  # POSTER names the intended primary (evaluate)
        rows.append(
            {
                "metric": "Recognition ↑",
                "baseline": base_r["baseline"]["mean"],
                f"α = {ablated:g}": full_r[LABEL]["mean"],
                f"α = {alpha:g}": full_r["finetuned"]["mean"],
                f"α = {alpha:g} − α = {ablated:g}": tables.cell(full_r["difference"], 4, True),
                f"α = {ablated:g} − baseline": tables.cell(base_r["difference"], 4, True),
            }
        )
    return pd.DataFrame(rows).set_index("metric")


def summary_markdown(summary: pd.DataFrame, alpha: float, ablated: float, level: int = 95) -> str:
    return (
        f"Ablation: fine-tuning with α = {ablated:g} (diffusion loss only) against α = {alpha:g} "
        "(diffusion + expression loss) and the baseline; per-class means, differences with "
        f"[{level}% paired bootstrap CI].\n\n" + summary.to_markdown(floatfmt=".4f") + "\n"
    )


def side_by_side(
    generate_dir: Path,
    out_dir: Path,
    prepare_dir: Path | None = None,
    rows: int = 8,
    save_to: Path | None = None,
):
    """The same prompts (rows, spread over the table) from the baseline, α = 0 and the fine-tuned model;
    with `prepare_dir`, an Emo135 evaluation image of the row's class first: the intended expression."""
    import matplotlib.pyplot as plt
    from PIL import Image

    from geneava.core.images import read_split
    from geneava.stages import qc

    real = read_split(prepare_dir, "eval").groupby("expression")["path"].first() if prepare_dir else None
    folders = {
        "baseline": Path(generate_dir) / "baseline",
        "α = 0": Path(out_dir) / "generate" / LABEL,
        "fine-tuned": Path(generate_dir) / "finetuned",
    }
    manifests = {k: qc.generated(f.parent, f.name).set_index("row_id") for k, f in folders.items()}
    ids = list(manifests["baseline"].index)
    pick = [ids[int(i)] for i in np.linspace(0, len(ids) - 1, min(rows, len(ids))).round()]
    columns = (["Emo135 (real)"] if real is not None else []) + list(manifests)
    fig, axes = plt.subplots(
        len(pick), len(columns), figsize=(1.6 * len(columns), 1.6 * len(pick)), squeeze=False
    )
    for r, row_id in enumerate(pick):
        expression = manifests["baseline"].loc[row_id, "expression"]
        for c, name in enumerate(columns):
            ax = axes[r][c]
            path = real.get(expression) if name == "Emo135 (real)" else manifests[name].loc[row_id, "path"]
            if path is not None:
                with Image.open(path) as im:
                    ax.imshow(im.convert("RGB"))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(expression, fontsize=8)
    fig.tight_layout()
    if save_to:
        fig.savefig(save_to, dpi=120)
    return fig


def main(argv: list[str] | None = None) -> int:
    return cli.stage_main(run, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
