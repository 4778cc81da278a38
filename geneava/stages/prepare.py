"""Emo135 preparation (paper, "Fine-tuning data"): read safely, deduplicate, detect and crop faces,
drop watermarked images, and sample seeded, balanced, disjoint fine-tuning and evaluation sets.

Nothing in the source folder is ever modified. Every entry of a class folder gets a manifest row: where
it went, or why it was dropped (a file is read as an image whatever its name ends with; a folder or a
broken or looping link gets a row with that status). Ignored, and counted in report.json's `ignored`:
hidden entries (names starting with "."; e.g. .DS_Store, .ipynb_checkpoints), files directly in the
source folder (not in a class), and what lies inside folders nested in a class folder (not read).
Crops are named after the whole source file name (`x.jpg` -> `x.jpg.png`), so two files of a class never
share an output. Files are examined per class in a seeded order only until both splits are full, so a
large real Emo135 costs detector time only for the images the splits need.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from geneava.core import cli, config, emo135, resume
from geneava.core.io import save_png, sha256_bytes, sha256_file, write_csv, write_json
from geneava.networks.faces import face_detector, square_crop
from geneava.networks.watermark import watermark_filter

log = logging.getLogger(__name__)

SPLITS = ("finetune", "eval")
# Why a file is not used; the manifest's `status` holds one of these (or a split name).
REASONS = (
    "empty file",
    "not an image",
    "corrupt or truncated",
    "too large",
    "unreadable",
    "broken link",
    "folder",
    "duplicate",
    "duplicate across classes",
    "no face",
    "several faces",
    "watermark",
)


class DataError(RuntimeError):
    """The input folder cannot be used at all."""


def _entry_status(entry: Path) -> str:
    """ "" for a file to read; else why an entry of a class folder is not one."""
    if entry.is_symlink() and not entry.exists():  # dangling, or a loop (stat fails)
        return "broken link"
    if entry.is_dir():
        return "folder"
    return ""


def _nested_files(folder: Path) -> int:
    try:
        return sum(1 for p in folder.rglob("*") if not p.is_dir())
    except OSError:
        return 0


def scan(source: Path, max_classes: int | None = None) -> tuple[pd.DataFrame, dict]:
    """List the entries of an Emo135-layout folder (one sub-folder per class) and reconcile the classes.

    Returns one row per non-hidden entry of each class folder (`status` "" for a file to read) and the
    classes report, with `class_folders` and `ignored` counts (see the module docstring)."""
    source = Path(source)
    if not source.is_dir():
        raise DataError(
            f"{source} is not a folder. Point prepare.<profile>.source at an Emo135-layout folder "
            "(one sub-folder per class), or run `python -m geneava.world.dataset data` for the stand-in."
        )
    try:
        entries = sorted(source.iterdir())
        folders = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    except PermissionError as e:
        raise DataError(f"cannot list {source}: {e}. Make it readable (chmod) and rerun.") from e
    if not folders:
        raise DataError(f"{source} has no class sub-folders (expected one folder per expression class)")
    report = emo135.reconcile([p.name for p in folders])
    ignored = {
        "hidden": sum(p.name.startswith(".") for p in entries),
        "files_outside_classes": sum(not p.is_dir() and not p.name.startswith(".") for p in entries),
        "files_in_nested_folders": 0,
    }
    if max_classes is not None:
        folders = folders[:max_classes]
    rows = []
    for folder in folders:
        try:
            inside = sorted(folder.iterdir())
        except PermissionError as e:
            raise DataError(f"cannot list class folder {folder}: {e}. Make it readable and rerun.") from e
        for entry in inside:
            if entry.name.startswith("."):
                ignored["hidden"] += 1
                continue
            status = _entry_status(entry)
            if status == "folder":
                ignored["files_in_nested_folders"] += _nested_files(entry)
            rows.append({"source": str(entry), "expression": folder.name, "status": status})
    report |= {"class_folders": [p.name for p in folders], "ignored": ignored}
    return pd.DataFrame(rows, columns=["source", "expression", "status"]), report


def read_image(path: Path, max_pixels: int) -> tuple[np.ndarray | None, str]:
    """(RGB uint8 array, "") or (None, reason). Handles EXIF rotation, CMYK, 16-bit, grey, alpha."""
    try:
        if path.stat().st_size == 0:
            return None, "empty file"
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:
                return None, "too large"
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im), ""
    except UnidentifiedImageError:
        return None, "not an image"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "too large"
    except PermissionError:
        return None, "unreadable"
    except (OSError, SyntaxError, ValueError):
        return None, "corrupt or truncated"


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / float grey: rescale, don't clip
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a) if hi == lo else (a - lo) / (hi - lo) * 255
        return np.repeat(a.round().astype(np.uint8)[:, :, None], 3, axis=2)
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(im.convert("RGB"))


def mark_duplicates(images: pd.DataFrame) -> pd.Series:
    """Status per file: "duplicate across classes" for bytes that occur in several classes (their label
    is ambiguous: all copies dropped), "duplicate" for a repeat within one class (the first is kept)."""
    status = pd.Series("", index=images.index, dtype=object)
    for _, group in images.groupby("source_sha256"):
        if len(group) < 2:
            continue
        if group["expression"].nunique() > 1:
            status[group.index] = "duplicate across classes"
        else:
            status[group.index[1:]] = "duplicate"
    return status


def class_order(name: str, n: int, seed: int) -> np.ndarray:
    """The seeded order in which a class's files are examined (keyed by name: stable if classes change)."""
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, key]).permutation(n)


