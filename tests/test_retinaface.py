"""RetinaFace in PyTorch: anchors in the heads' order, box/landmark coding, matching, loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geneava.core import config, schema
from geneava.networks import faces, retinaface


def test_heads_emit_one_prediction_per_anchor_in_any_image_size():
    model = retinaface.tiny(0)
    for h, w in ((64, 64), (96, 128), (70, 50)):
        loc, logits, landm = model(torch.zeros(2, 3, h, w))
        a = len(retinaface.priors(h, w))
        assert loc.shape == (2, a, 4) and logits.shape == (2, a, 2) and landm.shape == (2, a, 10)


def test_priors_follow_the_heads_layout_row_major_two_sizes_per_cell():
    p = retinaface.priors(64, 64)
    first = p[: 2 * 8 * 8].view(8, 8, 2, 4)  # stride 8: 8 x 8 cells, sizes 16 and 32
    assert torch.allclose(first[0, 1, 0], torch.tensor([12 / 64, 4 / 64, 16 / 64, 16 / 64]))
    assert torch.allclose(first[1, 0, 1], torch.tensor([4 / 64, 12 / 64, 32 / 64, 32 / 64]))
    assert len(p) == 2 * (8 * 8 + 4 * 4 + 2 * 2)


def test_encode_then_decode_returns_the_boxes_and_landmarks():
    anchors = retinaface.priors(64, 64)[:5]
    boxes = torch.tensor([[0.1, 0.2, 0.6, 0.9]]).repeat(5, 1)
    points = torch.rand(5, 5, 2)
    loc, landm = retinaface.encode(boxes, points, anchors)
    back, pts = retinaface.decode(loc, landm, anchors)
    assert torch.allclose(back, boxes, atol=1e-5) and torch.allclose(pts, points, atol=1e-5)


def test_matching_gives_every_face_an_anchor_and_an_empty_image_none():
    anchors = retinaface.priors(64, 64)
    tiny_face = torch.tensor([[0.45, 0.45, 0.52, 0.52]])  # overlaps no anchor by 0.35
    labels, loc, _ = retinaface.targets(tiny_face, torch.zeros(1, 5, 2), anchors)
    assert labels.sum() == 1  # its best anchor is forced
    big = torch.tensor([[0.1, 0.05, 0.9, 0.95]])
    labels, loc, landm = retinaface.targets(big, torch.full((1, 5, 2), 0.5), anchors)
    assert labels.sum() >= 2
    decoded, _ = retinaface.decode(loc[labels > 0], landm[labels > 0], anchors[labels > 0])
    assert torch.allclose(decoded, big.expand_as(decoded), atol=1e-5)
    labels, _, _ = retinaface.targets(torch.zeros(0, 4), torch.zeros(0, 5, 2), anchors)
    assert labels.sum() == 0


def test_loss_trains_the_background_class_on_a_faceless_image():
    anchors = retinaface.priors(64, 64)
    model = retinaface.tiny(0).train()
    out = model(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255)
    labels = torch.zeros(1, len(anchors), dtype=torch.long)
    terms = retinaface.loss(out, labels, torch.zeros(1, len(anchors), 4), torch.zeros(1, len(anchors), 10))
    assert terms["conf"] > 0 and terms["loc"] == 0 and terms["landm"] == 0
    terms["total"].backward()
    assert sum(h.conv1x1.weight.grad.abs().sum() for h in model.ClassHead) > 0
    assert all(h.conv1x1.weight.grad is None or not h.conv1x1.weight.grad.any() for h in model.BboxHead)


def test_the_pytorch_ports_checkpoint_layout_loads_weights_only(tmp_path):
    """mobilenet0.25_Final.pth of the PyTorch port is a state dict with a `module.` prefix."""
    model = retinaface.tiny(3)
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "port.pth")
    loaded = retinaface.load(tmp_path / "port.pth")
    x = torch.rand(1, 3, 64, 64)
    assert all(torch.equal(a, b) for a, b in zip(model(x), loaded(x), strict=True))
    assert "body.stage1.0.0.weight" in model.state_dict() and "ClassHead.2.conv1x1.bias" in model.state_dict()
    torch.save({"backbone.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a RetinaFace"):
        retinaface.load(tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError, match="world stage"):
        retinaface.load(tmp_path / "missing.safetensors")


def test_detector_params_take_a_checkpoint_or_a_known_name():
    for ok in ("auto", "dlib", "tiny", "models/world/retinaface.safetensors", "x/mobilenet0.25_Final.pth"):
        assert schema.detector("k", ok) == ok
    with pytest.raises(config.ParamsError, match="RetinaFace checkpoint"):
        schema.detector("generate.default.detector", "mtcnn")
    # the seeded untrained network at threshold 0 keeps every anchor that survives NMS: the decoding
    # plumbing (well-formed boxes, scores in descending order, five landmarks each) is what is checked
    found = faces.face_detector("tiny", threshold=0.0).detect(np.zeros((64, 64, 3), np.uint8))
    assert len(found) > 10
    for f in found:
        x0, y0, x1, y1 = f.box
        assert x0 < x1 and y0 < y1 and 0 <= f.score <= 1 and len(f.landmarks) == 5
    assert [f.score for f in found] == sorted((f.score for f in found), reverse=True)
