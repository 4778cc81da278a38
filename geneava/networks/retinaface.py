"""RetinaFace (Deng et al., CVPR 2020), MobileNet-0.25 configuration, in PyTorch.

The paper detects faces with RetinaFace. This is its single-stage design: a MobileNetV1-0.25 trunk,
a feature pyramid over three strides (8, 16, 32), an SSH context module per level and 1x1 heads for
face/background, box offsets and five landmarks, on two square anchors per cell. Module names follow
the widely used PyTorch port (biubug6/Pytorch_Retinaface), so its `mobilenet0.25_Final.pth` loads
into `RetinaFace` unchanged (`load`, weights only); the default world trains one on procedural faces
(`geneava.world.train`), and `tiny` is a seeded, untrained one for tests. All three run through
`detect` and `faces.TorchRetinaFace`.

Inputs are BGR minus the port's channel means (104, 117, 123), unscaled, as it was trained.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MIN_SIZES = ((16, 32), (64, 128), (256, 512))
STEPS = (8, 16, 32)
VARIANCE = (0.1, 0.2)
MEAN_BGR = (104.0, 117.0, 123.0)


def _conv_bn(inp: int, oup: int, stride: int = 1, leaky: float = 0.0, k: int = 3, relu: bool = True):
    layers = [nn.Conv2d(inp, oup, k, stride, k // 2, bias=False), nn.BatchNorm2d(oup)]
    if relu:
        layers.append(nn.LeakyReLU(leaky, inplace=True))
    return nn.Sequential(*layers)


def _conv_dw(inp: int, oup: int, stride: int, leaky: float = 0.1):
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.LeakyReLU(leaky, inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.LeakyReLU(leaky, inplace=True),
    )


class MobileNetV1(nn.Module):
    """MobileNetV1 at width 0.25 up to stride 32; returns the stride 8, 16 and 32 features."""

    def __init__(self):
        super().__init__()
        self.stage1 = nn.Sequential(
            _conv_bn(3, 8, 2, leaky=0.1),
            _conv_dw(8, 16, 1),
            _conv_dw(16, 32, 2),
            _conv_dw(32, 32, 1),
            _conv_dw(32, 64, 2),
            _conv_dw(64, 64, 1),
        )
        self.stage2 = nn.Sequential(_conv_dw(64, 128, 2), *[_conv_dw(128, 128, 1) for _ in range(5)])
        self.stage3 = nn.Sequential(_conv_dw(128, 256, 2), _conv_dw(256, 256, 1))

    def forward(self, x):
        c1 = self.stage1(x)
        c2 = self.stage2(c1)
        return [c1, c2, self.stage3(c2)]


class FPN(nn.Module):
    def __init__(self, in_channels: tuple[int, int, int], out: int):
        super().__init__()
        leaky = 0.1 if out <= 64 else 0.0
        self.output1, self.output2, self.output3 = (_conv_bn(c, out, 1, leaky, k=1) for c in in_channels)
        self.merge1 = _conv_bn(out, out, leaky=leaky)
        self.merge2 = _conv_bn(out, out, leaky=leaky)

    def forward(self, feats):
        o1, o2, o3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[-2:], mode="nearest"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[-2:], mode="nearest"))
        return [o1, o2, o3]


class SSH(nn.Module):
    """Context module: 3x3, 5x5 and 7x7 receptive fields from stacked 3x3 convolutions."""

    def __init__(self, cin: int, out: int):
        super().__init__()
        leaky = 0.1 if out <= 64 else 0.0
        self.conv3X3 = _conv_bn(cin, out // 2, relu=False)
        self.conv5X5_1 = _conv_bn(cin, out // 4, leaky=leaky)
        self.conv5X5_2 = _conv_bn(out // 4, out // 4, relu=False)
        self.conv7X7_2 = _conv_bn(out // 4, out // 4, leaky=leaky)
        self.conv7x7_3 = _conv_bn(out // 4, out // 4, relu=False)

    def forward(self, x):
        c5 = self.conv5X5_1(x)
        c7 = self.conv7X7_2(c5)
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(c5), self.conv7x7_3(c7)], 1))


class _Head(nn.Module):
    def __init__(self, cin: int, per_anchor: int, anchors: int = 2):
        super().__init__()
        self.conv1x1 = nn.Conv2d(cin, anchors * per_anchor, 1)
        self.per_anchor = per_anchor

    def forward(self, x):
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.per_anchor)


class RetinaFace(nn.Module):
    """forward(x) -> (box offsets (B, A, 4), face/background logits (B, A, 2), landmarks (B, A, 10)),
    over the anchors of `priors(H, W)` in the same order."""

    def __init__(self, in_channel: int = 32, out_channel: int = 64):
        super().__init__()
        self.body = MobileNetV1()
        self.fpn = FPN((in_channel * 2, in_channel * 4, in_channel * 8), out_channel)
        self.ssh1, self.ssh2, self.ssh3 = (SSH(out_channel, out_channel) for _ in range(3))
        self.ClassHead = nn.ModuleList(_Head(out_channel, 2) for _ in STEPS)
        self.BboxHead = nn.ModuleList(_Head(out_channel, 4) for _ in STEPS)
        self.LandmarkHead = nn.ModuleList(_Head(out_channel, 10) for _ in STEPS)

    def forward(self, x):
        p = self.fpn(self.body(x))
        feats = (self.ssh1(p[0]), self.ssh2(p[1]), self.ssh3(p[2]))
        return tuple(
            torch.cat([head[i](f) for i, f in enumerate(feats)], 1)
            for head in (self.BboxHead, self.ClassHead, self.LandmarkHead)
        )


def priors(height: int, width: int) -> torch.Tensor:
    """Anchors (cx, cy, w, h), relative to the image, in the heads' order: level, row, column, size."""
    out = []
    for step, sizes in zip(STEPS, MIN_SIZES, strict=True):
        fh, fw = math.ceil(height / step), math.ceil(width / step)
        cy, cx = torch.meshgrid(
            (torch.arange(fh) + 0.5) * step / height, (torch.arange(fw) + 0.5) * step / width, indexing="ij"
        )
        for_size = [
            torch.stack([cx, cy, torch.full_like(cx, s / width), torch.full_like(cy, s / height)], -1)
            for s in sizes
        ]
        out.append(torch.stack(for_size, 2).reshape(-1, 4))
    return torch.cat(out)


