"""DCT-Net (Men et al., TOG 2022) in PyTorch, with a converter from its released TensorFlow graphs.

The released 3D-cartoon model (ModelScope `damo/cv_unet_person-image-cartoon-3d_compound-models`) is two
frozen TensorFlow graphs, `cartoon_bg.pb` (whole image) and `cartoon_h.pb` (a 288 px head crop aligned by
5 face points), plus `alpha.jpg`, the mask that blends the cartoon head back into the cartoon background.
Each graph computes: x/127.5 - 1 -> U-Net generator -> guided filter (r=1, eps=1e-2) guided by the input
-> clip to (-1, 1) -> (y + 1) * 127.5 -> uint8, on a BGR image.

The generator (White-box cartoonization's `unet_generator`: 32 channels, 4 residual blocks, LeakyReLU 0.2)
is rebuilt here layer for layer with TensorFlow's semantics where they differ from PyTorch's: "SAME"
padding (asymmetric for stride 2) and TF1's legacy bilinear resize (no half-pixel centres). Its weights
are read from the graphs' Const nodes (`generator/Conv/weights`, `generator/block_0/conv1/biases`, ...)
with tensorboard's compiled protobuf classes, so TensorFlow is never installed, and written once as
safetensors: `python -m geneava.networks.dctnet convert <model folder> <out folder>`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from geneava.core import io


@dataclass(frozen=True)
class DCTNetConfig:
    channels: int = 32
    blocks: int = 4

    @classmethod
    def tiny(cls) -> DCTNetConfig:
        return cls(channels=4, blocks=1)


# (name in the graph, in channels multiple of c, out, kernel, stride) in the order slim names them
def conv_specs(cfg: DCTNetConfig) -> list[tuple[str, int, int, int, int]]:
    c = cfg.channels
    specs = [
        ("Conv", 3, c, 7, 1),
        ("Conv_1", c, c, 3, 2),
        ("Conv_2", c, 2 * c, 3, 1),
        ("Conv_3", 2 * c, 2 * c, 3, 2),
        ("Conv_4", 2 * c, 4 * c, 3, 1),
    ]
    for b in range(cfg.blocks):
        specs += [(f"block_{b}/conv1", 4 * c, 4 * c, 3, 1), (f"block_{b}/conv2", 4 * c, 4 * c, 3, 1)]
    specs += [
        ("Conv_5", 4 * c, 2 * c, 3, 1),
        ("Conv_6", 2 * c, 2 * c, 3, 1),
        ("Conv_7", 2 * c, c, 3, 1),
        ("Conv_8", c, c, 3, 1),
        ("Conv_9", c, 3, 7, 1),
    ]
    return specs


def _module_name(graph_name: str) -> str:
    return graph_name.replace("/", "_")


class SameConv(nn.Conv2d):
    """A convolution with TensorFlow's "SAME" padding (for stride 2 the extra row/column goes last)."""

    def forward(self, x):
        k, s = self.kernel_size[0], self.stride[0]
        pads = []
        for size in (x.shape[-1], x.shape[-2]):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def tf_resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF1 `resize_bilinear` (align_corners=False, half_pixel_centers=False): source = dest * in/out."""
    out = x
    for dim, n_out in ((2, size[0]), (3, size[1])):
        n_in = out.shape[dim]
        src = torch.arange(n_out, dtype=torch.float32, device=x.device) * (n_in / n_out)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        w = (src - lo).to(x.dtype)
        shape = [1] * out.ndim
        shape[dim] = n_out
        a, b = out.index_select(dim, lo), out.index_select(dim, hi)
        out = a + (b - a) * w.view(shape)
    return out


def box_filter(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean-free box sum over (2r+1)^2 with zero padding, per channel (TF depthwise conv, SAME)."""
    k = torch.full(
        (x.shape[1], 1, 2 * r + 1, 2 * r + 1), 1 / (2 * r + 1) ** 2, dtype=x.dtype, device=x.device
    )
    return F.conv2d(F.pad(x, [r] * 4), k, groups=x.shape[1])


