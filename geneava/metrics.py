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
            outs = self.model.net.forward(self.model.scaling_layer(chunk))
            p, w = [], []
            for feat, wl in zip(outs, self.weights, strict=True):
                f = lpips.normalize_tensor(feat).double()  # (n, C, H, W)
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


def per_class_means(
    pair_matrix: Callable[[np.ndarray, np.ndarray], torch.Tensor],
    gen_labels: np.ndarray,
    eval_labels: np.ndarray,
) -> dict[str, float]:
    """Mean of `pair_matrix(gen_idx, eval_idx)` over the pairs of each class (generated images of
    class c x evaluation images of class c): the paper's pairing."""
    out = {}
    for c in sorted(set(gen_labels) & set(eval_labels)):
        gi, ei = np.flatnonzero(gen_labels == c), np.flatnonzero(eval_labels == c)
        out[c] = float(pair_matrix(gi, ei).mean())
    return out


def bootstrap_ci(
    matrix: torch.Tensor, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean of a pair matrix and a percentile bootstrap CI that resamples images on both sides."""
    m = matrix.double().numpy()
    rng = np.random.default_rng(seed)
    na, nb = m.shape
    stats = np.empty(n_boot)
    for k in range(n_boot):  # each resample: one weighted mean, no pair loop
        ca = np.bincount(rng.integers(0, na, na), minlength=na)
        cb = np.bincount(rng.integers(0, nb, nb), minlength=nb)
        stats[k] = ca @ m @ cb / (na * nb)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(m.mean()), float(lo), float(hi)
