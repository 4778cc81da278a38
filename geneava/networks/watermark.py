"""Watermark filter (paper: images with watermarks dropped, detector of boomb0om/watermark-detection).

The paper's classifier is a ConvNeXt-T with an MLP head 768 -> 512 -> 256 -> 2, input 256x256 with
ImageNet normalisation, class 1 = watermarked. `ConvNeXt` here is our own implementation with the
parameter names of Meta's reference code that checkpoint uses, so its weights load from a local file
(`prepare.<profile>.watermark: <path>`), safely. `none` checks nothing and the stage says so.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from geneava.core.io import load_tensors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class LayerNorm2d(nn.Module):
    """LayerNorm over channels of an (N, C, H, W) map (the reference's channels_first LayerNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim)), eps

    def forward(self, x):
        return F.layer_norm(
            x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps
        ).permute(0, 3, 1, 2)


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1, self.act, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(1e-6 * torch.ones(dim))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), head=(512, 256, 2)):
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0]))]
            + [
                nn.Sequential(LayerNorm2d(dims[i]), nn.Conv2d(dims[i], dims[i + 1], 2, stride=2))
                for i in range(3)
            ]
        )
        self.stages = nn.ModuleList(
            [nn.Sequential(*[Block(d) for _ in range(n)]) for d, n in zip(dims, depths, strict=True)]
        )
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        sizes = (dims[-1], *head)
        layers: list[nn.Module] = []
        for i in range(len(head)):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(head) - 1:
                layers.append(nn.GELU())
        self.head = nn.Sequential(*layers)

    def forward(self, x):
        for down, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(down(x))
        return self.head(self.norm(x.mean((-2, -1))))


class WatermarkClassifier:
    """P(watermarked) for RGB uint8 images; drops an image when it exceeds `threshold`."""

    def __init__(self, model: ConvNeXt, threshold: float = 0.5, name: str = "convnext-tiny"):
        self.model, self.threshold, self.name = model.eval(), threshold, name

    @torch.no_grad()
    def probability(self, rgb: np.ndarray) -> float:
        """Fed as upstream feeds it: PIL image -> `Resize((256, 256))` (PIL's bilinear, antialiased, on
        uint8) -> `ToTensor` -> ImageNet `Normalize`."""
        small = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).resize(
            (256, 256), Image.Resampling.BILINEAR
        )
        x = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return float(self.model(x).softmax(-1)[0, 1])

    def is_watermarked(self, rgb: np.ndarray) -> bool:
        return self.probability(rgb) > self.threshold


def watermark_filter(source: str, threshold: float = 0.5) -> WatermarkClassifier | None:
    """`none`, or the ConvNeXt-T classifier with weights from a local file (never downloaded)."""
    if source == "none":
        return None
    from geneava.core import config

    path = config.path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"watermark model {path} not found. Download convnext-tiny_watermarks_detector.pth from the "
            "hub repo boomb0om/watermark-detectors and point prepare.<profile>.watermark at it, or use none."
        )
    state = load_tensors(path)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    model = ConvNeXt()
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    return WatermarkClassifier(model, threshold)