def guided_filter(x: torch.Tensor, y: torch.Tensor, r: int = 1, eps: float = 1e-2) -> torch.Tensor:
    """He et al.'s guided filter of `y` guided by `x`, per channel, as DCT-Net's graphs compute it."""
    n = box_filter(torch.ones_like(x[:, :1]), r)
    mean_x, mean_y = box_filter(x, r) / n, box_filter(y, r) / n
    cov_xy = box_filter(x * y, r) / n - mean_x * mean_y
    var_x = box_filter(x * x, r) / n - mean_x * mean_x
    a = cov_xy / (var_x + eps)
    b = mean_y - a * mean_x
    return box_filter(a, r) / n * x + box_filter(b, r) / n


class DCTNetGenerator(nn.Module):
    """The U-Net generator; `forward` takes and returns images in [-1, 1] (N, 3, H, W, BGR order as
    released), H and W multiples of 4, and applies the guided filter like the exported graphs do."""

    def __init__(self, cfg: DCTNetConfig = DCTNetConfig()):
        super().__init__()
        self.config = cfg
        self.convs = nn.ModuleDict(
            {
                _module_name(n): SameConv(cin, cout, k, stride=s, padding=0)
                for n, cin, cout, k, s in conv_specs(cfg)
            }
        )

    def _c(self, name: str, x: torch.Tensor, act: bool = True) -> torch.Tensor:
        x = self.convs[_module_name(name)](x)
        return F.leaky_relu(x, 0.2) if act else x

    def generator(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self._c("Conv", x)
        x1 = self._c("Conv_2", self._c("Conv_1", x0))
        x2 = self._c("Conv_4", self._c("Conv_3", x1))
        for b in range(self.config.blocks):
            x2 = x2 + self._c(f"block_{b}/conv2", self._c(f"block_{b}/conv1", x2), act=False)
        x2 = self._c("Conv_5", x2)
        x3 = tf_resize_bilinear(x2, (2 * x2.shape[2], 2 * x2.shape[3]))
        x3 = self._c("Conv_7", self._c("Conv_6", x3 + x1))
        x4 = tf_resize_bilinear(x3, (2 * x3.shape[2], 2 * x3.shape[3]))
        x4 = self._c("Conv_8", x4 + x0)
        return self._c("Conv_9", x4, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return guided_filter(x, self.generator(x), r=1).clamp(-0.999999, 0.999999)


def to_uint8(y: torch.Tensor) -> np.ndarray:
    """(y + 1) * 127.5 cast to uint8 as the graphs do (truncation), (N, H, W, 3)."""
    return ((y + 1) * 127.5).permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


# ------------------------------------------------------------------ converter


def read_graph_constants(pb: Path) -> dict[str, np.ndarray]:
    """Every Const node of a frozen GraphDef as a numpy array, parsed with tensorboard's compiled
    protos (no TensorFlow); nothing in the file is executed."""
    from tensorboard.compat.proto import graph_pb2
    from tensorboard.compat.tensorflow_stub import dtypes
    from tensorboard.util import tensor_util

    del dtypes  # imported for tensor_util's dtype table
    graph = graph_pb2.GraphDef()
    graph.ParseFromString(Path(pb).read_bytes())
    return {
        node.name: tensor_util.make_ndarray(node.attr["value"].tensor)
        for node in graph.node
        if node.op == "Const"
    }


def state_dict_from_graph(
    consts: dict[str, np.ndarray], prefix: str = "generator/"
) -> tuple[dict, DCTNetConfig]:
    """Our generator's state dict from a graph's constants: HWIO kernels become OIHW."""
    names = {k[len(prefix) :] for k in consts if k.startswith(prefix)}
    blocks = len({n.split("/")[0] for n in names if n.startswith("block_")})
    if "Conv/weights" not in names:
        raise ValueError(f"no '{prefix}Conv/weights' constant: not a DCT-Net generator graph")
    cfg = DCTNetConfig(channels=int(consts[f"{prefix}Conv/weights"].shape[-1]), blocks=blocks)
    state = {}
    for name, cin, cout, k, _ in conv_specs(cfg):
        w, b = consts.get(f"{prefix}{name}/weights"), consts.get(f"{prefix}{name}/biases")
        if w is None or b is None:
            raise ValueError(f"constant {prefix}{name}/weights or /biases missing from the graph")
        if w.shape != (k, k, cin, cout):
            raise ValueError(f"{prefix}{name}/weights has shape {w.shape}, expected {(k, k, cin, cout)}")
        state[f"convs.{_module_name(name)}.weight"] = torch.from_numpy(
            np.ascontiguousarray(w.transpose(3, 2, 0, 1))
        )
        state[f"convs.{_module_name(name)}.bias"] = torch.from_numpy(np.ascontiguousarray(b))
    return state, cfg


def convert(model_dir: Path, out_dir: Path) -> list[Path]:
    """`cartoon_bg.pb` and `cartoon_h.pb` -> `bg.safetensors` and `head.safetensors` (+ alpha.png)."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for graph, name in (("cartoon_bg.pb", "bg"), ("cartoon_h.pb", "head")):
        path = Path(model_dir) / graph
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: download the ModelScope model folder first (docs/stages/stylize.md)"
            )
        state, cfg = state_dict_from_graph(read_graph_constants(path))
        target = out_dir / f"{name}.safetensors"
        io.save_tensors(target, state, metadata={"config": json.dumps(asdict(cfg)), "source": graph})
        written.append(target)
    alpha = Path(model_dir) / "alpha.jpg"
    if alpha.is_file():
        Image.open(alpha).convert("L").save(out_dir / "alpha.png")
        written.append(out_dir / "alpha.png")
    return written


def load_generator(path: Path) -> DCTNetGenerator:
    """A generator from converted safetensors (the only format it loads)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if Path(path).suffix != ".safetensors":
        raise ValueError(f"{path}: DCT-Net weights load from .safetensors only (convert the graphs first)")
    with safe_open(path, "pt") as f:
        cfg = DCTNetConfig(**json.loads((f.metadata() or {})["config"]))
    model = DCTNetGenerator(cfg)
    model.load_state_dict(load_file(path), strict=True)
    return model.eval().requires_grad_(False)


def tiny_generator(seed: int = 0) -> DCTNetGenerator:
    torch.manual_seed(seed)
    return DCTNetGenerator(DCTNetConfig.tiny()).eval().requires_grad_(False)


# ------------------------------------------------------------------ face alignment for the head network

# The 5 reference points (eyes, nose tip, mouth corners) of the 96x112 MTCNN template, +1 px as the
# released pipeline shifts them, made square (x + 8): the head crop is aligned to these, scaled by 0.75
# about the centre and to 288 px.
REFERENCE_5 = np.array(
    [[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655], [62.7299, 92.2041]]
) + np.array([1 + 8, 1])


def five_points():
    """A function rgb -> [5x2 points per face] (left eye, right eye, nose tip, left and right mouth
    corner): dlib's MMOD detector with its 68-point landmark model (eye centres = mean of the eye points,
    as the released pipeline's fallback does)."""
    import dlib

    from geneava.networks.faces import DlibDetector, dlib_model_dir

    detector = DlibDetector()
    predictor = dlib.shape_predictor(str(dlib_model_dir() / "shape_predictor_68_face_landmarks.dat"))

    def points(rgb: np.ndarray) -> list[np.ndarray]:
        img, scale, found = detector.shapes(rgb)
        out = []
        for det, _ in found:
            s = predictor(img, det.rect)
            p = np.array([(s.part(i).x, s.part(i).y) for i in range(68)], dtype=np.float64) / scale
            out.append(np.stack([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]]))
        return out

    return points


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Convert DCT-Net's TensorFlow graphs to safetensors (once).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument(
        "model_dir", type=Path, help="the ModelScope folder with cartoon_bg.pb, cartoon_h.pb, alpha.jpg"
    )
    c.add_argument("out_dir", type=Path)
    args = ap.parse_args(argv)
    for p in convert(args.model_dir, args.out_dir):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
