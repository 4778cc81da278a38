"""DCT-Net's port: TensorFlow semantics (SAME padding, legacy bilinear resize, guided filter), and the
converter from a frozen graph, tested on a synthetic graph with tiny constants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geneava.networks import dctnet


def test_same_padding_matches_tensorflow_output_sizes():
    conv = dctnet.SameConv(1, 1, 3, stride=2, padding=0)
    for size, expected in ((8, 4), (7, 4), (5, 3)):  # TF: ceil(size / stride)
        assert conv(torch.zeros(1, 1, size, size)).shape[-1] == expected
    # stride 2 on an even size: TF pads the extra row and column at the end, so output (0, 0) sees x[0:3]
    conv = dctnet.SameConv(1, 1, 3, stride=2, padding=0, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 1  # picks the top-left input of each window
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert conv(x)[0, 0].tolist() == [[0.0, 2.0], [8.0, 10.0]]


def test_legacy_bilinear_resize_matches_tf1_values():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    y = dctnet.tf_resize_bilinear(x, (4, 4))
    # TF1 resize_bilinear(align_corners=False, half_pixel_centers=False): src = dst / 2, edge clamped
    assert y[0, 0, 0].tolist() == [0.0, 0.5, 1.0, 1.0]
    assert y[0, 0, :, 0].tolist() == [0.0, 1.0, 2.0, 2.0]


def test_guided_filter_keeps_constants_and_follows_the_guide():
    x = torch.rand(1, 3, 12, 12)
    assert torch.allclose(
        dctnet.guided_filter(x, torch.full_like(x, 0.3)), torch.full_like(x, 0.3), atol=1e-6
    )
    y = dctnet.guided_filter(x, x, eps=1e-8)
    assert torch.allclose(y, x, atol=1e-3)


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_generator_keeps_the_size_and_range(size):
    g = dctnet.tiny_generator(0)
    y = g(torch.rand(1, 3, *size) * 2 - 1)
    assert y.shape == (1, 3, *size) and y.abs().max() < 1


class _Exporter:
    """A frozen GraphDef laid out as ModelScope's CartoonTranslationExporter freezes one (TF1 names,
    ops, attributes and constants), built with tensorboard's protos: the converter's test input."""

    def __init__(self):
        from tensorboard.compat.proto import graph_pb2

        self.graph, self.used = graph_pb2.GraphDef(), {}

    def name(self, base: str) -> str:
        n = self.used.get(base, 0)
        self.used[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    def node(self, op: str, name: str, inputs=(), **attrs) -> str:
        n = self.graph.node.add(name=name, op=op)
        n.input.extend(inputs)
        for key, value in attrs.items():
            if key == "DstT":
                n.attr[key].type = value  # a DataType enum (4: uint8)
            elif isinstance(value, bool):
                n.attr[key].b = value
            elif isinstance(value, int):
                n.attr[key].i = value
            elif isinstance(value, float):
                n.attr[key].f = value
            elif isinstance(value, bytes):
                n.attr[key].s = value
            else:
                n.attr[key].list.i.extend(value)
        return name

    def const(self, name: str, value) -> str:
        from tensorboard.util import tensor_util

        n = self.graph.node.add(name=name, op="Const")
        n.attr["value"].tensor.CopyFrom(tensor_util.make_tensor_proto(np.array(value)))
        return name

    def slice(self, x: str, begin, end, scope: str = "", **masks) -> str:
        name = self.name(f"{scope}strided_slice")
        ins = [
            self.const(f"{name}/stack{s}", np.array(v, np.int32))
            for s, v in (("", begin), ("_1", end), ("_2", [1] * len(begin)))
        ]
        return self.node("StridedSlice", name, [x, *ins], **{m: masks.get(m, 0) for m in dctnet.MASKS})

    def binary(self, op: str, base: str, a: str, b) -> str:
        name = self.name(base)
        if not isinstance(b, str):
            b = self.const(f"{name}/y", b)
        return self.node(op, name, [a, b])

    def conv(self, layer: str, x: str, w, b, stride: int) -> str:
        p = f"generator/{layer}"
        reads = []
        for part, value in (("weights", w), ("biases", b)):
            self.const(f"{p}/{part}", value)
            reads.append(self.node("Identity", f"{p}/{part}/read", [f"{p}/{part}"]))
        y = self.node("Conv2D", f"{p}/Conv2D", [x, reads[0]], strides=[1, stride, stride, 1], padding=b"SAME",
                      data_format=b"NHWC", dilations=[1, 1, 1, 1])  # fmt: skip
        return self.node("BiasAdd", f"{p}/BiasAdd", [y, reads[1]])

    def leaky(self, x: str) -> str:
        return self.node("LeakyRelu", self.name("generator/LeakyRelu"), [x], alpha=0.2)

    def resize(self, x: str) -> str:
        shape = self.node("Shape", self.name("generator/Shape"), [x])
        h = self.slice(shape, [1], [2], "generator/", shrink_axis_mask=1)
        shape = self.node("Shape", self.name("generator/Shape"), [x])
        w = self.slice(shape, [2], [3], "generator/", shrink_axis_mask=1)
        h2 = self.binary("Mul", "generator/mul", h, np.int32(2))
        w2 = self.binary("Mul", "generator/mul", w, np.int32(2))
        name = self.name("generator/ResizeBilinear")
        size = self.node("Pack", f"{name}/size", [h2, w2])
        return self.node("ResizeBilinear", name, [x, size], align_corners=False, half_pixel_centers=False)

    def box(self, x: str, ch: int) -> str:
        k = self.const(self.name("Const"), np.full((3, 3, ch, 1), 1 / 9, np.float32))
        return self.node("DepthwiseConv2dNative", self.name("depthwise"), [x, k], strides=[1, 1, 1, 1],
                         padding=b"SAME", data_format=b"NHWC", dilations=[1, 1, 1, 1])  # fmt: skip


def _exporter_graph(state: dict, cfg: dctnet.DCTNetConfig, path, skip: tuple[str, ...] = (), edit=None):
    """The exporter's graph around a generator's weights (HWIO), written to `path`; `edit(graph)` may
    change it before it is written."""
    g = _Exporter()
    specs = {name: s for name, _, _, _, s in dctnet.conv_specs(cfg)}

    def conv(layer, x, act=True):
        if layer in skip:
            return x
        key = f"convs.{layer.replace('/', '_')}"
        w, b = state[f"{key}.weight"].numpy().transpose(2, 3, 1, 0), state[f"{key}.bias"].numpy()
        y = g.conv(layer, x, w, b, specs[layer])
        return g.leaky(y) if act else y

    x = g.node("Placeholder", "input_image")
    x = g.slice(x, [0, 0, 0], [0, 0, 0], begin_mask=7, end_mask=7)
    x = g.slice(x, [0], [0], new_axis_mask=1)
    x = g.binary("RealDiv", "truediv", x, np.float32(127.5))
    x = g.binary("Sub", "sub", x, np.float32(1.0))
    x0 = conv("Conv", x)
    x1 = conv("Conv_2", conv("Conv_1", x0))
    x2 = conv("Conv_4", conv("Conv_3", x1))
    for i in range(cfg.blocks):
        r = g.leaky(conv(f"block_{i}/conv1", x2, act=False))
        x2 = g.binary("AddV2", f"generator/block_{i}/add", conv(f"block_{i}/conv2", r, act=False), x2)
    x2 = conv("Conv_5", x2)
    x3 = g.binary("AddV2", "generator/add", g.resize(x2), x1)
    x3 = conv("Conv_7", conv("Conv_6", x3))
    x4 = g.binary("AddV2", "generator/add", g.resize(x3), x0)
    y = conv("Conv_9", conv("Conv_8", x4), act=False)
    # guided filter (r=1, eps=1e-2) guided by the input
    shape = g.node("Shape", "Shape", [x])
    h, w = g.slice(shape, [1], [2], shrink_axis_mask=1), g.slice(shape, [2], [3], shrink_axis_mask=1)
    dims = [g.const("ones/shape/0", np.int32(1)), h, w, g.const("ones/shape/3", np.int32(1))]
    ones = g.node(
        "Fill", "ones", [g.node("Pack", "ones/shape", dims), g.const("ones/Const", np.float32(1.0))]
    )
    n = g.box(ones, 1)
    mean_x, mean_y = (
        g.binary("RealDiv", "truediv", g.box(x, 3), n),
        g.binary("RealDiv", "truediv", g.box(y, 3), n),
    )
    xy = g.box(g.binary("Mul", "mul", x, y), 3)
    cov = g.binary(
        "Sub", "sub", g.binary("RealDiv", "truediv", xy, n), g.binary("Mul", "mul", mean_x, mean_y)
    )
    xx = g.box(g.binary("Mul", "mul", x, x), 3)
    var = g.binary(
        "Sub", "sub", g.binary("RealDiv", "truediv", xx, n), g.binary("Mul", "mul", mean_x, mean_x)
    )
    a = g.binary("RealDiv", "truediv", cov, g.binary("AddV2", "add", var, np.float32(0.01)))
    b = g.binary("Sub", "sub", mean_y, g.binary("Mul", "mul", a, mean_x))
    mean_a, mean_b = (
        g.binary("RealDiv", "truediv", g.box(a, 3), n),
        g.binary("RealDiv", "truediv", g.box(b, 3), n),
    )
    out = g.binary("AddV2", "add", g.binary("Mul", "mul", mean_a, x), mean_b)
    out = g.slice(out, [0], [1], shrink_axis_mask=1)
    out = g.binary("Minimum", "clip_by_value/Minimum", out, np.float32(0.999999))
    out = g.binary("Maximum", "clip_by_value", out, np.float32(-0.999999))
    out = g.binary("Mul", "mul", g.binary("AddV2", "add", out, np.float32(1.0)), np.float32(127.5))
    g.node("Cast", "output_image", [out], DstT=4)
    if edit is not None:
        edit(g)
    path.write_bytes(g.graph.SerializeToString())


def test_converter_reads_a_frozen_graph_into_safetensors(tmp_path):
    ref = dctnet.tiny_generator(3)
    cfg = ref.config
    (tmp_path / "model").mkdir()
    _exporter_graph(ref.state_dict(), cfg, tmp_path / "model" / "cartoon_bg.pb")
    _exporter_graph(dctnet.tiny_generator(4).state_dict(), cfg, tmp_path / "model" / "cartoon_h.pb")
    written = dctnet.convert(tmp_path / "model", tmp_path / "out")
    assert {p.name for p in written} == {"bg.safetensors", "head.safetensors"}
    loaded = dctnet.load_generator(tmp_path / "out" / "bg.safetensors")
    assert loaded.config == cfg
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded(x), ref(x))


def test_converter_names_what_is_missing(tmp_path):
    ref = dctnet.tiny_generator(0)
    (tmp_path / "model").mkdir()
    _exporter_graph(ref.state_dict(), ref.config, tmp_path / "model" / "cartoon_bg.pb", skip=("Conv_9",))
    with pytest.raises(ValueError, match="Conv_9"):
        dctnet.convert(tmp_path / "model", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="cartoon_bg.pb"):
        dctnet.convert(tmp_path / "empty", tmp_path / "out")
    consts = dctnet.read_graph_constants(tmp_path / "model" / "cartoon_bg.pb")
    consts["generator/Conv_1/weights"] = consts["generator/Conv_1/weights"][:, :, :2]
    with pytest.raises(ValueError, match="shape"):
        dctnet.state_dict_from_graph(consts)
    with pytest.raises(ValueError, match="not a DCT-Net"):
        dctnet.state_dict_from_graph({"other/Conv/weights": np.zeros(1)})


def test_weights_load_from_safetensors_only(tmp_path):
    torch.save(dctnet.tiny_generator(0).state_dict(), tmp_path / "g.pth")
    with pytest.raises(ValueError, match="safetensors"):
        dctnet.load_generator(tmp_path / "g.pth")


def test_the_full_size_exporter_graph_has_36_weights_and_48_other_constants_and_converts(tmp_path):
    ref = dctnet.DCTNetGenerator().eval()  # 32 channels, 4 residual blocks, random weights
    (tmp_path / "model").mkdir()
    for f in ("cartoon_bg.pb", "cartoon_h.pb"):
        _exporter_graph(ref.state_dict(), ref.config, tmp_path / "model" / f)
    consts = dctnet.read_graph_constants(tmp_path / "model" / "cartoon_bg.pb")
    weights = [k for k in consts if k.endswith(("/weights", "/biases"))]
    assert len(weights) == 36 and len(consts) - len(weights) == 48
    dctnet.convert(tmp_path / "model", tmp_path / "out")
    loaded = dctnet.load_generator(tmp_path / "out" / "head.safetensors")
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x), ref(x))


def _node(g: _Exporter, name: str):
    return next(n for n in g.graph.node if n.name == name)


def _set_const(name: str, value):
    def edit(g: _Exporter):
        from tensorboard.util import tensor_util

        _node(g, name).attr["value"].tensor.CopyFrom(tensor_util.make_tensor_proto(np.array(value)))

    return edit


def _set_attr(name: str, key: str, value):
    def edit(g: _Exporter):
        attr = _node(g, name).attr[key]
        if isinstance(value, list):
            del attr.list.i[:]
            attr.list.i.extend(value)
        elif isinstance(value, bool):
            attr.b = value
        elif isinstance(value, bytes):
            attr.s = value
        elif key == "DstT":
            attr.type = value
        else:
            attr.f = value

    return edit


def _extra_layer(g: _Exporter):
    state = dctnet.tiny_generator(9).state_dict()
    w = state["convs.Conv_9.weight"].numpy().transpose(2, 3, 1, 0)[:, :, :3, :3]
    g.conv("Conv_10", "sub", w, np.zeros(3, np.float32), 1)


def _rename_output(g: _Exporter):
    _node(g, "output_image").name = "output"


def _stray_generator_constant(g: _Exporter):
    g.const("generator/Conv_10/weights", np.zeros((3, 3, 3, 3), np.float32))
    g.node("Identity", "generator/Conv_10/weights/read", ["generator/Conv_10/weights"])


def _unknown_op(g: _Exporter):
    g.node("Tanh", "generator/Tanh", ["generator/Conv_9/BiasAdd"])


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (_set_const("add/y", np.float32(0.02)), "scalar constants"),  # the guided filter's eps
        (_set_const("truediv/y", np.float32(128.0)), "scalar constants"),  # the input scaling
        (_set_const("clip_by_value/Minimum/y", np.float32(1.0)), "scalar constants"),
        (_set_const("mul_6/y", np.float32(127.0)), "scalar constants"),  # the output scaling
        (_set_const("generator/mul/y", np.int32(3)), "scalar constants"),  # the upsampling factor
        (_set_const("ones/shape/0", np.int32(2)), "scalar constants"),
        (_set_const("Const_2", np.full((3, 3, 3, 1), 0.1, np.float32)), "box filter"),
        (_set_const("Const_2", np.full((5, 5, 3, 1), 1 / 25, np.float32)), "box-filter kernels"),
        (_set_const("strided_slice_2/stack", np.array([0], np.int32)), "strided slices"),
        (_set_attr("generator/LeakyRelu_3", "alpha", 0.1), "alpha"),
        (_set_attr("generator/ResizeBilinear_1", "half_pixel_centers", True), "half_pixel_centers"),
        (_set_attr("generator/Conv_1/Conv2D", "strides", [1, 1, 1, 1]), "strides"),
        (_set_attr("depthwise_3", "strides", [1, 2, 2, 1]), "strides"),
        (_set_attr("generator/Conv_1/Conv2D", "padding", b"VALID"), "padding b'VALID'"),
        (_set_attr("generator/Conv_4/Conv2D", "data_format", b"NCHW"), "b'NCHW'"),
        (_set_attr("generator/Conv_5/Conv2D", "dilations", [1, 2, 2, 1]), r"dilations \[1, 2, 2, 1\]"),
        (_set_attr("generator/ResizeBilinear", "align_corners", True), "align_corners"),
        (_rename_output, "output_image"),
        (_stray_generator_constant, "extra layer"),
        (_set_attr("output_image", "DstT", 1), "uint8"),
        (_extra_layer, "Conv_10"),
        (_unknown_op, "Tanh"),
    ],
)
def test_the_converter_refuses_a_graph_it_does_not_fully_understand(tmp_path, edit, says):
    ref = dctnet.tiny_generator(2)
    (tmp_path / "model").mkdir()
    _exporter_graph(ref.state_dict(), ref.config, tmp_path / "model" / "cartoon_bg.pb", edit=edit)
    _exporter_graph(ref.state_dict(), ref.config, tmp_path / "model" / "cartoon_h.pb")
    with pytest.raises(ValueError, match=says):
        dctnet.convert(tmp_path / "model", tmp_path / "out")
    assert not (tmp_path / "out" / "bg.safetensors").exists()  # nothing converted


def test_the_alpha_mask_is_kept_as_opencv_decodes_it(tmp_path):
    import cv2

    ref = dctnet.tiny_generator(2)
    (tmp_path / "model").mkdir()
    for f in ("cartoon_bg.pb", "cartoon_h.pb"):
        _exporter_graph(ref.state_dict(), ref.config, tmp_path / "model" / f)
    img = (np.random.default_rng(0).random((300, 300, 3)) * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "model" / "alpha.jpg"), img)
    dctnet.convert(tmp_path / "model", tmp_path / "out")
    kept = cv2.imread(str(tmp_path / "out" / "alpha.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(kept, cv2.imread(str(tmp_path / "model" / "alpha.jpg")))


def test_a_refused_head_graph_leaves_nothing_written_and_the_cli_says_which_file(tmp_path, capsys):
    ref = dctnet.tiny_generator(2)
    model = tmp_path / "model"
    model.mkdir()
    _exporter_graph(ref.state_dict(), ref.config, model / "cartoon_bg.pb")
    _exporter_graph(ref.state_dict(), ref.config, model / "cartoon_h.pb", edit=_unknown_op)
    assert dctnet.main(["convert", str(model), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cartoon_h.pb" in err and "Tanh" in err
    assert not (tmp_path / "out").exists()  # the good background graph was not written either
    (model / "cartoon_h.pb").write_bytes(b"\x00\xff not a protobuf \xff" * 7)
    assert dctnet.main(["convert", str(model), str(tmp_path / "out")]) == 2
    assert "cartoon_h.pb is not a frozen TensorFlow graph" in capsys.readouterr().err
    assert dctnet.main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "out2")]) == 2
    assert "is not a folder" in capsys.readouterr().err and not (tmp_path / "out2").exists()
