"""Reading the project's images: RGB with EXIF orientation, batches as tensors, PIL-faithful resizing of
tensors, and the prepared splits.

Shared by every stage and network that reads a file (prepare writes the splits; the others read them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps


def load_rgb(path: Path) -> Image.Image:
    """Open an image as RGB with its EXIF orientation applied."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return im.convert("RGB")


def resize_like_pil(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size) as PIL's bilinear resize (torchvision's `Resize` on PIL images)
    computes it: a triangle filter widened by the scale when shrinking (antialiased), plain bilinear when
    enlarging. Differentiable. Unchanged sizes pass through; enlarging keeps the plain bilinear kernel
    (the same weights as PIL's there, and bit for bit what this function did before it antialiased)."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    shrinking = h > size or w > size
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)


def load_images(paths: list[str], resolution: int) -> torch.Tensor:
    """Images as a (N, 3, R, R) tensor in [-1, 1] (loaded per batch: 1,080 at 1024 px won't fit)."""
    out = []
    for p in paths:
        img = load_rgb(Path(p))
        if img.size != (resolution, resolution):
            img = img.resize((resolution, resolution))
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
    return torch.stack(out)


def read_split(prepare_dir: Path, split: str) -> pd.DataFrame:
    """The rows of one split from the prepare stage's manifest, with absolute image paths."""
    data_dir = Path(prepare_dir) / "data"
    manifest_path = data_dir / "manifest.csv"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: run the prepare stage first (dvc repro prepare)")
    manifest = pd.read_csv(manifest_path, keep_default_na=False)
    rows = manifest[manifest["split"] == split].reset_index(drop=True)
    rows["path"] = [str(data_dir / f) for f in rows["file"]]
    return rows
