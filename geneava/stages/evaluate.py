"""Table 1 (paper, "Table 1"): CLIP, DINOv2, LPIPS and expression error, fine-tuned vs plain SDXL.

Pairing (ours; the paper only says "average pairwise"): generated images of class c are paired with
the Emo135 evaluation images of class c, each class's pairs are averaged, and the table reports the
mean over classes. The all-pairs variant (every generated image with every evaluation image) is
reported beside it. Both variants render the same prompt rows with the same seeds, so every bootstrap
draw resamples prompt rows and evaluation images within each class, identically for both: the CI of
the difference is paired.

Each image is embedded once (CLIP, DINOv2, POSTER; cached on disk by file hash and model), and every
statistic is a matrix product; LPIPS too (metrics.LpipsGram). For the expression metric, faces in the
generated images are cropped with the detector first, as the evaluation images were by `prepare`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from geneava.core import cli, config, metrics, resume
from geneava.core.images import load_images, read_split
from geneava.core.io import atomic_write_text, cached_tensors, source_fingerprint, write_csv, write_json
from geneava.networks import fer, models, pretrained
from geneava.networks.faces import face_detector, square_crop
from geneava.stages import qc
from geneava.stages.recognition import recognition_table
from geneava.stages.tables import METRICS, VARIANTS, per_class_table, table_latex, table_markdown

log = logging.getLogger(__name__)


def stage_params(profile: str | None, params_file: Path | None = None) -> dict:
    b = config.blocks("models", "evaluate", profile=profile, path=params_file)
    return {"model_params": b["models"], "params": b["evaluate"]}


# ------------------------------------------------------------------ inputs


def generated_rows(variants: dict[str, Path] | Path, include: str) -> dict[str, pd.DataFrame]:
    """Two variants' manifests (label -> the variant's folder; a generate-stage folder: its fine-tuned and
    baseline), aligned on the same prompt rows, with a `use` flag per row: `kept` uses the images that
    passed QC (the paper), `all` every rendered image."""
    if not isinstance(variants, dict):
        variants = {v: Path(variants) / v for v in VARIANTS}
    out = {}
    for v, folder in variants.items():
        m = qc.generated(Path(folder).parent, Path(folder).name).sort_values("row_id").reset_index(drop=True)
        m["use"] = m["kept"] if include == "kept" else True
        out[v] = m
    a, b = (m["row_id"].tolist() for m in out.values())
    if a != b:
        raise ValueError(
            f"the {' and '.join(variants)} manifests hold different prompt rows; regenerate both "
            "(dvc repro generate)"
        )
    return out


def _image_tensor(paths: list[str]) -> torch.Tensor:
    """Images in [-1, 1] at their own (common) size."""
    from PIL import Image

    with Image.open(paths[0]) as im:
        size = im.size[0]
    return load_images(paths, size)


# ------------------------------------------------------------------ embeddings, once per image


def crop_faces(
    detector, margin: float | None, paths: list[str], size: int
) -> tuple[torch.Tensor, np.ndarray]:
    """The largest detected face of each image, cropped as `prepare` cropped the Emo135 faces (same
    margin, same size; `margin=None` keeps whole images, as prepare then does), so both sets reach
    POSTER alike; an image without a face is used whole and flagged. Images in [-1, 1], found flags."""
    from PIL import Image

    from geneava.core.images import load_rgb

    crops, found = [], []
    for p in paths:
        rgb = np.asarray(load_rgb(Path(p)))
        faces = detector.detect(rgb)
        if faces:
            box = max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1])).box
            img = square_crop(rgb, box, margin, size)
        else:
            img = Image.fromarray(rgb).resize((size, size), Image.Resampling.LANCZOS)
        crops.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
        found.append(bool(faces))
    return torch.stack(crops), np.array(found)


# Parameters that cannot change a cached embedding, with why; every other value of the `models` and
# `evaluate` blocks enters the caches' key (geneava.core.resume.settings), with the embedded files' hashes.
CACHE_IGNORED = {
    "models": {
        "sdxl": "renders images; the embedded files are keyed by their hashes",
    },
    "evaluate": {
        "include": "selects images: each cache is keyed by its files' hashes",
        "n_boot": "the bootstrap, after embedding",
        "level": "the bootstrap, after embedding",
        "seed": "the bootstrap's seed (models are seeded by models.seed)",
        "lpips": "LPIPS features are computed each run, not cached",
        "lpips_size": "LPIPS features are computed each run, not cached",
    },
}


FER_FILE = "fer-mini-xception.hdf5"  # the optional second opinion on recognition (geneava.networks.fer)


def _fer_source() -> str:
    return f"{FER_FILE} ({pretrained.FILES[FER_FILE].package}), faces framed at margin {fer.MARGIN}"


class Embedder:
    """CLIP, DINOv2 and POSTER embeddings of image files; generated faces are cropped for POSTER. With
    `second_opinion: fer`, also the FER2013 mini-Xception's class probabilities of the same face crops."""

    def __init__(self, model_params: dict, params: dict, device, detector=None):
        seed, local = model_params["seed"], model_params["local_files_only"]
        self.device = device
        self.clip = models.image_encoder("clip", params["clip"], seed, local)
        self.dino = models.image_encoder("dino", params["dino"], seed, local)
        self.clip.model.to(device)
        self.dino.model.to(device)
        self.expression = models.expression_encoder(
            model_params["expression"], seed, model_params["expression_channels"]
        ).to(device)
        self.detector = detector or face_detector(
            params["detector"], params["detector_root"], params["detector_pack"]
        )
        self.margin, self.batch = params["crop_margin"], params["batch_size"]
        second = params["second_opinion"] == "fer"
        self.fer = fer.load(pretrained.path(FER_FILE)).to(device) if second else None
        self.settings = {
            "clip": params["clip"],
            "dino": params["dino"],
            "expression": model_params["expression"],
            "expression_weights": source_fingerprint(model_params["expression"]),
            "detector_weights": source_fingerprint(params["detector"]),
            "seed": seed,
            "detector": getattr(self.detector, "name", type(self.detector).__name__),
            "crop_margin": self.margin,
            "second_opinion": "none" if self.fer is None else _fer_source(),
        }
        blocks = {"models": model_params, "evaluate": params}
        self.cache_key = resume.settings(blocks, CACHE_IGNORED) | {
            k: self.settings[k] for k in ("detector", "second_opinion")
        }

    def crop_faces(self, paths: list[str], size: int) -> tuple[torch.Tensor, np.ndarray]:
        return crop_faces(self.detector, self.margin, paths, size)

    @torch.no_grad()
    def embed(self, paths: list[str], crop_size: int | None, desc: str) -> dict[str, torch.Tensor]:
        """Embeddings of image files; with `crop_size`, POSTER sees the detected face at that size."""
        out = {"clip": [], "dino": [], "exp": [], "face_found": []}
        for i in tqdm(range(0, len(paths), self.batch), desc=f"embed {desc}", unit="batch"):
            chunk = paths[i : i + self.batch]
            x = _image_tensor(chunk)
            out["clip"].append(self.clip.embed(x))
            out["dino"].append(self.dino.embed(x))
            if crop_size:
                faces, found = self.crop_faces(chunk, crop_size)
            else:
                faces, found = x, np.ones(len(chunk), dtype=bool)
            out["exp"].append(self.expression.embed(faces.to(self.device)).float().cpu())
            if self.fer is not None:  # the faces POSTER sees (not detected again), framed tighter
                out.setdefault("fer", []).append(fer.predict(self.fer, faces, self.margin))
            out["face_found"].append(torch.from_numpy(found))
        return {k: torch.cat(v) for k, v in out.items()}