def decode(loc: torch.Tensor, landm: torch.Tensor, anchors: torch.Tensor):
    """Boxes (x0, y0, x1, y1) and landmarks (5, 2), relative to the image, from the heads' offsets."""
    centre = anchors[:, :2] + loc[..., :2] * VARIANCE[0] * anchors[:, 2:]
    size = anchors[:, 2:] * torch.exp(loc[..., 2:] * VARIANCE[1])
    boxes = torch.cat([centre - size / 2, centre + size / 2], -1)
    pts = landm.reshape(*landm.shape[:-1], 5, 2)
    points = anchors[:, None, :2] + pts * VARIANCE[0] * anchors[:, None, 2:]
    return boxes, points


def encode(boxes: torch.Tensor, points: torch.Tensor, anchors: torch.Tensor):
    """The inverse of `decode`: regression targets of matched boxes/landmarks for their anchors."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    size = (boxes[:, 2:] - boxes[:, :2]).clamp_min(1e-6)
    loc = torch.cat(
        [
            (centre - anchors[:, :2]) / (VARIANCE[0] * anchors[:, 2:]),
            torch.log(size / anchors[:, 2:]) / VARIANCE[1],
        ],
        1,
    )
    landm = (points - anchors[:, None, :2]) / (VARIANCE[0] * anchors[:, None, 2:])
    return loc, landm.reshape(len(anchors), 10)


def to_input(rgb: np.ndarray | torch.Tensor) -> torch.Tensor:
    """HWC uint8 RGB (or a BCHW float batch in [0, 1], RGB) -> the network's BGR mean-subtracted input."""
    if isinstance(rgb, np.ndarray):
        x = torch.from_numpy(np.array(rgb, dtype=np.float32)).permute(2, 0, 1)[None]
    else:
        x = rgb.float() * 255.0
    mean = torch.tensor(MEAN_BGR, device=x.device).view(1, 3, 1, 1)
    return x.flip(1) - mean


