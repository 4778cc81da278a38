"""Table 1's tables and figures: the markdown and LaTeX tables with CIs, the paper's numbers beside ours,
the per-class table and heatmap. Used by the evaluate and ablation stages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

VARIANTS = ("finetuned", "baseline")
LABELS = {
    "baseline": "SDXL (baseline)",
    "finetuned": "GenEAva (fine-tuned)",
    "alpha0": "GenEAva, α = 0 (no L_exp)",
}
SHORT = {"baseline": "baseline", "finetuned": "fine-tuned", "alpha0": "α = 0"}
# metric -> (column title, True if higher is better)
METRICS = {"clip": ("CLIP", True), "dino": ("DINO", True), "lpips": ("LPIPS", False), "exp": ("Exp.", False)}
# docs/paper.md, Table 1 (the paper gives no confidence intervals)
PAPER_TABLE1 = {
    "SDXL": {"clip": 0.780, "dino": 0.738, "lpips": 0.658, "exp": 13.1},
    "GenEAva (ours)": {"clip": 0.799, "dino": 0.742, "lpips": 0.648, "exp": 12.6},
}


def per_class_table(classes: list[str], mats: dict) -> pd.DataFrame:
    """One row per class: each metric per variant and the difference (fine-tuned minus baseline)."""
    df = pd.DataFrame({"expression": classes})
    for m in METRICS:
        names = list(mats[m])
        for v in names:
            with np.errstate(invalid="ignore"):
                df[f"{m}_{v}"] = [np.nanmean(x) if np.isfinite(x).any() else np.nan for x in mats[m][v]]
        df[f"{m}_difference"] = df[f"{m}_{names[0]}"] - df[f"{m}_{names[1]}"]
    return df


def cell(s: dict, digits: int = 3, signed: bool = False) -> str:
    """mean [lo, hi]; `signed` for differences, so a positive one reads "+0.0017" as on results.md."""
    f = f"+.{digits}f" if signed else f".{digits}f"
    return f"{s['mean']:{f}} [{s['lo']:{f}}, {s['hi']:{f}}]"


def _rows(result: dict) -> list[tuple[str, list[str]]]:
    t = result["per_class_pairs"]
    first, second = result.get("variants", VARIANTS)
    name = lambda v: LABELS.get(v, v)  # noqa: E731
    rows = [(name(v), [cell(t[v][m]) for m in METRICS]) for v in (second, first)]
    diff = t["difference"]  # first minus second
    rows.append(
        (
            f"Δ {SHORT.get(first, first)} − {SHORT.get(second, second)}",
            [cell(diff[m], 4, True) for m in METRICS],
        )
    )
    rows += [
        (f"all pairs: {name(v)}", [f"{result['all_pairs'][v][m]:.3f}" for m in METRICS])
        for v in (second, first)
    ]
    return rows


def _paper(result: dict) -> list:
    """The paper's rows, shown beside the comparison they report (fine-tuned vs baseline) only."""
    return list(PAPER_TABLE1.items()) if tuple(result.get("variants", VARIANTS)) == VARIANTS else []


def table_markdown(result: dict) -> str:
    head = [f"{t} {'↑' if up else '↓'}" for t, up in METRICS.values()]
    level = round(100 * result["level"])
    lines = [
        f"Table 1: mean over {result['classes']} classes of per-class pairwise means, "
        f"[{level}% bootstrap CI].",
        "",
        "| Model | " + " | ".join(head) + " |",
        "|---" * (len(head) + 1) + "|",
    ]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in _rows(result)]
    lines += [f"| paper: {k} | " + " | ".join(f"{v[m]:g}" for m in METRICS) + " |" for k, v in _paper(result)]
    return "\n".join(lines + recognition_lines(result)) + "\n"


