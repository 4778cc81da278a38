"""POSTER (Zheng et al., ICCV 2023), the paper's expression encoder E_exp, written for our use.

Architecture of the official `pyramid_trans_expr` (github zczcwh/POSTER), with its parameter names, so the
official checkpoint loads with a strict key match: `ir_back` (IR-50's first three stages at 112 px; its
256x14x14 map *viewed*, not permuted, as 49 tokens of 1024, as upstream does; `ir_layer` 1024 -> 512),
`face_landback` (frozen MobileFaceNet; 512x7x7 -> 49 tokens), `pyramid_fuse` (8 blocks of two-way
cross-attention at widths 512/256/128, LayerNorm; the image class token is the output), `se_block`, `head`.
`forward` returns (logits, 512-d feature before the head): the feature is the embedding of the paper's
L_exp. `PosterConfig.tiny()` keeps every part and reshape at toy width, for the offline default.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from geneava.core.images import resize_like_pil
from geneava.core.io import load_tensors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHANNELS = ("rgb", "bgr")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PosterConfig:
    num_classes: int = 7
    # IR trunk: channels and units per stage (IR-50 keeps its first three stages)
    ir_channels: tuple[int, ...] = (64, 128, 256)
    ir_units: tuple[int, ...] = (3, 4, 14)
    # MobileFaceNet widths: stem/stage-3, stage-4/5, expansion groups, final map, landmark outputs
    mfn_c1: int = 64
    mfn_c2: int = 128
    mfn_groups: tuple[int, int, int, int, int, int] = (128, 128, 256, 256, 512, 256)
    mfn_blocks: tuple[int, int, int] = (4, 6, 2)
    mfn_out: int = 512
    mfn_landmarks: int = 136
    embed_dim: int = 512
    depth: int = 8  # "large"; small 4, base 6
    num_heads: int = 8
    mlp_ratio: float = 2.0
    image_size: int = 224

    @classmethod
    def tiny(cls, num_classes: int = 7) -> PosterConfig:
        return cls(
            num_classes=num_classes, ir_channels=(8, 16, 32), ir_units=(1, 1, 2), mfn_c1=8, mfn_c2=16,
            mfn_groups=(16, 16, 32, 32, 64, 32), mfn_blocks=(1, 1, 1), mfn_out=64, mfn_landmarks=136,
            embed_dim=64, depth=2, num_heads=4,
        )  # fmt: skip


# ------------------------------------------------------------------ IR trunk (ArcFace IR-50)


class BottleneckIR(nn.Module):
    def __init__(self, cin: int, depth: int, stride: int):
        super().__init__()
        if cin == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(cin, depth, 1, stride, bias=False), nn.BatchNorm2d(depth)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
        )

    def forward(self, x):
        return self.res_layer(x) + self.shortcut_layer(x)


class IRTrunk(nn.Module):
    def __init__(self, channels: tuple[int, ...], units: tuple[int, ...]):
        super().__init__()
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, channels[0], 3, 1, 1, bias=False), nn.BatchNorm2d(channels[0]), nn.PReLU(channels[0])
        )
        blocks, cin = [], channels[0]
        for depth, n in zip(channels, units, strict=True):
            blocks.append(BottleneckIR(cin, depth, 2))
            blocks += [BottleneckIR(depth, depth, 1) for _ in range(n - 1)]
            cin = depth
        self.body = nn.Sequential(*blocks)
        self.out_channels = channels[-1]

    def forward(self, x):
        x = self.body(self.input_layer(F.interpolate(x, size=112)))
        # upstream reinterprets the (C, 14, 14) map's memory as 49 tokens; keep it bit-for-bit
        return x.reshape(-1, 49, self.out_channels * 196 // 49)


# ------------------------------------------------------------------ MobileFaceNet landmark branch


class ConvBlock(nn.Module):
    def __init__(self, cin, cout, kernel=1, stride=1, padding=0, groups=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        if act:
            self.prelu = nn.PReLU(cout)

    def forward(self, x):
        x = self.bn(self.conv(x))
        return self.prelu(x) if hasattr(self, "prelu") else x


class DepthWise(nn.Module):
    def __init__(self, cin, cout, groups, stride, residual=False):
        super().__init__()
        self.conv = ConvBlock(cin, groups)
        self.conv_dw = ConvBlock(groups, groups, 3, stride, 1, groups=groups)
        self.project = ConvBlock(groups, cout, act=False)
        self.residual = residual

    def forward(self, x):
        y = self.project(self.conv_dw(self.conv(x)))
        return x + y if self.residual else y


class Residual(nn.Module):
    def __init__(self, c, num_block, groups):
        super().__init__()
        self.model = nn.Sequential(*[DepthWise(c, c, groups, 1, residual=True) for _ in range(num_block)])

    def forward(self, x):
        return self.model(x)


class GDC(nn.Module):
    """The landmark head; POSTER computes but ignores its output, kept so the checkpoint loads whole."""

    def __init__(self, channels, out):
        super().__init__()
        self.conv_6_dw = ConvBlock(channels, channels, 7, 1, 0, groups=channels, act=False)
        self.linear = nn.Linear(channels, out, bias=False)
        self.bn = nn.BatchNorm1d(out)


class MobileFaceNet(nn.Module):
    def __init__(self, cfg: PosterConfig):
        super().__init__()
        c1, c2, g = cfg.mfn_c1, cfg.mfn_c2, cfg.mfn_groups
        self.conv1 = ConvBlock(3, c1, 3, 2, 1)
        self.conv2_dw = ConvBlock(c1, c1, 3, 1, 1, groups=c1)
        self.conv_23 = DepthWise(c1, c1, g[0], 2)
        self.conv_3 = Residual(c1, cfg.mfn_blocks[0], g[1])
        self.conv_34 = DepthWise(c1, c2, g[2], 2)
        self.conv_4 = Residual(c2, cfg.mfn_blocks[1], g[3])
        self.conv_45 = DepthWise(c2, c2, g[4], 2)
        self.conv_5 = Residual(c2, cfg.mfn_blocks[2], g[5])
        self.conv_6_sep = ConvBlock(c2, cfg.mfn_out)
        self.output_layer = GDC(cfg.mfn_out, cfg.mfn_landmarks)

    def forward(self, x):
        for name in ("conv1", "conv2_dw", "conv_23", "conv_3", "conv_34", "conv_4", "conv_45", "conv_5"):
            x = getattr(self, name)(x)
        return self.conv_6_sep(x)  # (B, C, 7, 7): the landmark features POSTER uses


# ------------------------------------------------------------------ cross-fusion pyramid transformer


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CrossAttention(nn.Module):
    """Keys/values from one token group, queries from the other (`attn_img` / `attn_lm` upstream)."""

    def __init__(self, dim, num_heads, qkv_bias, kv_from_image: bool, n_image: int):
        super().__init__()
        self.num_heads, self.n_image, self.kv_from_image = num_heads, n_image, kv_from_image
        self.scale = (dim // num_heads) ** -0.5
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        img, lm = x[:, : self.n_image], x[:, self.n_image :]
        src, query = (img, lm) if self.kv_from_image else (lm, img)
        b, n, c = src.shape
        k, v = self.kv(src).reshape(b, n, 2, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q = query.reshape(b, -1, self.num_heads, c // self.num_heads).permute(0, 2, 1, 3)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim, n_image, n_lm, num_heads, mlp_ratio, qkv_bias):
        super().__init__()
        self.n_image = n_image
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.norm3, self.norm4 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn_img = CrossAttention(dim, num_heads, qkv_bias, kv_from_image=True, n_image=n_image)
        self.attn_lm = CrossAttention(dim, num_heads, qkv_bias, kv_from_image=False, n_image=n_image)
        hidden = int(dim * mlp_ratio)
        self.mlp1, self.mlp2 = Mlp(dim, hidden), Mlp(dim, hidden)
        self.conv = nn.Conv1d(n_image + n_lm, n_image + n_lm, 1)

    def forward(self, x):
        img, lm = x[:, : self.n_image], x[:, self.n_image :]
        img = img + self.attn_img(self.norm1(x))
        img = img + self.mlp1(self.norm2(img))
        lm = lm + self.attn_lm(self.norm3(x))
        lm = lm + self.mlp2(self.norm4(lm))
        return self.conv(torch.cat((img, lm), dim=1))


class PyramidBlock(nn.Module):
    def __init__(self, dim, n_tokens, num_heads, mlp_ratio, qkv_bias):
        super().__init__()
        n = n_tokens + 1  # tokens + a mean "class" token, for each of image and landmarks
        self.block_l = Block(dim, n, n, num_heads, mlp_ratio, qkv_bias)
        self.block_m = Block(dim // 2, n, n, num_heads, mlp_ratio, qkv_bias)
        self.block_s = Block(dim // 4, n, n, num_heads, mlp_ratio, qkv_bias)
        self.upsample_m = nn.ConvTranspose1d(2 * n, 2 * n, kernel_size=2, stride=2)
        self.upsample_s = nn.ConvTranspose1d(2 * n, 2 * n, kernel_size=2, stride=2)

    def forward(self, xs):
        x_l, x_m, x_s = self.block_l(xs[0]), self.block_m(xs[1]), self.block_s(xs[2])
        x_m = self.upsample_s(x_s) + x_m
        x_l = x_l + self.upsample_m(x_m)
        return [x_l, x_m, x_s]


class PyramidFuse(nn.Module):
    def __init__(self, cfg: PosterConfig, n_tokens: int = 49, qkv_bias: bool = True):
        super().__init__()
        dim, n = cfg.embed_dim, n_tokens + 1
        self.n_tokens = n_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))  # unused upstream; kept for the checkpoint
        self.pos_embed = nn.Parameter(torch.zeros(1, n, dim))
        self.downsample_m = nn.Conv1d(2 * n, 2 * n, kernel_size=2, stride=2)
        self.downsample_s = nn.Conv1d(2 * n, 2 * n, kernel_size=4, stride=4)
        self.blocks = nn.Sequential(
            *[PyramidBlock(dim, n_tokens, cfg.num_heads, cfg.mlp_ratio, qkv_bias) for _ in range(cfg.depth)]
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x_img, x_lm):
        img = torch.cat((x_img.mean(1, keepdim=True), x_img), dim=1) + self.pos_embed
        lm = torch.cat((x_lm.mean(1, keepdim=True), x_lm), dim=1)
        x = torch.cat((img, lm), dim=1)
        xs = self.blocks([x, self.downsample_m(x), self.downsample_s(x)])
        return self.norm(xs[0])[:, 0]


class SEBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return x * torch.sigmoid(self.linear2(torch.relu(self.linear1(x))))


class ClassificationHead(nn.Module):
    def __init__(self, dim, num_classes):
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.linear(x.flatten(1))


class Poster(nn.Module):
    """POSTER: `forward(x)` on ImageNet-normalised 224x224 RGB returns (logits, feature)."""

    def __init__(self, cfg: PosterConfig = PosterConfig(), channels: str = "rgb"):
        super().__init__()
        if channels not in CHANNELS:
            raise ValueError(f"POSTER input channels must be one of {', '.join(CHANNELS)}, not {channels!r}")
        self.config = cfg
        self.channels = channels  # the order the checkpoint was trained on (see checkpoint_channels)
        self.face_landback = MobileFaceNet(cfg)
        self.ir_back = IRTrunk(cfg.ir_channels, cfg.ir_units)
        self.ir_layer = nn.Linear(cfg.ir_channels[-1] * 4, cfg.embed_dim)
        self.pyramid_fuse = PyramidFuse(cfg)
        self.se_block = SEBlock(cfg.embed_dim)
        self.head = ClassificationHead(cfg.embed_dim, cfg.num_classes)
        self.face_landback.requires_grad_(False)  # frozen upstream too

    def forward(self, x):
        b = x.shape[0]
        lm = self.face_landback(F.interpolate(x, size=112)).reshape(b, -1, 49).transpose(1, 2)
        img = self.ir_layer(self.ir_back(x))
        feature = self.se_block(self.pyramid_fuse(img, lm))
        return self.head(feature), feature

    def classify(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, expression embedding) of RGB images in [-1, 1] (any size), fed as upstream feeds it:
        resized to 224 as PIL does, in the checkpoint's channel order, then upstream's `Normalize`."""
        x = resize_like_pil((images + 1) / 2, self.config.image_size)
        if self.channels == "bgr":
            x = x.flip(1)
        mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return self((x - mean) / std)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Expression embedding of RGB images in [-1, 1] (any size): the feature before the head.

        Differentiable, so L_exp's gradient reaches x̂_0 and through the VAE decoder to the LoRA.
        """
        return self.classify(images)[1]


def tiny_poster(seed: int, num_classes: int = 7, channels: str = "rgb") -> Poster:
    torch.manual_seed(seed)
    model = Poster(PosterConfig.tiny(num_classes), channels)
    _init_like_training(model)
    return model.eval()


def _init_like_training(model: nn.Module) -> None:
    """Give the random stand-in non-trivial statistics (upstream's zero pos_embed etc. stay zero)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=1 / math.sqrt(m.in_features))


# ------------------------------------------------------------------ checkpoints, loaded safely

# Parameters the official checkpoint carries that POSTER's forward never reads.
UNUSED_PREFIXES = ("ir_back.output_layer.",)


def extract_state_dict(obj) -> dict[str, torch.Tensor]:
    """Find the weights in an official checkpoint dict and strip DataParallel's `module.` prefix."""
    for key in ("model_state_dict", "state_dict"):
        if isinstance(obj, dict) and key in obj:
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("no state dict of tensors found (expected 'model_state_dict' or 'state_dict')")
    out = {k.removeprefix("module."): v for k, v in obj.items()}
    return {k: v for k, v in out.items() if not k.startswith(UNUSED_PREFIXES)}


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """POSTER's weights from an official checkpoint, read without executing anything (io.load_tensors)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"POSTER checkpoint {path} not found. Download the official checkpoint (github "
            "zczcwh/POSTER, e.g. RAF-DB) and set models.<profile>.expression to its path, or use 'tiny'."
        )
    return extract_state_dict(load_tensors(path))


def _metadata(path: Path) -> dict:
    """The metadata of a safetensors file ({} for other formats)."""
    if Path(path).suffix != ".safetensors" or not Path(path).is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def _stored_config(path: Path) -> PosterConfig | None:
    """The architecture a safetensors file of ours records in its metadata (e.g. the world's POSTER)."""
    stored = _metadata(path).get("poster_config")
    if stored is None:
        return None
    fields = json.loads(stored)
    return PosterConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


# Channel order per upstream checkpoint family (by file name: rafdb_best.pth, affectnet-8_best.pth).
# zczcwh/POSTER reads images with OpenCV (BGR); its RAF-DB loader keeps them so (data_preprocessing/
# dataset_raf.py: `# image = image[:, :, ::-1]  # BGR to RGB` is commented out); AffectNet's convert.
CHECKPOINT_CHANNELS = (("raf", "bgr"), ("affect", "rgb"))


def checkpoint_channels(path: Path, channels: str = "auto") -> str:
    """`rgb`/`bgr` as given; for `auto`: a safetensors file's `channels` metadata, RGB for our own
    POSTER files (they record `poster_config`), else the upstream family the file's name names."""
    if channels not in (*CHANNELS, "auto"):
        raise ValueError(f"expression_channels must be auto, rgb or bgr, not {channels!r}")
    meta = _metadata(Path(path))
    recorded = meta.get("channels") or ("rgb" if "poster_config" in meta else None)  # ours train on RGB
    if channels in CHANNELS:
        if recorded not in (None, channels):
            log.warning("%s records %s input; feeding it %s as set", path, recorded, channels)
        return channels
    if recorded in CHANNELS:
        return recorded
    name = Path(path).name.lower()
    for prefix, order in CHECKPOINT_CHANNELS:
        if name.startswith(prefix):
            return order
    raise ValueError(
        f"cannot tell which channel order POSTER's checkpoint {path} was trained on (its file name starts "
        "with neither 'raf' nor 'affect'). Set models.<profile>.expression_channels (or channels=) to bgr "
        "(upstream's RAF-DB checkpoints) or rgb (its AffectNet ones); see models/poster/README.md."
    )


def from_checkpoint(path: Path, channels: str = "auto") -> Poster:
    """POSTER with trained weights: an official checkpoint (full size; the class count is read from
    the head), or a safetensors file of ours whose metadata names its architecture. `channels`: the
    input order it was trained on (`auto`: `checkpoint_channels`)."""
    state = load_checkpoint(path)
    if "head.linear.weight" not in state:
        raise ValueError(f"{path} is not a POSTER checkpoint: no head.linear.weight")
    path = Path(path).expanduser()
    cfg = _stored_config(path) or PosterConfig(num_classes=state["head.linear.weight"].shape[0])
    model = Poster(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match POSTER's architecture: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.channels = checkpoint_channels(path, channels)
    return model.eval()


def config_dict(model: Poster) -> dict:
    return asdict(model.config)