def stage_params(profile: str | None, params_file: Path | None = None) -> dict:
    return config.stage_params("prepare", profile, params_file)


def run(profile: str | None, out_dir: Path, params_file: Path | None = None) -> pd.DataFrame:
    """The stage on params.yaml's source folder: `prepare` with the configured detector and filter."""
    return prepare(stage_params(profile, params_file), Path(out_dir), config.project_root())


def prepare(params: dict, out_dir: Path, root: Path, detector=None, watermark=None) -> pd.DataFrame:
    """Run the prepare stage; write the crops, `data/manifest.csv`, `report.json`, `class_counts.csv`.

    Classes without enough usable images are an error that lists them, raised after the manifest and
    report are written (so you can see why), never a silent shrink of the splits.
    """
    out_dir, data_dir = Path(out_dir), Path(out_dir) / "data"
    source = config.path(params["source"], root)
    images, classes_report = scan(source, params["classes"])
    if images.empty:
        raise DataError(f"no image files under {source}")
    detector = detector or face_detector(
        params["detector"], params["detector_root"], params["detector_pack"], params["detector_threshold"]
    )
    if watermark is None and params["watermark"] != "none":
        watermark = watermark_filter(params["watermark"], params["watermark_threshold"])
    need = {"finetune": params["finetune_per_class"], "eval": params["eval_per_class"]}
    hash_and_mark_duplicates(images)
    written: set[Path] = set()
    groups = images.groupby("expression", sort=True)
    for name, group in tqdm(groups, total=groups.ngroups, desc=f"prepare ({detector.name})", unit="class"):
        order = group.index[class_order(name, len(group), params["seed"])]
        examine_class(images, name, order, need, params, detector, watermark, data_dir, written)
    images.loc[images["status"] == "", "status"] = "not examined"
    resume.prune(data_dir / "images", [data_dir / r for r in written])  # crops of an earlier run's choice
    images["split"] = images["status"].where(images["status"].isin(SPLITS), "")
    images["source"] = [
        str(Path(s).relative_to(root)) if Path(s).is_relative_to(root) else s for s in images["source"]
    ]
    write_csv(data_dir / "manifest.csv", images)
    short = write_report(images, classes_report, need, detector, watermark, out_dir)
    if short:
        listing = ", ".join(f"{n} ({v['finetune']}+{v['eval']})" for n, v in list(short.items())[:20])
        raise DataError(
            f"{len(short)} class(es) have too few usable images for {need['finetune']} fine-tuning + "
            f"{need['eval']} evaluation: {listing}. See {out_dir / 'report.json'} and the manifest for why; "
            "add images or lower prepare.<profile>.finetune_per_class / eval_per_class."
        )
    return images


def hash_and_mark_duplicates(images: pd.DataFrame) -> None:
    """Hash every readable file, mark duplicates and unreadable files, and add the empty columns the
    examination fills (in place)."""
    hashes = []
    entries = zip(images["source"], images["status"], strict=True)
    for path, status in tqdm(entries, total=len(images), desc="hash", unit="file"):
        try:
            hashes.append(f"{status}:{path}" if status else sha256_file(Path(path)))
        except OSError:
            hashes.append(f"unreadable:{path}")
    images["source_sha256"] = hashes
    images["status"] = images["status"].where(images["status"] != "", mark_duplicates(images))
    images.loc[images["source_sha256"].str.startswith("unreadable:"), "status"] = "unreadable"
    for col in ("x0", "y0", "x1", "y1", "score"):
        images[col] = np.nan
    images["faces"] = pd.array([pd.NA] * len(images), dtype="Int64")
    images["watermark_p"] = np.nan
    images["file"] = ""
    images["sha256"] = ""