def cached_embeddings(
    embedder: Embedder, name: str, paths: list[str], hashes: list[str], crop_size: int | None, cache_dir: Path
) -> dict[str, torch.Tensor]:
    """`embedder.embed`, reused from `cache_dir/<name>.safetensors` when the files and models match."""
    key = {"files": hashes, "crop": crop_size, **embedder.cache_key}
    return cached_tensors(
        Path(cache_dir) / f"{name}.safetensors", key, lambda: embedder.embed(paths, crop_size, name)
    )


# ------------------------------------------------------------------ pair matrices per class


def _rows_matrix(n_rows: int, use: np.ndarray, block: torch.Tensor) -> np.ndarray:
    """A (rows x eval) matrix with the used rows filled from `block` and the others NaN."""
    m = np.full((n_rows, block.shape[1]), np.nan)
    m[use] = block.numpy()
    return m


def class_matrices(
    gen: dict[str, pd.DataFrame],
    gen_emb: dict[str, dict[str, torch.Tensor]],
    ev: pd.DataFrame,
    ev_emb: dict[str, torch.Tensor],
    lpips_gram: metrics.LpipsGram,
    lpips_size: int,
) -> tuple[list[str], dict[str, dict[str, list[np.ndarray]]], dict[str, dict[str, float]]]:
    """Per class, per metric, per variant: the (prompt rows x evaluation images) pair matrix.
    Also the all-pairs means (every generated image x every evaluation image)."""
    pair_fn = {"clip": metrics.cosine_matrix, "dino": metrics.cosine_matrix, "exp": metrics.euclidean_matrix}
    names = list(gen)
    classes = sorted(set(gen[names[0]]["expression"]) & set(ev["expression"]))
    mats = {m: {v: [] for v in names} for m in METRICS}
    # all-pairs LPIPS is linear in the features: mean q(a) + mean q(b) - 2 mean(w a) . mean(b)
    lp_sums = {v: [0.0, None, 0] for v in (*names, "eval")}

    def lp_features(paths: list[str]):
        x = load_images(paths, lpips_size)
        return lpips_gram.features(x)

    def accumulate(key: str, feats, weighted_side: bool):
        plain, weighted = feats
        s = lp_sums[key]
        s[0] += float((plain * weighted).sum())
        vec = (weighted if weighted_side else plain).sum(0)
        s[1] = vec if s[1] is None else s[1] + vec
        s[2] += len(plain)

    ev_idx = {c: np.flatnonzero(ev["expression"].to_numpy() == c) for c in sorted(set(ev["expression"]))}
    for c, ei in tqdm(ev_idx.items(), desc="LPIPS per class", unit="class"):
        ev_feats = lp_features(ev["path"].iloc[ei].tolist())
        accumulate("eval", ev_feats, weighted_side=False)
        if c not in classes:
            continue
        for v in names:
            g = gen[v]
            rows = np.flatnonzero(g["expression"].to_numpy() == c)
            use = g["use"].to_numpy()[rows]
            pos = g.loc[g["use"], :].index.get_indexer(g.index[rows][use])  # row -> index in gen_emb
            for m, fn in pair_fn.items():
                block = fn(gen_emb[v][m][pos], ev_emb[m][ei])
                mats[m][v].append(_rows_matrix(len(rows), use, block))
            if use.any():
                feats = lp_features(g["path"].iloc[rows[use]].tolist())
                accumulate(v, feats, weighted_side=True)
                block = metrics.LpipsGram.pairs(feats, ev_feats)
            else:
                block = torch.empty(0, len(ei), dtype=torch.float64)
            mats["lpips"][v].append(_rows_matrix(len(rows), use, block))

    all_pairs = {}
    q_ev, sum_ev, n_ev = lp_sums["eval"]
    for v in names:
        used = gen_emb[v]
        q_g, sum_g, n_g = lp_sums[v]
        all_pairs[v] = {
            "clip": metrics.block_mean(metrics.cosine_matrix, used["clip"], ev_emb["clip"]),
            "dino": metrics.block_mean(metrics.cosine_matrix, used["dino"], ev_emb["dino"]),
            "exp": metrics.block_mean(metrics.euclidean_matrix, used["exp"], ev_emb["exp"]),
            # generated images of classes without evaluation images are left out of every variant
            "lpips": q_g / n_g + q_ev / n_ev - 2 * float(sum_g @ sum_ev) / (n_g * n_ev)
            if n_g
            else float("nan"),
        }
    return classes, mats, all_pairs


