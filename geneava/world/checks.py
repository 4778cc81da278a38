"""Checks of the world's trained models on held-out renders (recorded in models/world/report.json)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from geneava.core import emo135
from geneava.networks import retinaface
from geneava.world.samples import as_float


@torch.no_grad()
def check_vae(vae, pool: torch.Tensor) -> dict:
    x = as_float(pool)
    rec = torch.cat([vae.decode(vae.encode(c).latent_dist.mean).sample for c in x.split(64)]).clamp(-1, 1)
    mse = F.mse_loss((rec + 1) / 2, (x + 1) / 2).item()
    return {"heldout_psnr_db": round(10 * math.log10(1 / mse), 2), "images": len(x)}


@torch.no_grad()
def check_expression(model, pool: torch.Tensor, labels: np.ndarray) -> dict:
    logits = torch.cat([model.classify(as_float(c))[0] for c in pool.split(64)])
    pred = logits.argmax(1).numpy()
    primary = np.array([c.primary for c in emo135.classes()])
    return {
        "heldout_accuracy": round(float((pred == labels).mean()), 4),
        "heldout_primary_accuracy": round(float((primary[pred] == primary[labels]).mean()), 4),
        "chance": round(1 / 135, 4),
        "images": len(labels),
    }


@torch.no_grad()
def check_identity(net, pool: torch.Tensor, labels: np.ndarray, threshold: float) -> dict:
    """Verification on held-out people: all same-person pairs vs as many different-person pairs."""
    emb = F.normalize(torch.cat([net(as_float(c)) for c in pool.split(64)]))
    sim = emb @ emb.T
    same = torch.as_tensor(labels[:, None] == labels[None, :])
    upper = torch.triu(torch.ones_like(same), 1)
    pos, neg = sim[same & upper], sim[~same & upper]
    neg = neg[torch.randperm(len(neg), generator=torch.Generator().manual_seed(0))[: len(pos)]]
    return {
        "same_mean_cosine": round(float(pos.mean()), 4),
        "different_mean_cosine": round(float(neg.mean()), 4),
        "threshold": threshold,
        "true_accept_rate": round(float((pos > threshold).float().mean()), 4),
        "false_accept_rate": round(float((neg > threshold).float().mean()), 4),
        "people": int(len(np.unique(labels))),
    }


@torch.no_grad()
def check_detector(model, pool: torch.Tensor, boxes: list[torch.Tensor], points: list[torch.Tensor]) -> dict:
    """Held-out canvases: faces found at IoU >= 0.5, false detections, images with the right count of
    faces (what QC's one-face rule needs) and landmark error relative to the box width."""
    from torchvision.ops import box_iou

    found = false = right = 0
    errors = []
    for img, b, pts in zip(pool, boxes, points, strict=True):
        dets = retinaface.detect(model, img.permute(1, 2, 0).numpy())
        right += len(dets) == len(b)
        if not dets:
            continue
        pred = torch.tensor([d[0] for d in dets])
        iou = box_iou(b, pred) if len(b) else torch.zeros(0, len(pred))
        hit = iou.max(1).values >= 0.5 if len(b) else torch.zeros(0, dtype=torch.bool)
        found += int(hit.sum())
        false += int(len(pred) - (iou.max(0).values >= 0.5).sum()) if len(b) else len(pred)
        for k in torch.nonzero(hit).flatten().tolist():
            j = int(iou[k].argmax())
            err = (torch.tensor(dets[j][2]) - pts[k]).norm(dim=1).mean() / (b[k, 2] - b[k, 0])
            errors.append(float(err))
    faces = sum(len(b) for b in boxes)
    return {
        "heldout_recall": round(found / max(1, faces), 4),
        "false_detections": false,
        "right_count_share": round(right / len(pool), 4),
        "landmark_error_of_box_width": round(float(np.mean(errors)) if errors else float("nan"), 4),
        "images": len(pool),
        "faces": faces,
    }
