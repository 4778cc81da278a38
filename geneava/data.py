"""Emo135 preparation (paper, "Fine-tuning data"): scan, split into disjoint balanced subsets, write.

Foundation scope: every readable image is centre-cropped to a square and resized; face detection,
the watermark filter and the full bad-input policy arrive with the data issue (#3) and plug in here.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from geneava import emo135
from geneava.io import save_png, sha256_bytes, write_csv, write_json

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
SPLITS = ("finetune", "eval")


class DataError(RuntimeError):
    """The input folder cannot be used at all."""


def scan(source: Path, max_classes: int | None = None) -> pd.DataFrame:
    """List the images of an Emo135-layout folder: one sub-folder per expression class."""
    source = Path(source)
    if not source.is_dir():
        raise DataError(
            f"{source} is not a folder. Point prepare.<profile>.source at an Emo135-layout folder "
            "(one sub-folder per class), or run `python -m geneava.standin data` for the stand-in."
        )
    folders = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{source} has no class sub-folders (expected one folder per expression class)")
    emo135.reconcile([p.name for p in folders])
    if max_classes is not None:
        folders = folders[:max_classes]
    rows = [
        {"source": str(f), "expression": folder.name}
        for folder in folders
        for f in sorted(folder.iterdir())
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
    ]
    return pd.DataFrame(rows, columns=["source", "expression"])


def sample_splits(
    images: pd.DataFrame, finetune_per_class: int, eval_per_class: int, seed: int
) -> pd.DataFrame:
    """Assign each image to `finetune`, `eval` or nothing: seeded, balanced, disjoint by construction.

    A class with fewer images than both splits need is an error that lists every such class; the
    splits are never silently shrunk.
    """
    need = finetune_per_class + eval_per_class
    counts = images.groupby("expression").size()
    short = counts[counts < need]
    if len(short):
        listing = ", ".join(f"{name} ({n})" for name, n in short.items())
        raise DataError(
            f"{len(short)} class(es) have fewer than the {need} images the splits need "
            f"({finetune_per_class} fine-tuning + {eval_per_class} evaluation): {listing}. "
            "Lower prepare.<profile>.finetune_per_class / eval_per_class or add images."
        )
    out = images.copy()
    out["split"] = ""
    for name, group in out.groupby("expression", sort=True):
        # One generator per class, keyed by its name: adding a class does not reshuffle the others.
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
        order = np.random.default_rng([seed, key]).permutation(len(group))
        labels = np.array([""] * len(group), dtype=object)
        labels[order[:finetune_per_class]] = "finetune"
        labels[order[finetune_per_class:need]] = "eval"
        out.loc[group.index, "split"] = labels
    return out


def load_rgb(path: Path) -> Image.Image:
    """Open an image as RGB with its EXIF orientation applied."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return im.convert("RGB")


def square_resize(img: Image.Image, size: int) -> Image.Image:
    return ImageOps.fit(img, (size, size), Image.Resampling.LANCZOS)


def prepare(params: dict, out_dir: Path, root: Path) -> pd.DataFrame:
    """Run the prepare stage: split, write resized copies and the manifest; return the manifest."""
    out_dir = Path(out_dir)
    data_dir = out_dir / "data"  # the DVC-tracked subsets; reports sit beside it
    source = (root / params["source"]).resolve()
    images = scan(source, params["classes"])
    manifest = sample_splits(images, params["finetune_per_class"], params["eval_per_class"], params["seed"])
    manifest = manifest[manifest["split"] != ""].reset_index(drop=True)
    files, source_hashes, image_hashes, dropped = [], [], [], []
    for row in tqdm(manifest.itertuples(), total=len(manifest), desc="prepare", unit="img"):
        src = Path(row.source)
        rel = Path("images") / row.split / row.expression / f"{src.stem}.png"
        try:
            raw = src.read_bytes()
            img = square_resize(load_rgb(src), params["resolution"])
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            files.append("")
            source_hashes.append("")
            image_hashes.append("")
            dropped.append(f"unreadable: {type(e).__name__}")
            continue
        data = save_png(data_dir / rel, img)
        files.append(str(rel))
        source_hashes.append(sha256_bytes(raw))
        image_hashes.append(sha256_bytes(data))
        dropped.append("")
    manifest["file"] = files
    manifest["source_sha256"] = source_hashes
    manifest["sha256"] = image_hashes
    manifest["dropped"] = dropped
    manifest["source"] = [
        str(Path(s).relative_to(root)) if Path(s).is_relative_to(root) else s for s in manifest["source"]
    ]
    if (manifest["dropped"] != "").any():
        bad = manifest[manifest["dropped"] != ""]
        raise DataError(
            f"{len(bad)} sampled image(s) could not be read, e.g. {bad.iloc[0]['source']}: "
            f"{bad.iloc[0]['dropped']}. Remove or replace them (the data issue adds automatic skipping)."
        )
    write_csv(data_dir / "manifest.csv", manifest)
    counts = (
        manifest.groupby(["expression", "split"])
        .size()
        .unstack(fill_value=0)
        .reindex(columns=list(SPLITS), fill_value=0)
    )
    write_csv(out_dir / "class_counts.csv", counts.reset_index())
    write_json(
        out_dir / "metrics.json",
        {
            "classes": int(manifest["expression"].nunique()),
            **{f"{split}_images": int((manifest["split"] == split).sum()) for split in SPLITS},
        },
    )
    return manifest


def read_split(prepare_dir: Path, split: str) -> pd.DataFrame:
    """The rows of one split from the prepare stage's manifest, with absolute image paths."""
    data_dir = Path(prepare_dir) / "data"
    manifest_path = data_dir / "manifest.csv"
    if not manifest_path.is_file():
        raise DataError(f"{manifest_path} not found: run the prepare stage first (dvc repro prepare)")
    manifest = pd.read_csv(manifest_path, keep_default_na=False)
    rows = manifest[manifest["split"] == split].reset_index(drop=True)
    rows["path"] = [str(data_dir / f) for f in rows["file"]]
    return rows


def plot_split_counts(manifest: pd.DataFrame, save_to: Path | None = None):
    """Images per class in each split (seaborn); the splits must be flat bars if balanced."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    counts = manifest.groupby(["expression", "split"]).size().rename("images").reset_index()
    fig, ax = plt.subplots(figsize=(min(24, 2 + 0.12 * counts["expression"].nunique()), 3))
    sns.barplot(data=counts, x="expression", y="images", hue="split", ax=ax)
    ax.tick_params(axis="x", labelrotation=90, labelsize=5)
    ax.set(title="Images per expression class and split", xlabel="")
    fig.tight_layout()
    if save_to:
        fig.savefig(save_to, dpi=120)
    return fig


def sample_grid(
    manifest: pd.DataFrame, prepare_dir: Path, n: int = 24, seed: int = 0, save_to: Path | None = None
):
    """A grid of `n` randomly chosen prepared images with their class."""
    import matplotlib.pyplot as plt

    rows = manifest.sample(min(n, len(manifest)), random_state=seed)
    cols = 8
    fig, axes = plt.subplots(
        -(-len(rows) // cols), cols, figsize=(1.6 * cols, 1.9 * -(-len(rows) // cols)), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows.itertuples(), strict=False):
        ax.imshow(Image.open(Path(prepare_dir) / "data" / row.file))
        ax.set_title(f"{row.expression}\n({row.split})", fontsize=6)
    fig.tight_layout()
    if save_to:
        fig.savefig(save_to, dpi=120)
    return fig
