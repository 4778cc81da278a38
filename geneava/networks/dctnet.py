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
import sys
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


def read_graph(pb: Path):
    """A frozen GraphDef parsed with tensorboard's compiled protos (no TensorFlow; nothing executed)."""
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto import graph_pb2

    graph = graph_pb2.GraphDef()
    try:
        graph.ParseFromString(Path(pb).read_bytes())
    except DecodeError as e:
        raise ValueError(f"{pb} is not a frozen TensorFlow graph (GraphDef): {e}") from e
    return graph


def graph_constants(graph) -> dict[str, np.ndarray]:
    """Every Const node of a GraphDef as a numpy array."""
    from tensorboard.compat.tensorflow_stub import dtypes
    from tensorboard.util import tensor_util

    del dtypes  # imported for tensor_util's dtype table
    return {n.name: tensor_util.make_ndarray(n.attr["value"].tensor) for n in graph.node if n.op == "Const"}


def read_graph_constants(pb: Path) -> dict[str, np.ndarray]:
    return graph_constants(read_graph(pb))


# What ModelScope's exporter (CartoonTranslationExporter: input / 127.5 - 1 -> unet_generator ->
# guided_filter(r=1, eps=1e-2) -> clip +-0.999999 -> (y + 1) * 127.5 -> uint8) freezes, besides the
# generator's weights: each op type's count for B residual blocks, and the 48 other constants, keyed by
# the op that reads them. Anything else is a graph this port does not compute, and is refused.
def expected_ops(blocks: int) -> dict[str, int]:
    convs = 10 + 2 * blocks
    return {
        "Placeholder": 1, "Const": 2 * convs + 48, "StridedSlice": 9, "Shape": 5, "Pack": 3, "Fill": 1,
        "RealDiv": 8, "Sub": 4, "Mul": 11, "Add": blocks + 5, "Conv2D": convs, "BiasAdd": convs,
        "LeakyRelu": 9 + blocks, "ResizeBilinear": 2, "DepthwiseConv2dNative": 7, "Minimum": 1,
        "Maximum": 1, "Cast": 1,
    }  # fmt: skip


SCALARS = sorted(  # (reading op, dtype, value) of the scalar constants
    [("RealDiv", "float32", 127.5), ("Sub", "float32", 1.0), ("Add", "float32", 0.01),
     ("Minimum", "float32", 0.999999), ("Maximum", "float32", -0.999999), ("Add", "float32", 1.0),
     ("Mul", "float32", 127.5), ("Fill", "float32", 1.0)]
    + [("Mul", "int32", 2)] * 4 + [("Pack", "int32", 1)] * 2
)  # fmt: skip
# StridedSlice (begin, end, strides, begin_mask, end_mask, new_axis_mask, shrink_axis_mask): the input's
# [:, :, :] and [tf.newaxis], shape[1] and shape[2] of three tensors, and the output's [0].
SLICES = sorted(
    [((0, 0, 0), (0, 0, 0), (1, 1, 1), 7, 7, 0, 0), ((0,), (0,), (1,), 0, 0, 1, 0)]
    + [((0,), (1,), (1,), 0, 0, 0, 1)]
    + [((1,), (2,), (1,), 0, 0, 0, 1)] * 3
    + [((2,), (3,), (1,), 0, 0, 0, 1)] * 3
)  # fmt: skip
MASKS = ("begin_mask", "end_mask", "new_axis_mask", "shrink_axis_mask")


class _Graph:
    """A GraphDef's nodes, op types (AddV2 read as Add), constants, and who reads each constant."""

    def __init__(self, graph):
        self.nodes = {n.name: n for n in graph.node}
        self.op = {n.name: ("Add" if n.op == "AddV2" else n.op) for n in graph.node}
        self.consts = graph_constants(graph)
        self.readers: dict[str, set[str]] = {}
        for n in graph.node:
            if self.op[n.name] != "Identity":
                for inp in n.input:
                    self.readers.setdefault(self.source(inp), set()).add(self.op[n.name])

    def source(self, name: str) -> str:
        """The node an input names, followed through Identity nodes (variables' /read) to its source."""
        name = name.lstrip("^").split(":")[0]
        while self.op.get(name) == "Identity":
            name = self.nodes[name].input[0].lstrip("^").split(":")[0]
        return name