def recognition_lines(result: dict) -> list[str]:
    """Table 1's companion (ours, not the paper's): how often POSTER names the intended primary."""
    r = result.get("recognition")
    if not r:
        return []
    second_opinion = _recognition_line(result, r["second_opinion"]) if "second_opinion" in r else []
    if "skipped" in r:
        return ["", f"Recognition not measured: {r['skipped']}.", *second_opinion]
    return _recognition_line(result, r, "POSTER") + second_opinion


def _recognition_line(result: dict, r: dict, model: str | None = None) -> list[str]:
    """One recognizer's sentence: POSTER's, or the second opinion's (named by its `model`)."""
    first, second = result.get("variants", VARIANTS)
    pct = lambda s: f"{100 * s['mean']:.1f}% [{100 * s['lo']:.1f}, {100 * s['hi']:.1f}]"  # noqa: E731
    points = lambda s: f"{100 * s['mean']:+.1f} [{100 * s['lo']:+.1f}, {100 * s['hi']:+.1f}]"  # noqa: E731
    short = lambda v: SHORT.get(v, v)  # noqa: E731
    return [
        "",
        f"Recognition (↑): share of images for which {model or r['model']} names the intended primary "
        f"expression (one of six; chance {100 * r['chance']:.0f}%), mean over classes "
        f"[{round(100 * result['level'])}% CI]: {short(second)} {pct(r[second])}, "
        f"{short(first)} {pct(r[first])}, "
        f"Δ {short(first)} − {short(second)} {points(r['difference'])} points; "
        f"real evaluation faces {pct(r['eval'])}.",
    ]


def table_latex(result: dict) -> str:
    arrows = {True: "$\\uparrow$", False: "$\\downarrow$"}
    head = [f"{t} {arrows[up]}" for t, up in METRICS.values()]
    lines = [
        "\\begin{tabular}{l" + "c" * len(head) + "}",
        "\\toprule",
        "Model & " + " & ".join(head) + " \\\\",
        "\\midrule",
    ]
    for name, cells in _rows(result):
        name = name.replace("Δ", "$\\Delta$").replace("−", "$-$").replace("α", "$\\alpha$")
        lines.append(f"{name} & " + " & ".join(cells) + " \\\\")
    lines.append("\\midrule")
    lines += [
        f"Paper: {k} & " + " & ".join(f"{v[m]:g}" for m in METRICS) + " \\\\" for k, v in _paper(result)
    ]
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def beside_paper(result: dict) -> pd.DataFrame:
    """Our means next to the paper's numbers (rows: model, source; columns: metrics)."""
    t = result["per_class_pairs"]
    rows = []
    for ours, theirs in (("baseline", "SDXL"), ("finetuned", "GenEAva (ours)")):
        rows.append({"model": theirs, "source": "this run", **{m: t[ours][m]["mean"] for m in METRICS}})
        rows.append({"model": theirs, "source": "paper", **PAPER_TABLE1[theirs]})
    return pd.DataFrame(rows).set_index(["model", "source"])


def plot_per_class(
    per_class: pd.DataFrame, save_to: Path | None = None, title: str = "Fine-tuned − baseline per expression"
):
    """Heatmap of the per-class improvement of the fine-tuned model (positive = better), per metric
    scaled by its largest absolute value, annotated with the raw differences."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    diff = per_class.set_index("expression")[[f"{m}_difference" for m in METRICS]]
    diff.columns = [METRICS[m][0] for m in METRICS]
    better = diff * [1 if up else -1 for _, up in METRICS.values()]
    scale = better.abs().max().replace(0, 1)
    fig, ax = plt.subplots(figsize=(6, max(3, 0.22 * len(diff) + 1.5)))
    sns.heatmap(
        better / scale,
        annot=diff,
        fmt=".3f",
        cmap="RdBu",
        center=0,
        vmin=-1,
        vmax=1,
        ax=ax,
        cbar_kws={"label": "improvement (scaled per metric)"},
        annot_kws={"size": 6},
    )
    ax.set(title=title, xlabel="", ylabel="")
    fig.tight_layout()
    if save_to:
        fig.savefig(save_to, dpi=120)
    return fig
