"""docs/results.md, generated from the reference run's committed metrics: the one page that states numbers.

    python -m geneava.tools.results            # rewrite docs/results.md (and README's results block) from
                                         # reference/metrics/ and models/world/report.json
    python -m geneava.tools.results --check    # exit 1 when either is not what the metrics give
    python -m geneava.tools.results --headline # this run's headline results (outputs/), as `make repro` ends

Every number on the page is read from a metrics file (`reference/metrics/outputs/<stage>/metrics.json`,
`models/world/report.json`, `reference/metrics/machine.json`); prose elsewhere points here or to the
metrics keys, never copies a number. A test fails when the page and the metrics disagree.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from geneava.core import config
from geneava.tools.reference import REFERENCE

PAGE = Path("docs") / "results.md"
WORLD_REPORT = Path("models") / "world" / "report.json"
METRIC_NAMES = {"clip": "CLIP ↑", "dino": "DINOv2 ↑", "lpips": "LPIPS ↓", "exp": "Exp ↓"}


def _ci(node: dict, digits: int = 4, scale: float = 1.0, sign: bool = False) -> str:
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    mean, lo, hi = (node[k] * scale for k in ("mean", "lo", "hi"))
    return f"{f.format(mean)} [{f.format(lo)}, {f.format(hi)}]"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _load(root: Path, stage: str, name: str = "metrics.json", run: Path = REFERENCE) -> dict:
    """A stage's metrics file of the reference run (run=REFERENCE) or of this workspace's run (run=".")."""
    path = root / run / "outputs" / stage / name
    if not path.is_file():
        what = "`python -m geneava.tools.reference update`" if run == REFERENCE else f"the {stage} stage"
        raise FileNotFoundError(f"{path} not found: {what} writes it")
    return json.loads(path.read_text())


def _table1(ev: dict) -> list[str]:
    """Table 1 with its CIs, and the recognition line (evaluate's metrics.json)."""
    out = ["| metric | fine-tuned | baseline | difference |", "|---|---|---|---|"]
    pc = ev["per_class_pairs"]
    for key, name in METRIC_NAMES.items():
        out.append(
            f"| {name} | {_ci(pc['finetuned'][key])} | {_ci(pc['baseline'][key])} | "
            f"{_ci(pc['difference'][key], sign=True)} |"
        )
    rec = ev["recognition"]
    return out + [
        "",
        f"Recognition (POSTER names the intended {rec['level']} expression; chance {_pct(rec['chance'])}): "
        f"{_recognition(rec)}",
    ]


def _recognition(rec: dict) -> str:
    return (
        f"fine-tuned {_ci(rec['finetuned'], 1, 100)}%, baseline {_ci(rec['baseline'], 1, 100)}%, "
        f"difference {_ci(rec['difference'], 1, 100, sign=True)} points; the evaluation set's "
        f"own faces {_ci(rec['eval'], 1, 100)}%."
    )


def _model_line(ev: dict) -> str:
    """Which networks measured Table 1's columns (evaluate's metrics.json records its sources)."""
    models = ev.get("models")
    if not models:
        return "The metrics do not record which networks measured CLIP, DINOv2 and LPIPS."

    def said(key: str) -> str:
        source = str(models[key])
        if source in ("tiny", "random"):
            return "seeded random weights of the same architecture (testing the machinery, not perception)"
        if source.endswith("lpips-alexnet.ckpt"):
            return "the real ImageNet AlexNet with LPIPS v0.1's heads (fetched by setup, docs/pretrained.md)"
        return f"`{source}`"

    names = {"clip": "CLIP", "dino": "DINOv2", "lpips": "LPIPS"}
    groups: dict[str, list[str]] = {}
    for key, name in names.items():
        groups.setdefault(said(key), []).append(name)
    return "; ".join(f"{' and '.join(who)}: {what}" for what, who in groups.items()) + "."


def readme_block(root: Path) -> str:
    """The README's "What the default run shows" table: Table 1 and recognition, as on results.md."""
    ev = _load(root, "evaluate")
    return "\n".join(
        [
            f"Table 1 on the miniature world (per-class pairing, {ev['level']:.0%} paired bootstrap CIs):",
            "",
            *_table1(ev),
            "",
            _model_line(ev),
        ]
    )


BEGIN, END = "<!-- results:begin", "<!-- results:end -->"


def with_block(readme: str, block: str) -> str:
    """`readme` with the text between its results markers replaced by `block`."""
    if BEGIN not in readme or END not in readme:
        raise KeyError(f"README.md lacks the markers {BEGIN} ... {END}")
    head, rest = readme.split(BEGIN, 1)
    marker_line, _ = rest.split("\n", 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}{marker_line}\n{block}\n{END}{tail}"


def render(root: Path) -> str:
    """The page's text, from the committed metrics alone (deterministic: same files, same bytes)."""
    machine = json.loads((root / REFERENCE / "machine.json").read_text())
    ev, ab = _load(root, "evaluate"), _load(root, "ablation")
    gen, ft, prep = _load(root, "generate"), _load(root, "finetune"), _load(root, "prepare")
    mem, sty = _load(root, "memorization"), _load(root, "stylize")
    rel, ref = _load(root, "release"), _load(root, "refill", "report.json")
    world = json.loads((root / WORLD_REPORT).read_text())
    level = ev["level"]
    out = [
        "# Results of the reference run",
        "",
        "<!-- generated by `python -m geneava.tools.results` from reference/metrics/ and",
        "     models/world/report.json; do not edit: a test checks this page against the metrics -->",
        "",
        f"Default profile (the miniature world), run on {machine['date']} on {machine['machine']} with "
        f"{machine['threads']} threads (torch {machine['torch']}).",
    ]
    if machine.get("repro_seconds"):
        s = int(machine["repro_seconds"])
        out.append(
            f"`make repro` from a fresh clone with empty package caches, venv included, took "
            f"{s // 60} min {s % 60:02d} s."
        )
    out += [
        "`make compare` checks your run against these numbers: identical on the same machine and thread",
        f"count; elsewhere every estimate must fall inside the {level:.0%} intervals below.",
        "",
        "## Table 1: fine-tuned vs plain base model on the same prompts and seeds",
        "",
        f"Per-class pairing, means with paired bootstrap {level:.0%} CIs over expressions "
        f"({ev['classes']} classes; `outputs/evaluate/metrics.json`).",
        "",
    ]
    second = ev["recognition"].get("second_opinion")
    out += _table1(ev) + [
        "",
        _model_line(ev),
        "",
        *(
            [
                f"Second opinion: {second['model']}, naming the intended {second['level']} expression "
                f"(chance {_pct(second['chance'])}): {_recognition(second)}",
                "",
            ]
            if second
            else []
        ),
        f"## Ablation: α = {ab['alpha']} against α = {ab['finetune_alpha']} (same steps, prompts, seeds)",
        "",
        "| metric | α=1 − α=0 | α=0 − baseline |",
        "|---|---|---|",
    ]
    for key, name in METRIC_NAMES.items():
        out.append(
            f"| {name} | {_ci(ab['vs_finetuned'][key], sign=True)} | "
            f"{_ci(ab['vs_baseline'][key], sign=True)} |"
        )
    out.append(
        f"| recognition (points) | {_ci(ab['recognition']['vs_finetuned'], 1, 100, sign=True)} | "
        f"{_ci(ab['recognition']['vs_baseline'], 1, 100, sign=True)} |"
    )
    out += [
        "",
        "## Counts through the pipeline",
        "",
        "| stage | numbers |",
        "|---|---|",
        f"| prepare | {prep['files']} files → {prep['finetune_images']} fine-tuning and "
        f"{prep['eval_images']} evaluation images over {prep['classes']} classes |",
        f"| finetune | {ft['steps']} steps on {ft['images']} images, final loss {ft['final_loss']:.4f} "
        f"(last epoch: L_dm {ft['mean_loss_dm_last_epoch']:.4f}, "
        f"L_exp {ft['mean_loss_exp_last_epoch']:.4f}); "
        f"LoRA sha256 `{ft['lora_sha256'][:16]}…` |",
    ]
    for variant in ("finetuned", "baseline"):
        g = gen[variant]
        dropped = ", ".join(f"{n} {why}" for why, n in sorted(g["qc"].items()) if why != "pass") or "none"
        out.append(
            f"| generate ({variant}) | {g['kept']} of {g['rows']} rows kept by QC ({dropped}); "
            f"{g['retried_rows']} rows retried |"
        )
    out += [
        f"| memorization | removal rule `{mem['removal_rule']}`: {mem['removed_images']} of "
        f"{mem['generated_images']} faces removed; same person under the paper's {mem['threshold']}: "
        f"{mem['finetune']['same_paper']} (fine-tuning set), "
        f"{mem['reference']['same_paper']} (reference set); "
        f"under the derived threshold {mem['derived']['threshold']:.3f}: {mem['finetune']['same_derived']} "
        f"and {mem['reference']['same_derived']}; excess over reference "
        f"{_ci(mem['excess_over_reference']['difference'], 1, 100, sign=True)} points |",
        f"| stylize ({sty['stylizer']}) | {sty['pairs']} pairs: identity kept "
        f"{_pct(sty['identity_kept_share'])} "
        f"(mean cosine {sty['identity_similarity_mean']:.3f}), expression agrees "
        f"{_pct(sty['expression_agreement_share'])}; {sty['flagged']} flagged |",
        f"| refill | {ref['rows_excluded']} rows excluded ("
        + ", ".join(f"{n} {why}" for why, n in sorted(ref["by_reason"].items()))
        + f"), {ref['refilled']} refilled from {ref['attempts_rendered']} candidates, "
        f"{ref['given_up']} given up |",
        f"| release | {rel['images']} pairs in {rel['cells']} cells ({rel['balance']} balance, "
        f"{rel['cells_off']} off) |",
        "",
        "## The miniature world's models (`models/world/report.json`, frozen)",
        "",
        "| model | checked on (held out) | held-out check |",
        "|---|---|---|",
        f"| base model (VAE) | {world['vae']['images']} images | PSNR {world['vae']['heldout_psnr_db']} dB |",
        f"| base model (UNet) | {world['base']['images']} images, {world['base']['steps']} steps | "
        f"final loss {world['base']['final_loss']:.4f} |",
        f"| POSTER stand-in | {world['expression']['images']} images | class accuracy "
        f"{_pct(world['expression']['heldout_accuracy'])} (chance {_pct(world['expression']['chance'])}), "
        f"primary {_pct(world['expression']['heldout_primary_accuracy'])} |",
        f"| ArcFace stand-in | {world['identity']['people']} people | true accepts "
        f"{_pct(world['identity']['true_accept_rate'])}, false accepts "
        f"{_pct(world['identity']['false_accept_rate'])} at {world['identity']['threshold']} |",
        f"| RetinaFace stand-in | {world['detector']['images']} images, {world['detector']['faces']} faces | "
        f"recall {_pct(world['detector']['heldout_recall'])}, right face count "
        f"{_pct(world['detector']['right_count_share'])} |",
        "",
    ]
    return "\n".join(out)


FIGURES = [
    ("loss curves", "outputs/finetune/loss.png"),
    ("base model vs LoRA, same seeds", "outputs/finetune/before_after.png"),
    ("fine-tuned renders", "outputs/generate/grid.png"),
    ("Exp difference per expression", "outputs/evaluate/per_class.png"),
    ("ablation side by side", "outputs/ablation/side_by_side.png"),
    ("faces and avatars", "outputs/stylize/pairs.png"),
    ("the release (Figure 2)", "outputs/release/figure2.png"),
]


def headline(root: Path) -> str:
    """A short block of the run's headline results for a terminal (what `make repro` ends with): Table 1
    with CIs, recognition, the ablation, QC, refill and release counts, and where the figures are."""
    run = Path(".")
    ev, ab = _load(root, "evaluate", run=run), _load(root, "ablation", run=run)
    gen, rel = _load(root, "generate", run=run), _load(root, "release", run=run)
    ref = _load(root, "refill", "report.json", run=run)
    exp, rec = ab["vs_finetuned"]["exp"], ab["recognition"]["vs_finetuned"]
    qc = "; ".join(f"{v} {gen[v]['kept']} of {gen[v]['rows']} kept" for v in ("finetuned", "baseline"))
    figures = [f"  {what}: {path}" for what, path in FIGURES if (root / path).is_file()]
    return "\n".join(
        [
            f"== Headline results ({ev['classes']} expressions, {ev['level']:.0%} paired bootstrap CIs) ==",
            "",
            *_table1(ev),
            "",
            f"Ablation (alpha {ab['finetune_alpha']} - alpha {ab['alpha']}): Exp {_ci(exp, sign=True)}, "
            f"recognition {_ci(rec, 1, 100, sign=True)} points",
            f"QC: {qc}. Refill: {ref['refilled']} of {ref['rows_excluded']} excluded rows refilled, "
            f"{ref['given_up']} given up. Release: {rel['images']} pairs in {rel['cells']} cells "
            f"({rel['balance']}, {rel['cells_off']} off).",
            "",
            "Figures:",
            *(figures or ["  (none found under outputs/)"]),
            "Everything else: outputs/evaluate/table1.md, `dvc metrics show --md`, `dvc plots show`,",
            "`make compare` (this run against the reference run); README, 'After make repro'.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write docs/results.md from the reference run's metrics.")
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/results.md is out of date")
    parser.add_argument("--headline", action="store_true", help="print this run's headline results")
    args = parser.parse_args(argv)
    root = config.project_root()
    if args.headline:
        try:
            print(headline(root))
        except (FileNotFoundError, KeyError) as e:
            print(f"error: no headline results: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        text = render(root)
        readme = with_block((root / "README.md").read_text(), readme_block(root))
    except (FileNotFoundError, KeyError) as e:
        print(f"error: cannot render the results: {e!r}", file=sys.stderr)
        return 2
    pages = {root / PAGE: text, root / "README.md": readme}
    if args.check:
        stale = [p.name for p, t in pages.items() if not p.is_file() or p.read_text() != t]
        if stale:
            print(f"out of date: {', '.join(stale)}: run `python -m geneava.tools.results`", file=sys.stderr)
            return 1
        return 0
    from geneava.core.io import atomic_write_text

    for page, t in pages.items():
        atomic_write_text(page, t)
        print(f"wrote {page.relative_to(root)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
