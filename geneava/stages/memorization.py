"""Identity memorization audit (paper, "Identity memorization").

Every generated face (fine-tuned model) is compared with every fine-tuning image and with a reference
set of other people (CelebA in the paper: one random image per identity) by identity embedding; each
generated face's nearest neighbour in each set is found by blocked matrix products. Calls of "same
identity" are counted under every rule that applies:
- `paper`: cosine similarity > threshold (0.68), as the paper states it;
- `deepface`: the same number read as deepface does, a cosine *distance* (similarity >= 1 - 0.68);
- `model`: the identity model's own rule where it has one (dlib: Euclidean distance < 0.6);
- `derived`: a threshold found from labelled same/different pairs by the C4.5 information-gain-ratio
  split (LightFace), when `derive` names pairs.
Generated images called the same as anyone under `removal_rule` go to `removal.csv`, which the release
honours; `review.csv` lists the closest pairs for a human check (the paper's 50 + 50).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from geneava.core import cli, config
from geneava.core.images import read_split
from geneava.core.io import atomic_write_text, sha256_file, write_csv, write_json
from geneava.networks import identity
from geneava.stages import qc

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def stage_params(profile: str | None, params_file: Path | None = None) -> dict:
    return config.stage_params("memorization", profile, params_file)


# ------------------------------------------------------------------ the image sets


def reference_set(params: dict, prepare_dir: Path, root: Path) -> tuple[pd.DataFrame, str]:
    """The reference people: a local CelebA (one seeded random image per identity when the identity file
    is given), or, without one, the Emo135 evaluation split. Returns (rows with `path`, description)."""
    if params["reference"] is None:
        ev = read_split(prepare_dir, "eval")
        return ev[["path", "sha256"]].assign(
            name=ev["file"]
        ), "Emo135 evaluation split (no reference set given)"
    folder = config.path(params["reference"], root)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"memorization reference folder {folder} not found: point memorization.<profile>.reference at a "
            "local CelebA img_align_celeba folder, or set it to null"
        )
    if params["reference_identities"]:
        ids_file = config.path(params["reference_identities"], root)
        ids = pd.read_csv(ids_file, sep=r"\s+", header=None, names=["name", "identity"], dtype=str)
        ids = ids[[(folder / n).is_file() for n in ids["name"]]]
        if ids.empty:
            raise ValueError(f"{ids_file}: none of its images is in {folder}")
        # one random image per identity (the paper: 10,177 identities, one image each)
        ids = (
            ids.sample(frac=1.0, random_state=params["seed"]).drop_duplicates("identity").sort_values("name")
        )
        names = ids["name"].tolist()
        what = f"{folder} ({len(names)} identities, one image each)"
    else:
        names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        what = f"{folder} ({len(names)} images)"
    if params["reference_limit"] and len(names) > params["reference_limit"]:
        names = names[: params["reference_limit"]]
        what = f"{what}; the first {len(names)} searched (reference_limit)"
    rows = pd.DataFrame({"name": names, "path": [str(folder / n) for n in names]})
    rows["sha256"] = [sha256_file(Path(p)) for p in rows["path"]]
    return rows, what


def labelled_pairs(params: dict, root: Path, out_dir: Path) -> pd.DataFrame | None:
    """Same/different identity pairs for the derived threshold, from a CSV with columns path_a, path_b,
    same (paths relative to the CSV): e.g. LFW's pairs, or the world's (data/pairs/identity.csv, written
    with the stand-in by `python -m geneava.world.dataset`, identities known exactly)."""
    source = params["derive"]
    if source == "none":
        return None
    csv = config.path(source, root)
    if not csv.is_file():
        raise FileNotFoundError(f"labelled pairs {csv} not found (memorization.<profile>.derive)")
    pairs = pd.read_csv(csv)
    missing = {"path_a", "path_b", "same"} - set(pairs.columns)
    if missing:
        raise ValueError(f"{csv}: missing columns {sorted(missing)} (need path_a, path_b, same)")
    for col in ("path_a", "path_b"):
        pairs[col] = [str((csv.parent / p).resolve()) for p in pairs[col]]
    pairs["same"] = pairs["same"].astype(str).str.lower().isin(["1", "true", "yes"])
    return pairs


# ------------------------------------------------------------------ the audit


def removal_rule(params: dict, own: tuple | None) -> str:
    auto = "model" if own is not None else "paper"  # the model's own rule where it has one
    return auto if params["removal_rule"] == "auto" else params["removal_rule"]


def audit_sets(params: dict, prepare_dir: Path, generate_dir: Path, root: Path):
    """The generated faces to audit and the two sets to search (fine-tuning, reference), with how the
    reference set was chosen; an empty one stops with what to do."""
    gen = qc.generated(generate_dir, "finetuned", params["include"])
    if gen.empty:
        raise ValueError(
            "no generated image to audit (none passed QC): render more rows, or set "
            "memorization.<profile>.include: all"
        )
    ft = read_split(prepare_dir, "finetune")
    ref, ref_what = reference_set(params, prepare_dir, root)
    sets = {"finetune": ft.assign(name=ft["file"]), "reference": ref}
    for name, rows in sets.items():
        if rows.empty:
            raise ValueError(f"the {name} set is empty: nothing to compare the generated faces with")
    return gen, sets, ref_what


def nearest_neighbours(gen, emb_gen, sets, emb, params, own, derived_t) -> tuple[pd.DataFrame, dict]:
    """Each generated face's nearest neighbour in each set, with the same-identity call of every rule
    (one column per set and rule), and per set the counts and similarity summaries."""
    nn = gen[["row_id", "file", "expression"]].copy()
    nn["face_found"] = emb_gen["face_found"].numpy()
    summary = {}
    for name, rows in sets.items():
        sim, idx, dist, calls = identity.same_calls(
            emb_gen["embedding"], emb[name]["embedding"], params["threshold"], own, derived_t, params
        )
        nn[f"{name}_similarity"] = sim.numpy()
        nn[f"{name}_match"] = rows["name"].to_numpy()[idx.numpy()]
        nn[f"{name}_match_path"] = rows["path"].to_numpy()[idx.numpy()]
        if dist is not None:
            nn[f"{name}_distance"] = dist.numpy()
        for rule, call in calls.items():
            nn[f"{name}_same_{rule}"] = call.numpy()
        summary[name] = {
            "images": len(rows),
            "mean_nn_similarity": float(sim.mean()),
            "max_nn_similarity": float(sim.max()),
            **{f"same_{rule}": int(call.sum()) for rule, call in calls.items()},
        }
    return nn, summary


def removal_list(nn: pd.DataFrame, sets: list[str], rule: str) -> pd.DataFrame:
    """The generated faces the removal rule calls the same person as someone in either set."""
    flagged = []
    for name in sets:
        hit = nn[nn[f"{name}_same_{rule}"]]
        flagged.append(
            pd.DataFrame(
                {
                    "row_id": hit["row_id"],
                    "file": hit["file"],
                    "reference_set": name,
                    "match": hit[f"{name}_match"],
                    "similarity": hit[f"{name}_similarity"],
                    "rule": rule,
                }
            )
        )
    return pd.concat(flagged, ignore_index=True).sort_values(["row_id", "reference_set"])


def audit(params: dict, prepare_dir: Path, generate_dir: Path, out_dir: Path, root: Path, model=None) -> dict:
    """Nearest neighbours of every generated face in the fine-tuning and reference sets, the counts under
    every rule, the removal list and the review sheet. Writes into `out_dir` (write_audit)."""
    out_dir = Path(out_dir)
    model = model or identity.identity_model(
        params["identity"], params["identity_root"], params["identity_pack"]
    )
    cache = out_dir / "embeddings"
    gen, sets, ref_what = audit_sets(params, prepare_dir, generate_dir, root)
    emb_gen = identity.cached_embeddings(model, "generated", gen, cache)
    emb = {k: identity.cached_embeddings(model, k, rows, cache) for k, rows in sets.items()}
    pairs = labelled_pairs(params, root, out_dir)
    scores = identity.pair_similarities(model, pairs, cache) if pairs is not None else None
    derived = at_scale(identity.threshold_of(*scores) if scores else None, emb["reference"], params, scores)
    own = model.own_rule
    derived_t = derived["threshold"] if derived is not None else None
    nn, summary = nearest_neighbours(gen, emb_gen, sets, emb, params, own, derived_t)
    rule = removal_rule(params, own)
    if f"finetune_same_{rule}" not in nn:
        raise ValueError(
            f"memorization removal_rule '{rule}' does not apply here (identity model {model.name}, "
            f"derive: {params['derive']}); use one of paper, deepface" + (", model" if own else "")
        )
    removal = removal_list(nn, list(sets), rule)
    faces_not_found = {
        "generated": int((~emb_gen["face_found"]).sum()),
        **{k: int((~e["face_found"]).sum()) for k, e in emb.items()},
    }
    found = {"nearest": nn, "removal": removal, "summary": summary, "derived": derived, "rule": rule}
    return write_audit(out_dir, params, model, gen, found, ref_what, faces_not_found, root)


def at_scale(derived: dict | None, ref: dict, params: dict, scores: tuple | None = None) -> dict | None:
    """The derived threshold checked at the scale of the search. The labelled pairs put it between one
    same and one different pair, but each generated face meets N people, and the nearest of N strangers is
    far closer than one. With the reference's identities labelled (a CelebA-style folder, one image per
    person), each one's nearest *other* person shows how often the threshold calls strangers the same; it
    rises (never falls) until at most `stranger_rate` are. `scores`: the pairs, judged at the final value."""
    rate, found = params.get("stranger_rate"), ref["embedding"][ref["face_found"]]
    labelled = rate is not None and params["reference"] and params["reference_identities"] and len(found) > 1
    if not labelled or not derived or derived.get("threshold") is None:
        return derived
    sim = identity.nearest(found, found, "cosine", params["block"], exclude_self=True)[0].numpy()
    allowed = int(np.floor(rate * len(sim) + 1e-9))  # reference people that may match another one
    top, n = np.sort(sim)[::-1], len(sim)
    if allowed < n and top[allowed] >= 1 - 1e-9:
        raise ValueError(
            f"{np.sum(top >= 1 - 1e-9)} of the reference's {n} people have an identical other (copies?), "
            f"more than stranger_rate {rate:g}: remove the copies, or raise stranger_rate (null: off)"
        )
    t = max(pt := derived["threshold"], float(np.nextafter(top[allowed], 2)) if allowed < n else -1.0)
    out = derived | {"pairs_threshold": pt, "strangers": n, "stranger_rate": rate, "threshold": t}
    out["strangers_same_at_pairs_threshold"] = float((sim >= pt).mean())
    if scores is not None:  # the labelled pairs at the value in use (pairs_accuracy: at the split)
        cos, same = scores
        out |= {"pairs_accuracy": derived["accuracy"], "accuracy": float(((cos >= t) == same).mean())}
        out["same_pairs_called_same"] = float((cos[same] >= t).mean())
    return out


def write_audit(out_dir, params, model, gen, found, ref_what, faces_not_found, root) -> dict:
    """nearest.csv, removal.csv, review.csv, nn_histogram.csv, metrics.json, report.json, summary.md."""
    nn, removal, derived, rule = found["nearest"], found["removal"], found["derived"], found["rule"]
    sets = [k for k in found["summary"]]
    t, own = params["threshold"], model.own_rule
    write_csv(out_dir / "nearest.csv", nn.drop(columns=[c for c in nn if c.endswith("_match_path")]))
    write_csv(out_dir / "removal.csv", removal)
    write_csv(out_dir / "review.csv", review_pairs(nn, sets, params["review_pairs"], root))
    write_csv(out_dir / "nn_histogram.csv", histogram(nn, sets))
    metrics = {
        "identity_model": model.name,
        "threshold": t,
        "removal_rule": rule,
        "removed_images": int(removal["row_id"].nunique()),
        "generated_images": len(gen),
        "excess_over_reference": excess_over_reference(nn, rule, seed=params["seed"]),
        **found["summary"],
        **({"derived": derived} if derived else {}),
    }
    write_json(out_dir / "metrics.json", metrics)
    report = {
        "identity_model": model.name,
        "model_rule": f"{own[0]} distance < {own[1]}" if own else None,
        "include": params["include"],
        "reference": ref_what,
        "faces_not_found": faces_not_found,
        "rules": {
            "paper": f"cosine similarity > {t}",
            "deepface": f"cosine distance <= {t} (similarity >= {1 - t:.2f})",
            **({"model": f"{own[0]} distance < {own[1]}"} if own else {}),
            **_derived_rule(derived),
        },
        "paper": {"finetune_mean_nn_similarity": 0.39, "reference_mean_nn_similarity": 0.47, "above_0.68": 0},
    }
    write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "summary.md", summary_markdown(metrics, report))
    return {"nearest": nn, "removal": removal, "metrics": metrics, "report": report}


def _derived_rule(derived: dict | None) -> dict:
    """The derived rule as the report states it; a derivation that failed (not fatal) says why."""
    if not derived:
        return {}
    if (t := derived.get("threshold")) is None:
        return {"derived": f"not available: {derived.get('error', 'no threshold')}"}
    how, n, pt = "C4.5 split", derived.get("strangers"), derived.get("pairs_threshold")
    if pt is not None:
        share = f"{100 * derived['strangers_same_at_pairs_threshold']:.1f}% of the reference's {n} people"
        rate = f"{100 * derived['stranger_rate']:g}%"
        how = f"C4.5 split; at it {share} match another of them"
        if t != pt:
            how = f"the C4.5 split {pt:.4f} calls {share} the same as another; raised until at most {rate} do"
        if "same_pairs_called_same" in derived:
            how += f"; {100 * derived['same_pairs_called_same']:.0f}% of the labelled same pairs reach it"
    return {"derived": f"cosine similarity >= {t:.4f} ({how})"}


def run(
    profile: str | None, prepare_dir: Path, generate_dir: Path, out_dir: Path, params_file: Path | None = None
):
    root = config.project_root()
    return audit(stage_params(profile, params_file), prepare_dir, generate_dir, out_dir, root)


def review_pairs(nn: pd.DataFrame, sets: list[str], n: int, root: Path | None = None) -> pd.DataFrame:
    """The `n` closest pairs per set, for people to judge (the paper's user study: 50 + 50); the
    `same_person` column is theirs to fill. `match_path`: the match's image, relative to `root` when
    it lies inside it (so the file is the same on every machine)."""

    def rel(p: str) -> str:
        return (
            os.path.relpath(p, root) if root and Path(p).resolve().is_relative_to(Path(root).resolve()) else p
        )

    def sheet(name: str, top: pd.DataFrame) -> pd.DataFrame:
        out = pd.DataFrame({"reference_set": name, "generated": top["file"], "match": top[f"{name}_match"]})
        path, sim = [rel(p) for p in top[f"{name}_match_path"]], top[f"{name}_similarity"]
        return out.assign(match_path=path, similarity=sim, same_person="")

    return pd.concat([sheet(s, nn.nlargest(n, f"{s}_similarity")) for s in sets], ignore_index=True)


def histogram(nn: pd.DataFrame, sets: list[str], bins: int = 40) -> pd.DataFrame:
    """Counts of nearest-neighbour similarities per set on common bins over [-1, 1] (a DVC plot)."""
    edges = np.linspace(-1, 1, bins + 1)
    out = pd.DataFrame({"similarity": np.round((edges[:-1] + edges[1:]) / 2, 4)})
    for name in sets:
        out[name] = np.histogram(nn[f"{name}_similarity"], edges)[0]
    return out


def excess_over_reference(
    nn: pd.DataFrame, rule: str, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict:
    """Is the generator closer to the people it was fine-tuned on than to people it never saw? The
    share of generated faces `rule` calls the same as someone in the fine-tuning set, minus the share it
    calls the same as someone in the reference set, with a percentile bootstrap over generated faces
    (paired: each face has a call against both). A rule that calls look-alikes "the same" flags both sets
    alike; copies of fine-tuning people show as a positive excess. Fair when the two sets are of similar
    size (in a larger set the nearest neighbour is closer), which the report states beside it."""
    a = nn[f"finetune_same_{rule}"].to_numpy(dtype=float)
    b = nn[f"reference_same_{rule}"].to_numpy(dtype=float)
    d = a - b
    draws = d[np.random.default_rng(seed).integers(len(d), size=(n_boot, len(d)))].mean(1)
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return {
        "rule": rule,
        "finetune": float(a.mean()),
        "reference": float(b.mean()),
        "difference": {"mean": float(d.mean()), "lo": float(lo), "hi": float(hi)},
        "level": level,
    }


def summary_markdown(metrics: dict, report: dict) -> str:
    rules = [r for r in ("paper", "deepface", "model", "derived") if f"same_{r}" in metrics["finetune"]]
    lines = [
        f"Identity model: {metrics['identity_model']}; reference: {report['reference']}.",
        "",
        "| set | images | mean NN sim. | max NN sim. | " + " | ".join(f"same ({r})" for r in rules) + " |",
        "|---" * (4 + len(rules)) + "|",
    ]
    for name in ("finetune", "reference"):
        s = metrics[name]
        lines.append(
            f"| {name} | {s['images']} | {s['mean_nn_similarity']:.3f} | {s['max_nn_similarity']:.3f} | "
            + " | ".join(str(s[f"same_{r}"]) for r in rules)
            + " |"
        )
    lines += [
        "",
        "Rules: " + "; ".join(f"{k}: {v}" for k, v in report["rules"].items()) + ".",
        f"Removed under '{metrics['removal_rule']}': {metrics['removed_images']} of "
        f"{metrics['generated_images']} generated images.",
        "Paper (ArcFace): mean NN similarity 0.39 (fine-tuning set), 0.47 (CelebA); none above 0.68.",
    ]
    ex = metrics.get("excess_over_reference")
    if ex:
        d, pct = ex["difference"], lambda v: f"{100 * v:.1f}%"  # noqa: E731
        lines += [
            "",
            f"Copies or look-alikes? Under '{ex['rule']}', {pct(ex['finetune'])} of generated faces match "
            f"someone in the fine-tuning set and {pct(ex['reference'])} someone in the reference set "
            f"(sets of {metrics['finetune']['images']} and {metrics['reference']['images']} images; the "
            f"reference people were never seen): excess {100 * d['mean']:+.1f} points "
            f"[{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}] ({round(100 * ex['level'])}% bootstrap CI). "
            "Memorized fine-tuning identities would show as a positive excess.",
        ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ figures


def plot_histograms(nn: pd.DataFrame, metrics: dict, save_to: Path | None = None):
    """Nearest-neighbour similarity per reference set, with every threshold in use marked."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    long = pd.concat(
        [pd.DataFrame({"similarity": nn[f"{s}_similarity"], "set": s}) for s in ("finetune", "reference")]
    )
    fig, ax = plt.subplots(figsize=(7, 3.5))
    sns.histplot(long, x="similarity", hue="set", bins=30, element="step", ax=ax)
    t = metrics["threshold"]
    marks = {f"paper: > {t}": t, f"deepface: >= {1 - t:.2f}": 1 - t}
    if metrics.get("derived", {}).get("threshold") is not None:
        marks[f"derived: >= {metrics['derived']['threshold']:.2f}"] = metrics["derived"]["threshold"]
    for (label, x), style in zip(marks.items(), ("--", ":", "-."), strict=False):
        ax.axvline(x, color="k", linestyle=style, label=label)
    ax.legend(fontsize=7)
    ax.set(title=f"Nearest-neighbour identity similarity ({metrics['identity_model']})", xlabel="cosine")
    fig.tight_layout()
    if save_to:
        fig.savefig(save_to, dpi=120)
    return fig