# ------------------------------------------------------------------ the stage


def evaluate(
    model_params: dict,
    params: dict,
    prepare_dir: Path,
    generate_dir: Path,
    out_dir: Path,
    detector=None,
    variants: dict[str, Path] | None = None,
    cache_dir: Path | None = None,
) -> dict:
    """Table 1 with bootstrap CIs: writes metrics.json, table1.md/.tex, per_class.csv and report.json.

    `variants` (label -> generated folder, first minus second) compares other pairs, e.g. the α=0
    ablation; by default the fine-tuned model against the baseline in `generate_dir`."""
    out_dir = Path(out_dir)
    device = PartialState(cpu=not torch.cuda.is_available()).device
    variants = variants or {v: Path(generate_dir) / v for v in VARIANTS}
    if len(variants) != 2:
        raise ValueError(f"Table 1 compares two variants, got {list(variants)}")
    gen = generated_rows(variants, params["include"])
    names = list(gen)
    ev = read_split(prepare_dir, "eval")
    if ev.empty:
        raise ValueError(f"{prepare_dir}: the evaluation split is empty; run the prepare stage")
    embedder = Embedder(model_params, params, device, detector)
    cache = Path(cache_dir) if cache_dir else out_dir / "embeddings"
    crop_size = _image_tensor(ev["path"].iloc[:1].tolist()).shape[-1]  # prepare's image size
    # as prepare wrote them, or (crop_eval: prepare kept whole images) cropped as the generated faces are
    ev_crop = crop_size if params["crop_eval"] else None
    ev_emb = cached_embeddings(embedder, "eval", ev["path"].tolist(), ev["sha256"].tolist(), ev_crop, cache)
    gen_emb = {}
    for v in names:
        used = gen[v][gen[v]["use"]]
        if used.empty:
            raise ValueError(
                f"no {v} image passed QC, so Table 1 has nothing to compare. Render more rows "
                "(generate.<profile>.limit), or set evaluate.<profile>.include: all"
            )
        gen_emb[v] = cached_embeddings(
            embedder, v, used["path"].tolist(), used["sha256"].tolist(), crop_size, cache
        )

    torch.manual_seed(model_params["seed"])
    gram = metrics.LpipsGram(models.lpips_model(params["lpips"], model_params["seed"]))
    classes, mats, all_pairs = class_matrices(gen, gen_emb, ev, ev_emb, gram, params["lpips_size"])
    if not classes:
        raise ValueError("no expression class has both generated and evaluation images")

    table = {
        m: metrics.class_bootstrap(mats[m], params["n_boot"], params["seed"], params["level"])
        for m in METRICS
    }
    diff = f"{names[0]} - {names[1]}"
    result = {
        "per_class_pairs": {
            name: {m: {k: table[m][key][k] for k in ("mean", "lo", "hi")} for m in METRICS}
            for name, key in (*((v, v) for v in names), ("difference", diff))
        },
        "variants": names,
        "all_pairs": all_pairs,
        "classes": len(classes),
        "level": params["level"],
        "models": {k: params[k] for k in ("clip", "dino", "lpips")},  # what measured each column
        "recognition": recognition_table(gen, gen_emb, ev, ev_emb, classes, embedder.expression, params),
    }
    write_json(out_dir / "metrics.json", result)
    per_class = per_class_table(classes, mats)
    write_csv(out_dir / "per_class.csv", per_class)
    atomic_write_text(out_dir / "table1.md", table_markdown(result))
    atomic_write_text(out_dir / "table1.tex", table_latex(result))
    report = {
        "pairing": "per expression class (generated of class c x evaluation of class c), mean over classes; "
        "all-pairs beside it",
        "include": params["include"],
        "images": {v: int(gen[v]["use"].sum()) for v in names} | {"eval": len(ev)},
        "qc_failed_but_used": {v: int((gen[v]["use"] & ~gen[v]["kept"]).sum()) for v in names},
        "faces_not_found_for_exp": {v: int((~gen_emb[v]["face_found"]).sum()) for v in names},
        "classes": classes,
        "models": embedder.settings | {"lpips": params["lpips"], "lpips_size": params["lpips_size"]},
        "bootstrap": {"n_boot": params["n_boot"], "level": params["level"], "seed": params["seed"]},
    }
    write_json(out_dir / "report.json", report)
    return {"result": result, "per_class": per_class, "report": report}


def run(
    profile: str | None, prepare_dir: Path, generate_dir: Path, out_dir: Path, params_file: Path | None = None
):
    return evaluate(
        **stage_params(profile, params_file),
        prepare_dir=prepare_dir,
        generate_dir=generate_dir,
        out_dir=out_dir,
    )


def main(argv: list[str] | None = None) -> int:
    return cli.stage_main(run, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
