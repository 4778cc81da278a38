"""Pairwise metrics of Table 1 as matrix products (paper, "Table 1").

Every statistic is a mean over pairs (generated image, evaluation image): cosine similarity of CLIP /
DINOv2 embeddings, Euclidean distance of POSTER embeddings, and LPIPS. Embeddings are computed once
per image; pairs are never looped over in Python.

LPIPS all-pairs, exactly. LPIPS(a, b) = Σ_l mean_hw Σ_c w_lc (â_lchw − b̂_lchw)² with â the
channel-normalised features of layer l and w_l the learned linear weights. Expanding the square,
LPIPS(a, b) = q(a) + q(b) − 2⟨a, b⟩ with q(x) = Σ_l Σ_chw w_lc x̂²/HW_l and ⟨a, b⟩ the same weighted
inner product: all pairs are two squared-norm vectors and one Gram matrix over cached features. It is
computed in float64 and in blocks, so memory stays bounded and the cancellation error stays ≪ 1e-5.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch

# ------------------------------------------------------------------ embeddings-based pairwise statistics


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n_a, n_b) cosine similarities of two sets of embeddings."""
    a = torch.nn.functional.normalize(a.double(), dim=1)
    b = torch.nn.functional.normalize(b.double(), dim=1)
    return a @ b.T


def euclidean_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n_a, n_b) Euclidean distances, via ‖a‖² + ‖b‖² − 2 a·b (float64, clamped at 0)."""
    a, b = a.double(), b.double()
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return sq.clamp_min(0).sqrt()


# ------------------------------------------------------------------ LPIPS as a Gram matrix


class LpipsGram:
    """All-pairs LPIPS from a `lpips.LPIPS` model's own backbone and learned linear weights."""

    def __init__(self, model):
        if not model.lpips or model.spatial:
            raise ValueError("LpipsGram needs lpips=True, spatial=False (the metric of the paper)")
        self.model = model.eval()
        # each linear layer is a bias-free 1x1 conv to one channel: its weights are the w_lc
        self.weights = [lin.model[-1].weight.detach().double().flatten() for lin in model.lins]

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: the flattened, channel-normalised features of every layer, each scaled by
        w_lc / HW_l on one side (`weighted`) and plain on the other (`plain`). Images in [-1, 1]."""
        import lpips

        plain, weighted = [], []
        for chunk in images.split(batch):
            device = next(self.model.parameters()).device
            outs = self.model.net.forward(self.model.scaling_layer(chunk.to(device)))
            p, w = [], []
            for feat, wl in zip(outs, self.weights, strict=True):
                f = lpips.normalize_tensor(feat).double().cpu()  # (n, C, H, W)
                hw = f.shape[2] * f.shape[3]
                p.append(f.flatten(1))
                w.append((f * wl.view(1, -1, 1, 1) / hw).flatten(1))
            plain.append(torch.cat(p, 1))
            weighted.append(torch.cat(w, 1))
        return torch.cat(plain), torch.cat(weighted)

    @staticmethod
    def pairs(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], block: int = 1024):
        """(n_a, n_b) LPIPS for feature sets from `features`, in row blocks of `block`."""
        (pa, wa), (pb, wb) = a, b
        qb = (wb * pb).sum(1)
        out = torch.empty(len(pa), len(pb), dtype=torch.float64)
        for i in range(0, len(pa), block):
            qa = (wa[i : i + block] * pa[i : i + block]).sum(1)
            out[i : i + block] = qa[:, None] + qb[None, :] - 2 * wa[i : i + block] @ pb.T
        return out


# ------------------------------------------------------------------ per-class means and uncertainty


def class_bootstrap(
    matrices: dict[str, list[np.ndarray]], n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, dict[str, float]]:
    """Mean of per-class pair means, with percentile bootstrap CIs, for paired variants.

    `matrices[variant][k]` is class k's (generated rows x evaluation images) pair matrix; the rows are
    the same prompts in every variant (same seeds), and a row a variant dropped (QC) is all NaN. Each
    bootstrap draw resamples, within every class, the prompt rows and the evaluation images, and uses the
    same draw for every variant, so the CI of the difference (first variant minus second) is paired.
    A draw is one weighted mean per class and variant (counts @ M @ counts), never a loop over pairs.
    """
    names = list(matrices)
    n_classes = {len(v) for v in matrices.values()}
    if len(n_classes) != 1:
        raise ValueError("every variant needs one matrix per class")
    rng = np.random.default_rng(seed)
    point = {v: [] for v in names}
    draws = {v: [] for v in names}
    for k in range(n_classes.pop()):
        shapes = {matrices[v][k].shape for v in names}
        if len(shapes) != 1:
            raise ValueError(f"class {k}: variants have different pair matrices {sorted(shapes)}")
        nr, ne = shapes.pop()
        rows = rng.multinomial(nr, np.full(nr, 1 / nr), size=n_boot).astype(np.float64)
        cols = rng.multinomial(ne, np.full(ne, 1 / ne), size=n_boot).astype(np.float64)
        for v in names:
            m = np.asarray(matrices[v][k], dtype=np.float64)
            valid = ~np.isnan(m).any(axis=1)
            point[v].append(m[valid].mean() if valid.any() else np.nan)
            with np.errstate(invalid="ignore", divide="ignore"):
                num = np.einsum("bi,ij,bj->b", rows * valid, np.nan_to_num(m), cols)
                draws[v].append(num / ((rows @ valid) * cols.sum(1)))
    out = {}
    q = [(1 - level) / 2, (1 + level) / 2]

    def summary(p: np.ndarray, d: np.ndarray) -> dict[str, float]:
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a draw without a valid row in some class
            per_draw = np.nanmean(d, axis=0)
            lo, hi = np.nanquantile(per_draw, q)
            return {
                "mean": float(np.nanmean(p)),
                "lo": float(lo),
                "hi": float(hi),
                "classes": int(np.isfinite(p).sum()),
            }

    for v in names:
        out[v] = summary(np.array(point[v]), np.array(draws[v]))
    if len(names) >= 2:
        a, b = names[:2]
        out[f"{a} - {b}"] = summary(
            np.array(point[a]) - np.array(point[b]), np.array(draws[a]) - np.array(draws[b])
        )
    return out


def bootstrap_ci(
    matrix: torch.Tensor, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean of one pair matrix and a percentile bootstrap CI that resamples images on both sides."""
    s = class_bootstrap({"x": [matrix.double().numpy()]}, n_boot, seed, level)["x"]
    return s["mean"], s["lo"], s["hi"]


def block_mean(
    pair_matrix: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    a: torch.Tensor,
    b: torch.Tensor,
    block: int = 4096,
) -> float:
    """Mean of `pair_matrix(a, b)` over all pairs, computed in row blocks so memory stays bounded."""
    total = 0.0
    for i in range(0, len(a), block):
        total += float(pair_matrix(a[i : i + block], b).sum())
    return total / (len(a) * len(b))