def _op_problems(g: _Graph, blocks: int) -> list[str]:
    counts: dict[str, int] = {}
    for kind in g.op.values():
        if kind != "Identity":
            counts[kind] = counts.get(kind, 0) + 1
    want = expected_ops(blocks)
    return [
        f"{counts.get(k, 0)} {k} ops where the exporter makes {want.get(k, 0)}"
        + (f" (e.g. {', '.join(names)})" if (names := [n for n in g.op if g.op[n] == k][:5]) else "")
        for k in sorted(set(counts) | set(want))
        if counts.get(k, 0) != want.get(k, 0)
    ]


def _constant_problems(g: _Graph, cfg: DCTNetConfig, prefix: str) -> list[str]:
    weights = {f"{prefix}{name}/{w}" for name, *_ in conv_specs(cfg) for w in ("weights", "biases")}
    problems, scalars, kernels = [], [], 0
    for name, value in g.consts.items():
        users = g.readers.get(name, set())
        if name in weights or users == {"StridedSlice"}:  # weights: state_dict_from_graph; slices: below
            continue
        if name.startswith(prefix) and name.endswith(("/weights", "/biases", "/kernel", "/bias")):
            problems.append(f"generator constant {name} is not a layer of the port (an extra layer?)")
        elif users == {"DepthwiseConv2dNative"} and value.shape[:2] == (3, 3) and value.shape[-1] == 1:
            kernels += 1
            if value.dtype != np.float32 or not np.all(value == np.float32(1 / 9)):
                problems.append(f"box filter {name} is not 1/9 everywhere (guided filter radius 1)")
        elif value.ndim == 0 and len(users) == 1:
            scalars.append((next(iter(users)), str(value.dtype), value.item()))
        else:
            problems.append(
                f"constant {name} (shape {value.shape}, read by {sorted(users)}) is not the exporter's"
            )
    want = sorted((o, d, float(np.float32(v)) if d == "float32" else v) for o, d, v in SCALARS)
    if sorted(scalars) != want:
        found = [s for s in set(scalars) if s not in want]
        missing = [s for s in set(want) if s not in scalars]
        problems.append(f"scalar constants (reading op, dtype, value) not the exporter's: found "
                        f"{sorted(found)}, missing {sorted(missing)}")  # fmt: skip
    if kernels != 7:
        problems.append(f"{kernels} box-filter kernels where the guided filter has 7")
    return problems


def _node_problems(g: _Graph, cfg: DCTNetConfig, prefix: str) -> list[str]:
    problems, slices = [], []
    for name, n in g.nodes.items():
        kind, a = g.op[name], n.attr
        if kind == "StridedSlice":
            stacks = (tuple(np.ravel(g.consts.get(g.source(i), -1)).tolist()) for i in n.input[1:4])
            slices.append((*stacks, *(a[m].i for m in MASKS)))
        elif kind == "LeakyRelu" and np.float32(a["alpha"].f) != np.float32(0.2):
            problems.append(f"{name}: LeakyReLU alpha {a['alpha'].f}, not 0.2")
        elif kind == "ResizeBilinear" and (a["align_corners"].b or a["half_pixel_centers"].b):
            problems.append(f"{name}: align_corners/half_pixel_centers set (TF1's legacy resize expected)")
        elif kind in ("Conv2D", "DepthwiseConv2dNative"):
            problems += _check_conv(n, g.source(n.input[1]), cfg, prefix)
        elif kind == "Cast" and (name != "output_image" or a["DstT"].type != 4):  # 4: DT_UINT8
            problems.append(f"{name}: the output is not the uint8 'output_image'")
    if sorted(slices) != SLICES:
        problems.append(
            "strided slices differ from the exporter's ([:, :, :], [tf.newaxis], shape[1:3], [0])"
        )
    return problems