@torch.no_grad()
def detect(model: RetinaFace, rgb: np.ndarray, threshold: float = 0.5, nms: float = 0.4):
    """[(box (x0, y0, x1, y1) in pixels, score, 5 landmarks in pixels)] of one RGB image, best first."""
    from torchvision.ops import nms as box_nms

    h, w = rgb.shape[:2]
    device = next(model.parameters()).device
    loc, logits, landm = model(to_input(rgb).to(device))
    anchors = priors(h, w).to(device)
    scores = logits[0].softmax(-1)[:, 1]
    keep = scores > threshold
    boxes, points = decode(loc[0][keep], landm[0][keep], anchors[keep])
    scale = torch.tensor([w, h], device=device, dtype=boxes.dtype)
    boxes, points, scores = boxes * scale.repeat(2), points * scale, scores[keep]
    order = box_nms(boxes, scores, nms)
    return [
        (tuple(boxes[i].tolist()), float(scores[i]), tuple(map(tuple, points[i].tolist()))) for i in order
    ]


# ------------------------------------------------------------------ training (the default world)


def targets(gt_boxes: torch.Tensor, gt_points: torch.Tensor, anchors: torch.Tensor, threshold: float = 0.35):
    """RetinaFace's matching: each anchor takes the face it overlaps most if IoU >= `threshold`, and
    each face its best anchor regardless. Returns (labels (A,), loc (A, 4), landm (A, 10))."""
    from torchvision.ops import box_iou

    a = len(anchors)
    labels = torch.zeros(a, dtype=torch.long)
    if len(gt_boxes) == 0:
        return labels, torch.zeros(a, 4), torch.zeros(a, 10)
    corners = torch.cat([anchors[:, :2] - anchors[:, 2:] / 2, anchors[:, :2] + anchors[:, 2:] / 2], 1)
    iou = box_iou(gt_boxes, corners)  # (G, A)
    best_gt_iou, best_gt = iou.max(0)
    best_anchor = iou.argmax(1)
    best_gt_iou[best_anchor] = 1.0
    best_gt[best_anchor] = torch.arange(len(gt_boxes))
    labels[best_gt_iou >= threshold] = 1
    loc, landm = encode(gt_boxes[best_gt], gt_points[best_gt], anchors)
    return labels, loc, landm


def loss(
    outputs, labels: torch.Tensor, loc_t: torch.Tensor, landm_t: torch.Tensor, neg_pos: int = 7
) -> dict[str, torch.Tensor]:
    """MultiBox loss with hard negative mining (`neg_pos` negatives per positive), as RetinaFace
    trains: smooth L1 on boxes and landmarks of positive anchors, cross-entropy on the kept anchors."""
    loc, logits, landm = outputs
    pos = labels > 0
    n_pos = pos.sum().clamp_min(1)
    ce = F.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1), reduction="none").view_as(labels)
    mined = ce.detach().masked_fill(pos, 0)
    rank = mined.argsort(1, descending=True).argsort(1)
    # an image without faces still trains the background class on its hardest `neg_pos` anchors
    neg = rank < (neg_pos * pos.sum(1, keepdim=True).clamp_min(1)).clamp(max=labels.shape[1] - 1)
    terms = {
        "loc": F.smooth_l1_loss(loc[pos], loc_t[pos], reduction="sum") / n_pos,
        "conf": ce[pos | neg].sum() / n_pos,
        "landm": F.smooth_l1_loss(landm[pos], landm_t[pos], reduction="sum") / n_pos,
    }
    terms["total"] = 2.0 * terms["loc"] + terms["conf"] + terms["landm"]
    return terms


# ------------------------------------------------------------------ loading


def tiny(seed: int = 0) -> RetinaFace:
    """A seeded, untrained RetinaFace (tests): same architecture, detects nothing meaningful."""
    torch.manual_seed(seed)
    return RetinaFace().eval()


def load(path: str | Path) -> RetinaFace:
    """RetinaFace weights from safetensors (ours) or the PyTorch port's .pth (loaded weights only)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the world's detector is trained by the world stage (models/world), or "
            "download mobilenet0.25_Final.pth of biubug6/Pytorch_Retinaface (see docs/stages/prepare.md)"
        )
    from geneava.networks import pretrained

    path = pretrained.checked(path)  # the fetched RetinaFace: verified against its pin
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        state = {k.removeprefix("module."): v for k, v in state.items()}
    model = RetinaFace()
    missing, unexpected = model.load_state_dict(state, strict=False)
    wanted = [k for k in missing if not k.endswith("num_batches_tracked")]
    if wanted or unexpected:
        raise ValueError(
            f"{path} is not a RetinaFace MobileNet-0.25 checkpoint: missing {wanted[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )
    return model.eval()