def closest_pairs_sheet(nn: pd.DataFrame, generate_dir: Path, k: int = 8, save_to: Path | None = None):
    """The `k` closest pairs per set: generated face above, its nearest neighbour below."""
    import matplotlib.pyplot as plt
    from PIL import Image

    sets = ("finetune", "reference")
    fig, axes = plt.subplots(4, k, figsize=(1.5 * k, 6.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for s_i, name in enumerate(sets):
        top = nn.nlargest(k, f"{name}_similarity")
        for j, row in enumerate(top.itertuples()):
            gen_ax, ref_ax = axes[2 * s_i, j], axes[2 * s_i + 1, j]
            gen_ax.imshow(Image.open(Path(generate_dir) / "finetuned" / row.file))
            gen_ax.set_title(f"{getattr(row, f'{name}_similarity'):.2f}", fontsize=7)
            ref_ax.imshow(Image.open(getattr(row, f"{name}_match_path")))
            ref_ax.set_title(name, fontsize=6)
    fig.suptitle("Closest pairs: generated (upper) and nearest neighbour (lower)", fontsize=9)
    fig.tight_layout()
    if save_to:
        fig.savefig(save_to, dpi=120)
    return fig


def main(argv: list[str] | None = None) -> int:
    return cli.stage_main(run, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
