"""Stylization (paper, "Stylization"): every realistic face becomes an avatar, and we measure what it kept.

The stylizers (cartoon, dctnet, sdxl_img2img, passthrough) are in `geneava.networks.stylizers`.

Preservation (the paper asked people; here it is also measured): identity = cosine similarity of identity
embeddings (ArcFace, or dlib offline) between each face and its avatar; expression = distance between
POSTER embeddings and agreement of POSTER's predicted class. Pairs failing either check are flagged for
removal; the release honours the list.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from geneava.core import cli, config, emo135, resume
from geneava.core.images import load_rgb
from geneava.core.io import save_png, sha256_bytes, write_csv, write_json
from geneava.networks import identity, models, stylizers
from geneava.stages import qc

log = logging.getLogger(__name__)

# ------------------------------------------------------------------ the stage


def stage_params(profile: str | None, params_file: Path | None = None) -> dict:
    b = config.blocks("models", "prompts", "stylize", profile=profile, path=params_file)
    return {"model_params": b["models"], "prompt_params": b["prompts"], "params": b["stylize"]}


# Parameters that cannot change an avatar, with why; every other value of the blocks read enters each
# avatar's key (geneava.core.resume), with its face's sha256 and its batch.
IGNORED = {
    "models": {
        "expression": "POSTER only checks avatars (preservation), it does not make them",
    },
    "stylize": {
        "include": "chooses which faces are stylized; an avatar is keyed by its own face",
        **{
            k: "a preservation check, computed anew each run from the avatars"
            for k in (
                "identity",
                "identity_root",
                "identity_pack",
                "identity_threshold",
                "expression_level",
                "expression_pairs",
            )
        },
    },
}


def settings_key(model_params: dict, prompt_params: dict, params: dict) -> str:
    """The key every avatar of these settings is made under (the stylizer's code revision included)."""
    blocks = {"models": model_params, "prompts": prompt_params, "stylize": params}
    return resume.digest(resume.settings(blocks, IGNORED), stylizers.REVISION.get(params["stylizer"], 1))


def stylize(
    model_params: dict, prompt_params: dict, params: dict, generate_dir: Path, out_dir: Path, styler=None
) -> pd.DataFrame:
    """An avatar for every selected face in `out_dir/avatars` (same relative path), resumable through
    geneava.core.resume: an avatar is reused only when its record's key matches its face's sha256, its batch
    and every setting. Writes `pairs.csv`, one row per realistic/avatar pair."""
    out_dir = Path(out_dir)
    rows = qc.generated(generate_dir, "finetuned", params["include"])
    avatars = out_dir / "avatars"
    items = [
        resume.Item(
            id=r.row_id,
            inputs={"face_sha256": r.sha256},
            record=avatars / Path(r.file).with_suffix(".json"),
            base=avatars,
        )
        for r in rows.itertuples()
    ]
    resume.start(out_dir)
    resume.prune(avatars, [avatars / f for f in rows["file"]] + [it.record for it in items])
    by_id = rows.set_index("row_id", drop=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def process(batch):
        nonlocal styler
        styler = styler or stylizers.stylizer(params, model_params, prompt_params, device)
        frame = by_id.loc[[it.id for it, _ in batch]]
        images = [load_rgb(Path(generate_dir) / "finetuned" / f) for f in frame["file"]]
        outcomes = []
        for row, src, avatar in zip(frame.itertuples(), images, styler.stylize(images, frame), strict=True):
            if avatar.size != src.size:
                raise RuntimeError(f"stylizer {styler.name} changed the size of {row.file}")

            def finish(final, row=row, avatar=avatar):
                data = save_png(avatars / row.file, avatar)
                return {"sha256": sha256_bytes(data), "source": row.sha256, "files": [row.file]}

            outcomes.append(resume.Outcome("", finish))
        return outcomes

    with tqdm(total=len(items), desc=f"stylize ({params['stylizer']})", unit="img") as bar:
        records = resume.run_rounds(
            items,
            settings_key(model_params, prompt_params, params),
            rounds=1,
            batch_size=params["batch_size"],
            process=process,
            progress=bar.update,
            independent=params["stylizer"] != "sdxl_img2img",  # the others filter one image at a time
        )
    pairs = pd.DataFrame(
        {
            "row_id": rows["row_id"],
            "expression": rows["expression"],
            "realistic": [str(Path("finetuned") / f) for f in rows["file"]],  # under the generate folder
            "avatar": [str(Path("avatars") / f) for f in rows["file"]],
            "avatar_sha256": [records[r]["sha256"] for r in rows["row_id"]],
            "stylizer": params["stylizer"],
        }
    )
    write_csv(out_dir / "pairs.csv", pairs)
    return pairs


# ------------------------------------------------------------------ preservation


def preservation(
    realistic: list[Path],
    avatars: list[Path],
    id_model,
    expression_encoder,
    threshold: float,
    batch: int = 16,
    expression_level: str = "class",
    expression_threshold: float | None = None,
) -> pd.DataFrame:
    """Per pair: identity cosine similarity (and the identity model's own call where it has one), expression
    embedding distance and whether POSTER predicts the same class for both.

    `expression_level="primary"` compares a 135-class encoder's predictions by their primary emotion
    (Parrott's six), the granularity of the official POSTER's seven basic classes; a 135-class head is
    weak at telling "delight" from "gaiety" even on the same image's re-render.
    `expression_level="derived"`: agreement is an embedding distance <= `expression_threshold` (see
    `derive_expression_threshold`)."""
    primary_of = None
    if expression_level == "derived" and expression_threshold is None:
        raise ValueError("expression_level derived needs expression_threshold (derive_expression_threshold)")
    if expression_level == "primary":
        fine = emo135.classes()
        if expression_encoder.config.num_classes != len(fine):
            raise config.ParamsError(
                f"stylize.expression_level: primary maps the 135 Emo135 classes to their primaries, but this "
                f"expression encoder has {expression_encoder.config.num_classes} classes; use class"
            )
        primary_of = torch.tensor([sorted({c.primary for c in fine}).index(c.primary) for c in fine])
    elif expression_level not in ("class", "derived"):
        raise config.ParamsError(
            f"stylize.expression_level must be class, primary or derived, not {expression_level!r}"
        )

    def ids(paths):
        return identity.embed_files(id_model, [str(p) for p in paths], "identity")["embedding"].double()

    a, b = ids(realistic), ids(avatars)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    out = pd.DataFrame({"identity_similarity": cos.numpy(), "identity_kept": (cos > threshold).numpy()})
    if id_model.own_rule is not None:
        out["identity_distance"] = (a - b).norm(dim=1).numpy()
        out["identity_kept"] = out["identity_distance"] < id_model.own_rule[1]

    from geneava.core.images import load_images

    def expr(paths):
        feats, preds = [], []
        for i in range(0, len(paths), batch):
            x = load_images([str(p) for p in paths[i : i + batch]], expression_encoder.config.image_size)
            with torch.no_grad():
                logits, feat = expression_encoder.classify(x)
            feats.append(feat.double())
            preds.append(logits.argmax(1))
        return torch.cat(feats), torch.cat(preds)

    fa, pa = expr(realistic)
    fb, pb = expr(avatars)
    out["expression_distance"] = (fa - fb).norm(dim=1).numpy()
    if primary_of is not None:
        pa, pb = primary_of[pa], primary_of[pb]
    out["expression_agrees"] = (pa == pb).numpy()
    if expression_level == "derived":
        out["expression_agrees"] = out["expression_distance"] <= expression_threshold
    out["flagged"] = ~(out["identity_kept"] & out["expression_agrees"])
    return out


def read_expression_pairs(csv: Path) -> tuple[list[Image.Image], list[Image.Image]]:
    """Calibration pairs for `expression_level: derived`: a CSV with columns face, other (paths relative
    to the CSV), one person under two expressions of different primaries; the default profile's are the
    world's (data/pairs/expression.csv, written with the stand-in)."""
    csv = Path(csv)
    if not csv.is_file():
        raise FileNotFoundError(
            f"expression pairs {csv} not found (stylize.<profile>.expression_pairs); the world's are "
            "written by `python -m geneava.world.dataset --ensure data`"
        )
    table = pd.read_csv(csv)
    missing = {"face", "other"} - set(table.columns)
    if missing or table.empty:
        raise ValueError(f"{csv}: needs rows with columns face, other (missing {sorted(missing)})")
    return tuple([load_rgb(csv.parent / p) for p in table[col]] for col in ("face", "other"))


def derive_expression_threshold(styler, encoder, csv: Path) -> dict:
    """A calibrated expression check for an encoder too weak to name classes on avatars: the C4.5 split
    (as memorization's derived rule) of POSTER distances between a face and its own avatar ("same
    expression") and between the face and the avatar of the same person's other expression
    ("different"), over the pairs of `csv` (read_expression_pairs). Reported with its accuracy on those
    pairs: it is as good as the encoder, no better."""
    faces, other = read_expression_pairs(csv)
    own, pairs = list(faces), len(faces)
    meta = pd.DataFrame({"expression": ["x"] * pairs, "seed_used": range(pairs)})
    own, other = styler.stylize(own, meta), styler.stylize(other, meta)

    def emb(images):
        x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB")).copy()) for im in images])
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            return torch.cat([encoder.classify(c)[1] for c in x.split(64)]).double()

    f = emb(faces)
    d_same, d_diff = (f - emb(own)).norm(dim=1).numpy(), (f - emb(other)).norm(dim=1).numpy()
    scores = np.concatenate([d_same, d_diff])
    same = np.concatenate([np.ones(pairs, bool), np.zeros(pairs, bool)])
    t, ratio = identity.gain_ratio_threshold(scores, same, higher_is_same=False)
    return {
        "threshold": float(t),
        "gain_ratio": float(ratio),
        "accuracy": float(((scores <= t) == same).mean()),
        "pairs": pairs,
        "mean_distance_same": float(d_same.mean()),
        "mean_distance_different": float(d_diff.mean()),
    }


def per_class(scores: pd.DataFrame) -> pd.DataFrame:
    return (
        scores.groupby("expression")
        .agg(
            pairs=("row_id", "size"),
            identity_similarity=("identity_similarity", "mean"),
            identity_kept=("identity_kept", "mean"),
            expression_distance=("expression_distance", "mean"),
            expression_agrees=("expression_agrees", "mean"),
            flagged=("flagged", "sum"),
        )
        .reset_index()
    )


def run(profile: str | None, generate_dir: Path, out_dir: Path, params_file: Path | None = None) -> dict:
    """Stylize, then measure preservation: pairs.csv, preservation.csv, per_class.csv, removal.csv,
    metrics.json, report.json."""
    p = stage_params(profile, params_file)
    out_dir = Path(out_dir)
    params, model_params = p["params"], p["model_params"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    styler = stylizers.stylizer(params, model_params, p["prompt_params"], device)
    pairs = stylize(**p, generate_dir=generate_dir, out_dir=out_dir, styler=styler)
    id_model = identity.identity_model(params["identity"], params["identity_root"], params["identity_pack"])
    encoder = models.expression_encoder(
        model_params["expression"], model_params["seed"], model_params["expression_channels"]
    )
    derived = None
    if params["expression_level"] == "derived":
        derived = derive_expression_threshold(
            styler, encoder, config.path(params["expression_pairs"], config.project_root())
        )
    scores = preservation(
        [Path(generate_dir) / r for r in pairs["realistic"]],
        [out_dir / a for a in pairs["avatar"]],
        id_model,
        encoder,
        params["identity_threshold"],
        expression_level=params["expression_level"],
        expression_threshold=derived and derived["threshold"],
    )
    scores = pd.concat([pairs[["row_id", "expression", "realistic", "avatar"]], scores], axis=1)
    write_csv(out_dir / "preservation.csv", scores)
    table = per_class(scores)
    write_csv(out_dir / "per_class.csv", table)
    write_csv(out_dir / "removal.csv", scores.loc[scores["flagged"], ["row_id", "realistic", "avatar"]])
    metrics = {
        "stylizer": params["stylizer"],
        "pairs": len(scores),
        "identity_model": id_model.name,
        "identity_similarity_mean": float(scores["identity_similarity"].mean()),
        "identity_kept_share": float(scores["identity_kept"].mean()),
        "expression_distance_mean": float(scores["expression_distance"].mean()),
        "expression_agreement_share": float(scores["expression_agrees"].mean()),
        "flagged": int(scores["flagged"].sum()),
    }
    write_json(out_dir / "metrics.json", metrics)
    write_json(
        out_dir / "report.json",
        {
            **metrics,
            "identity_rule": (
                f"{id_model.own_rule[0]} distance < {id_model.own_rule[1]}"
                if id_model.own_rule
                else f"cosine similarity > {params['identity_threshold']}"
            ),
            "expression_model": model_params["expression"],
            "expression_rule": (
                f"POSTER distance <= {derived['threshold']:.3f} (C4.5 split on world pairs)"
                if derived
                else f"same predicted {params['expression_level']}"
            ),
            **({"expression_derived": derived} if derived else {}),
            "paper_user_study": {"identity_preserved": 0.93, "expression_preserved": 0.96},
        },
    )
    return {"pairs": pairs, "scores": scores, "per_class": table, "metrics": metrics}


# ------------------------------------------------------------------ figures


def plot_preservation(scores: pd.DataFrame, save_to: Path | None = None):
    """Identity similarity and expression distance per pair (flagged pairs marked), per class."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, max(3, 0.25 * scores["expression"].nunique() + 1.5)))
    # seaborn jitters the dots with numpy's global generator: seed it here (and put it back), so the
    # figure is the same file on every run
    state = np.random.get_state()
    np.random.seed(0)
    try:
        sns.stripplot(scores, x="identity_similarity", y="expression", hue="flagged", ax=ax1, size=4)
        sns.stripplot(
            scores, x="expression_distance", y="expression", hue="expression_agrees", ax=ax2, size=4
        )
    finally:
        np.random.set_state(state)
    ax1.set(title="Identity: face vs avatar (cosine)", ylabel="")
    ax2.set(title="Expression: POSTER embedding distance", ylabel="")
    fig.tight_layout()
    if save_to:
        fig.savefig(save_to, dpi=120)
    return fig


def pairs_grid(
    pairs: pd.DataFrame, generate_dir: Path, out_dir: Path, n: int = 8, save_to: Path | None = None
):
    """Realistic faces (upper row) above their avatars (lower row)."""
    import matplotlib.pyplot as plt

    rows = pairs.head(n)
    fig, axes = plt.subplots(2, max(1, len(rows)), figsize=(1.7 * max(1, len(rows)), 3.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for j, r in enumerate(rows.itertuples()):
        axes[0, j].imshow(Image.open(Path(generate_dir) / r.realistic))
        axes[0, j].set_title(r.expression, fontsize=7)
        axes[1, j].imshow(Image.open(Path(out_dir) / r.avatar))
    fig.tight_layout()
    if save_to:
        fig.savefig(save_to, dpi=120)
    return fig


def main(argv: list[str] | None = None) -> int:
    return cli.stage_main(run, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
