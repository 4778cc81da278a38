"""Recognition (beyond Table 1's Exp. error): does POSTER name the intended primary expression of a
generated face, as often as it does for the real evaluation photos? With a 135-class head the predicted
class's primary is compared; with RAF-DB's seven classes, the primaries each class fits. The figure shows
the faces and what POSTER names. Used by the evaluate stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from geneava.core import emo135, metrics
from geneava.core.images import read_split
from geneava.networks import fer, models
from geneava.networks.faces import face_detector
from geneava.stages.tables import SHORT

# The official POSTER checkpoints for RAF-DB name its seven basic classes in RAF-DB's label order
# (labels 1-7 of its list_patition_label.txt, minus one). Each names the Parrott primaries it fits:
# Emo135 files disgust, contempt and revulsion under anger, and RAF-DB's happiness covers love and joy.
RAFDB_CLASSES = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")
RAFDB_PRIMARIES = {
    "surprise": ("surprise",),
    "fear": ("fear",),
    "disgust": ("anger",),
    "happiness": ("love", "joy"),
    "sadness": ("sadness",),
    "anger": ("anger",),
    "neutral": (),
}
# The FER2013 mini-Xception's seven classes (geneava.networks.fer, the evaluate stage's optional second
# opinion) are RAF-DB's under other names, so they fit the same primaries.
FER_AS_RAFDB = {
    "angry": "anger",
    "disgust": "disgust",
    "fear": "fear",
    "happy": "happiness",
    "sad": "sadness",
    "surprise": "surprise",
    "neutral": "neutral",
}
SECOND_OPINION = "FER2013 mini-Xception (second opinion, not the paper's E_exp)"


def _rafdb_table(classes: list[str] | tuple[str, ...]) -> np.ndarray:
    return np.array([[p in RAFDB_PRIMARIES[c] for p in emo135.PRIMARY] for c in classes])


def primary_compatibility(num_classes: int) -> np.ndarray | None:
    """(num_classes x 6) bool: whether the expression encoder's class k names primary p
    (`emo135.PRIMARY` order). A 135-class head (the world's POSTER, or one trained on Emo135) names
    its classes' primaries; a 7-class one is read as RAF-DB's; any other head gives None."""
    prim = list(emo135.PRIMARY)
    if num_classes == len(emo135.classes()):
        out = np.zeros((num_classes, len(prim)), dtype=bool)
        out[np.arange(num_classes), [prim.index(c.primary) for c in emo135.classes()]] = True
        return out
    if num_classes == len(RAFDB_CLASSES):
        return _rafdb_table(RAFDB_CLASSES)
    return None


def fer_compatibility() -> np.ndarray:
    """(7 x 6) bool: whether the FER2013 mini-Xception's class k (`fer.CLASSES`) names primary p."""
    return _rafdb_table([FER_AS_RAFDB[c] for c in fer.CLASSES])


def _fits(table: np.ndarray, pred: np.ndarray, expressions: list[str]) -> np.ndarray:
    """Per image: does predicted class `pred` name the primary of the intended Emo135 class?"""
    primary = {c.name: list(emo135.PRIMARY).index(c.primary) for c in emo135.classes()}
    unknown = sorted(set(expressions) - set(primary))
    if unknown:
        raise ValueError(f"expressions outside the 135 Emo135 classes: {unknown[:5]}")
    return table[pred, [primary[e] for e in expressions]]


def recognised(encoder, features: torch.Tensor, expressions: list[str]) -> np.ndarray | None:
    """Per image: does the expression encoder's predicted class name the intended expression's
    primary? From the cached POSTER features (its head is one linear layer on them), no new forward
    pass. None when the encoder's classes cannot be read as primaries."""
    table = primary_compatibility(encoder.config.num_classes)
    if table is None:
        return None
    with torch.no_grad():
        pred = encoder.head(features.to(next(encoder.parameters()).dtype)).argmax(1).cpu().numpy()
    return _fits(table, pred, expressions)


def fer_recognised(probabilities: torch.Tensor, expressions: list[str]) -> np.ndarray:
    """Per image: does the FER2013 mini-Xception's most probable class name the intended primary?"""
    return _fits(fer_compatibility(), probabilities.argmax(1).cpu().numpy(), expressions)


def _shares(gen, gen_emb, ev, ev_emb, classes: list[str], params: dict, judge) -> dict | None:
    """Recognition shares per variant and for the evaluation faces; `judge(embeddings, expressions)`
    says per image whether the intended primary was named (None: it cannot tell)."""
    names = list(gen)
    ev_ok = judge(ev_emb, ev["expression"].tolist())
    if ev_ok is None:
        return None
    per_variant = {}
    for v in names:
        g = gen[v]
        ok = np.full(len(g), np.nan)
        ok[g["use"].to_numpy()] = judge(gen_emb[v], g.loc[g["use"], "expression"].tolist())
        per_variant[v] = [ok[g["expression"].to_numpy() == c][:, None] for c in classes]
    boot = lambda m: metrics.class_bootstrap(m, params["n_boot"], params["seed"], params["level"])  # noqa: E731
    table = boot(per_variant)
    evals = boot({"eval": [ev_ok[ev["expression"].to_numpy() == c][:, None].astype(float) for c in classes]})
    keep = ("mean", "lo", "hi")
    return {
        **{v: {k: table[v][k] for k in keep} for v in names},
        "difference": {k: table[f"{names[0]} - {names[1]}"][k] for k in keep},
        "eval": {k: evals["eval"][k] for k in keep},
        "chance": 1 / len(emo135.PRIMARY),
        "level": "primary",
    }


def recognition_table(
    gen: dict[str, pd.DataFrame],
    gen_emb: dict[str, dict[str, torch.Tensor]],
    ev: pd.DataFrame,
    ev_emb: dict[str, torch.Tensor],
    classes: list[str],
    encoder,
    params: dict,
) -> dict:
    """Share of images whose POSTER prediction names the intended primary (one of six; chance is about
    1/6 for a uniform guess): per class, then the mean over classes, with the same paired class
    bootstrap as Table 1 (rows within a class resampled alike for both variants). The evaluation
    images' share is the ceiling the encoder reaches on real faces. With FER2013 probabilities among the
    embeddings (`evaluate.second_opinion: fer`), the same shares by that classifier, under
    `second_opinion`."""
    args = (gen, gen_emb, ev, ev_emb, classes, params)
    out = _shares(*args, lambda emb, expr: recognised(encoder, emb["exp"], expr)) or {
        "skipped": f"the expression encoder has {encoder.config.num_classes} classes: neither the 135 "
        f"Emo135 classes nor RAF-DB's 7, so its predictions cannot be read as primaries"
    }
    if "fer" in ev_emb:
        shares = _shares(*args, lambda emb, expr: fer_recognised(emb["fer"], expr))
        out["second_opinion"] = {"model": SECOND_OPINION, **shares}
    return out


def primary_grid(
    model_params: dict,
    params: dict,
    prepare_dir: Path,
    variants: dict[str, Path] | Path,
    classes_per_primary: int = 2,
    detector=None,
    save_to: Path | None = None,
):
    """Faces of the intended expression, primary by primary: one column per class (the first
    `classes_per_primary` of each primary with a prompt row every variant kept), one row for a real
    evaluation face and one per variant (that prompt row's image). Under each face, what POSTER names
    (as recognition reads it: the primary, or RAF-DB's class), ✓ when it fits the intended primary."""
    import matplotlib.pyplot as plt
    from PIL import Image

    from geneava.stages.evaluate import _image_tensor, crop_faces, generated_rows

    gen = generated_rows(variants, params["include"])
    names = list(gen)
    ev = read_split(prepare_dir, "eval")
    encoder = models.expression_encoder(
        model_params["expression"], model_params["seed"], model_params["expression_channels"]
    )
    table = primary_compatibility(encoder.config.num_classes)
    detector = detector or face_detector(params["detector"], params["detector_root"], params["detector_pack"])
    primary_of = {c.name: c.primary for c in emo135.classes()}
    shared = sorted(set(ev["expression"]) & set(gen[names[0]]["expression"]))
    picked = []  # (class, real path, [each variant's path])
    for primary in emo135.PRIMARY:
        for c in [c for c in shared if primary_of.get(c) == primary]:
            ok = np.logical_and.reduce([(g["use"] & (g["expression"] == c)).to_numpy() for g in gen.values()])
            if ok.any() and sum(primary_of[k] == primary for k, *_ in picked) < classes_per_primary:
                i = int(np.flatnonzero(ok)[0])
                real = ev.loc[ev["expression"] == c, "path"].iloc[0]
                picked.append((c, real, [g["path"].iloc[i] for g in gen.values()]))
    if not picked:
        raise ValueError("no class has a kept image in every variant and an evaluation image")

    def said(paths: list[str], crop: bool) -> list[tuple[str, bool | None]]:
        size = _image_tensor(paths[:1]).shape[-1]
        x = crop_faces(detector, params["crop_margin"], paths, size)[0] if crop else _image_tensor(paths)
        with torch.no_grad():
            pred = encoder.classify(x)[0].argmax(1).tolist()
        out = []
        for k, c in zip(pred, (c for c, *_ in picked), strict=True):
            if table is None:
                out.append((f"class {k}", None))
                continue
            intended = emo135.PRIMARY.index(primary_of[c])
            label = emo135.classes()[k].primary if len(table) == len(emo135.classes()) else RAFDB_CLASSES[k]
            out.append((label, bool(table[k, intended])))
        return out

    rows = [("real (Emo135)", [r for _, r, _ in picked], params["crop_eval"])]
    rows += [(SHORT.get(v, v), [g[j] for *_, g in picked], True) for j, v in enumerate(names)]
    fig, axes = plt.subplots(
        len(rows), len(picked), figsize=(1.25 * len(picked), 1.55 * len(rows)), squeeze=False
    )
    for i, (label, paths, crop) in enumerate(rows):
        for j, ((name, ok), path) in enumerate(zip(said(paths, crop), paths, strict=True)):
            ax = axes[i, j]
            with Image.open(path) as im:
                ax.imshow(im.convert("RGB"))
            ax.set_xticks([])
            ax.set_yticks([])
            mark = "" if ok is None else (" ✓" if ok else " ✗")
            ax.set_xlabel(
                f"{name}{mark}", fontsize=7, color="black" if ok is None else ("green" if ok else "red")
            )
            if i == 0:
                ax.set_title(f"{picked[j][0]}\n({primary_of[picked[j][0]]})", fontsize=7)
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle("Intended expression (column) and what POSTER names under each face", fontsize=9)
    fig.tight_layout()
    if save_to:
        fig.savefig(save_to, dpi=120)
    return fig