def examine_class(images, name, order, need, params, detector, watermark, data_dir, written) -> None:
    """One class's files in their seeded `order`, until both splits are full: read, detect exactly one
    face, check for a watermark, crop and write; each examined row gets its split or why it was dropped."""
    filled = dict.fromkeys(SPLITS, 0)
    for i in order:
        if all(filled[s] >= need[s] for s in SPLITS):
            break
        if images.at[i, "status"]:
            continue
        rgb, reason = read_image(Path(images.at[i, "source"]), params["max_pixels"])
        if rgb is None:
            images.at[i, "status"] = reason
            continue
        faces = detector.detect(rgb)
        images.at[i, "faces"] = len(faces)
        if len(faces) != 1:
            images.at[i, "status"] = "no face" if not faces else "several faces"
            continue
        face = faces[0]
        images.loc[i, ["x0", "y0", "x1", "y1"]] = face.box
        images.at[i, "score"] = face.score
        if watermark is not None:
            images.at[i, "watermark_p"] = watermark.probability(rgb)
            if images.at[i, "watermark_p"] > watermark.threshold:
                images.at[i, "status"] = "watermark"
                continue
        split = "finetune" if filled["finetune"] < need["finetune"] else "eval"
        filled[split] += 1
        rel = Path("images") / split / name / f"{Path(images.at[i, 'source']).name}.png"
        if rel in written:
            raise DataError(f"{rel} would be written twice; please report this as a bug")
        written.add(rel)
        crop = square_crop(rgb, face.box, params["crop_margin"], params["resolution"])
        images.at[i, "sha256"] = sha256_bytes(save_png(data_dir / rel, crop))
        images.at[i, "file"] = str(rel)
        images.at[i, "status"] = split


def write_report(images, classes_report, need, detector, watermark, out_dir: Path) -> dict:
    """class_counts.csv, report.json and metrics.json; returns the classes short of either split."""
    counts = images.pivot_table(index="expression", columns="status", aggfunc="size", fill_value=0)
    counts = counts.reindex(columns=[*SPLITS, *REASONS, "not examined"], fill_value=0)
    # every class folder, the empty ones too (a short class, reported, never silently absent)
    counts = counts.reindex(classes_report["class_folders"], fill_value=0).rename_axis("expression")
    write_csv(out_dir / "class_counts.csv", counts.reset_index())
    short = {
        n: {s: int(counts.at[n, s]) for s in SPLITS}
        for n in counts.index
        if any(counts.at[n, s] < need[s] for s in SPLITS)
    }
    report = {
        "detector": getattr(detector, "name", type(detector).__name__),
        "watermark_filter": watermark.name if watermark is not None else "none (not checked)",
        "files": len(images),
        "classes": int(images["expression"].nunique()),
        "classes_missing_from_data": classes_report["missing_from_data"],
        "classes_unknown_to_list": classes_report["unknown_to_list"],
        "status": {k: int(v) for k, v in sorted(Counter(images["status"]).items())},
        "empty_classes": [n for n in counts.index if not (images["expression"] == n).any()],
        "ignored": classes_report["ignored"],
        "short_classes": short,
        **{f"{s}_images": int((images["split"] == s).sum()) for s in SPLITS},
    }
    write_json(out_dir / "report.json", report)
    write_json(
        out_dir / "metrics.json",
        {k: report[k] for k in ("classes", "files", "finetune_images", "eval_images")},
    )
    return short


def plot_filter_counts(out_dir: Path, save_to: Path | None = None):
    """What happened to the files: totals per outcome, and per class (seaborn heatmap)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    counts = pd.read_csv(Path(out_dir) / "class_counts.csv").set_index("expression")
    counts = counts.loc[:, counts.sum() > 0]
    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(13, max(4, 0.07 * len(counts))), gridspec_kw={"width_ratios": [1, 2]}
    )
    totals = counts.sum().sort_values()
    sns.barplot(x=totals.values, y=totals.index, ax=ax1, color="steelblue")
    ax1.set(title="Files by outcome", xlabel="files", ylabel="")
    sns.heatmap(counts, ax=ax2, cmap="viridis", cbar_kws={"label": "files"})
    ax2.set(title="Per class", xlabel="", ylabel="")
    ax2.tick_params(axis="y", labelsize=4)
    fig.tight_layout()
    if save_to:
        fig.savefig(save_to, dpi=120)
    return fig


def sample_grid(
    manifest: pd.DataFrame, prepare_dir: Path, n: int = 24, seed: int = 0, save_to: Path | None = None
):
    """A grid of `n` randomly chosen prepared images with their class."""
    import matplotlib.pyplot as plt

    used = manifest[manifest["split"].isin(SPLITS)]
    rows = used.sample(min(n, len(used)), random_state=seed)
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


def main(argv: list[str] | None = None) -> int:
    return cli.stage_main(run, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
