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


def _synthetic_graph(state: dict, cfg: dctnet.DCTNetConfig, path, skip: tuple[str, ...] = ()):
    """A frozen GraphDef holding the generator's constants in TensorFlow's layout and names."""
    from tensorboard.compat.proto import graph_pb2
    from tensorboard.util import tensor_util

    graph = graph_pb2.GraphDef()
    for name, *_ in dctnet.conv_specs(cfg):
        if name in skip:
            continue
        key = f"convs.{name.replace('/', '_')}"
        for suffix, value in (
            ("weights", state[f"{key}.weight"].numpy().transpose(2, 3, 1, 0)),
            ("biases", state[f"{key}.bias"].numpy()),
        ):
            node = graph.node.add(name=f"generator/{name}/{suffix}", op="Const")
            node.attr["value"].tensor.CopyFrom(tensor_util.make_tensor_proto(np.ascontiguousarray(value)))
    graph.node.add(name="input_image", op="Placeholder")
    path.write_bytes(graph.SerializeToString())


def test_converter_reads_a_frozen_graph_into_safetensors(tmp_path):
    ref = dctnet.tiny_generator(3)
    cfg = ref.config
    (tmp_path / "model").mkdir()
    _synthetic_graph(ref.state_dict(), cfg, tmp_path / "model" / "cartoon_bg.pb")
    _synthetic_graph(dctnet.tiny_generator(4).state_dict(), cfg, tmp_path / "model" / "cartoon_h.pb")
    written = dctnet.convert(tmp_path / "model", tmp_path / "out")
    assert {p.name for p in written} == {"bg.safetensors", "head.safetensors"}
    loaded = dctnet.load_generator(tmp_path / "out" / "bg.safetensors")
    assert loaded.config == cfg
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded(x), ref(x))


def test_converter_names_what_is_missing(tmp_path):
    ref = dctnet.tiny_generator(0)
    (tmp_path / "model").mkdir()
    _synthetic_graph(ref.state_dict(), ref.config, tmp_path / "model" / "cartoon_bg.pb", skip=("Conv_9",))
    with pytest.raises(ValueError, match="Conv_9"):
        dctnet.convert(tmp_path / "model", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="cartoon_bg.pb"):
        dctnet.convert(tmp_path / "nowhere", tmp_path / "out")
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