def check_graph(graph, cfg: DCTNetConfig, prefix: str = "generator/") -> None:
    """Refuse a frozen graph that computes anything but the exported DCT-Net this port runs: every op
    counted, every non-weight constant's value checked, every layer's attributes compared."""
    g = _Graph(graph)
    problems = (
        _op_problems(g, cfg.blocks) + _constant_problems(g, cfg, prefix) + _node_problems(g, cfg, prefix)
    )
    if problems:
        raise ValueError(
            "not the DCT-Net graph this port computes (nothing converted):\n  - " + "\n  - ".join(problems)
            + "\nThe port follows ModelScope's exporter (damo/cv_unet_person-image-cartoon-3d_compound-"
            "models); models/dctnet-3d/README.md says what is checked and where to extend it."
        )  # fmt: skip


def _check_conv(node, weight: str, cfg: DCTNetConfig, prefix: str) -> list[str]:
    a = node.attr
    strides, pad, fmt = list(a["strides"].list.i), a["padding"].s, a["data_format"].s or b"NHWC"
    dil = list(a["dilations"].list.i) or [1, 1, 1, 1]
    want = 1 if node.op == "DepthwiseConv2dNative" else None
    if want is None:
        spec = {f"{prefix}{n}/weights": s for n, _, _, _, s in conv_specs(cfg)}
        if weight not in spec:
            return [f"{node.name} convolves with {weight}, not a layer of the port"]
        want = spec[weight]
    if strides != [1, want, want, 1] or pad != b"SAME" or fmt != b"NHWC" or dil != [1, 1, 1, 1]:
        return [
            f"{node.name}: strides {strides}, padding {pad!r}, {fmt!r}, dilations {dil} (want {want}, SAME)"
        ]
    return []


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
    """`cartoon_bg.pb` and `cartoon_h.pb` -> `bg.safetensors` and `head.safetensors` (+ alpha.png),
    each graph checked first (`check_graph`)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} is not a folder: download the ModelScope model folder first "
                                "(docs/stages/stylize.md)")  # fmt: skip
    converted = []  # both graphs read and checked before anything is written
    for graph, name in (("cartoon_bg.pb", "bg"), ("cartoon_h.pb", "head")):
        path = model_dir / graph
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: download the ModelScope model folder first (docs/stages/stylize.md)"
            )
        graph_def = read_graph(path)
        try:
            state, cfg = state_dict_from_graph(graph_constants(graph_def))
            check_graph(graph_def, cfg)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        converted.append((name, graph, state, cfg))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, graph, state, cfg in converted:
        target = out_dir / f"{name}.safetensors"
        io.save_tensors(target, state, metadata={"config": json.dumps(asdict(cfg)), "source": graph})
        written.append(target)
    alpha = Path(model_dir) / "alpha.jpg"
    if alpha.is_file():  # decoded as ModelScope decodes it (OpenCV, colour), kept losslessly
        import cv2

        decoded = cv2.imread(str(alpha), cv2.IMREAD_COLOR)
        if decoded is None:
            raise ValueError(f"{alpha}: not an image OpenCV can read")
        io.atomic_write_bytes(out_dir / "alpha.png", cv2.imencode(".png", decoded)[1].tobytes())
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m geneava.networks.dctnet",
        description="Convert DCT-Net's TensorFlow graphs to safetensors (once).",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument(
        "model_dir", type=Path, help="the ModelScope folder with cartoon_bg.pb, cartoon_h.pb, alpha.jpg"
    )
    c.add_argument("out_dir", type=Path, help="where bg.safetensors, head.safetensors, alpha.png go")
    args = ap.parse_args(argv)
    try:
        written = convert(args.model_dir, args.out_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
