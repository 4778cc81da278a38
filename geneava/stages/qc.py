"""Quality control of generated faces (paper: drop images with more than one face, and images where
the face is too close to the camera, i.e. facial features incomplete), with the data stage's detector."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from geneava.networks.faces import Face


def check(faces: list[Face], width: int, height: int, border: float) -> str:
    """ "" if the image passes, else why not: no face, several faces, or face too close (its box
    touches or leaves the frame within `border` x size, or a landmark lies outside the image)."""
    if not faces:
        return "no face"
    if len(faces) > 1:
        return "several faces"
    x0, y0, x1, y1 = faces[0].box
    mx, my = border * width, border * height
    if x0 < mx or y0 < my or x1 > width - mx or y1 > height - my:
        return "face too close"
    if faces[0].landmarks is not None:
        pts = np.asarray(faces[0].landmarks, dtype=float)
        if (pts < 0).any() or (pts[:, 0] >= width).any() or (pts[:, 1] >= height).any():
            return "face too close"
    return ""


def image_check(detector, rgb: np.ndarray, border: float) -> tuple[str, int]:
    faces = detector.detect(rgb)
    return check(faces, rgb.shape[1], rgb.shape[0], border), len(faces)


KEPT = ("pass", "not checked")  # verdicts of images that stay in the dataset


def generated(generate_dir: Path, variant: str = "finetuned", include: str = "all") -> pd.DataFrame:
    """A generated variant's manifest with each image's `path` and whether it passed QC (`kept`);
    `include="kept"` keeps only those (the dataset), `"all"` every rendered image."""
    path = Path(generate_dir) / variant / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the generate stage first (dvc repro generate)")
    m = pd.read_csv(path, keep_default_na=False)
    m["path"] = [str(Path(generate_dir) / variant / f) for f in m["file"]]
    m["kept"] = m["qc"].isin(KEPT)
    return m[m["kept"]].reset_index(drop=True) if include == "kept" else m
