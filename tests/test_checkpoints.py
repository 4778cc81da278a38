"""POSTER and the watermark classifier: official layouts load, and nothing in a checkpoint executes."""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from geneava.core.io import load_tensors
from geneava.networks import poster, watermark


def test_source_fingerprint_follows_the_weights_behind_a_path(tmp_path):
    from geneava.core.io import source_fingerprint

    folder = tmp_path / "sdxl"
    (folder / "unet").mkdir(parents=True)
    weights = folder / "unet" / "w.safetensors"
    save_file({"w": torch.zeros(3)}, str(weights))
    first = source_fingerprint(folder)
    assert source_fingerprint(str(folder)) == first  # same files: same fingerprint
    save_file({"w": torch.ones(3)}, str(weights))  # retrained in place
    second = source_fingerprint(folder)
    assert second != first
    assert source_fingerprint(weights) != source_fingerprint(folder)
    (folder / "unet" / "w.safetensors").rename(folder / "unet" / "v.safetensors")
    assert source_fingerprint(folder) != second  # the same bytes under another name
    # not a local path: the source names itself (a hub id, "tiny")
    assert (
        source_fingerprint("stabilityai/stable-diffusion-xl-base-1.0")
        == "stabilityai/stable-diffusion-xl-base-1.0"
    )
    assert source_fingerprint("tiny") == "tiny" and source_fingerprint(None) is None


# Parameter names read off the official POSTER code (zczcwh/POSTER, models/*.py).
OFFICIAL_KEYS = [
    "face_landback.conv1.conv.weight",
    "face_landback.conv_23.conv_dw.conv.weight",
    "face_landback.conv_3.model.0.project.bn.running_mean",
    "face_landback.output_layer.linear.weight",
    "ir_back.input_layer.0.weight",
    "ir_back.body.0.res_layer.1.weight",
    "ir_back.body.3.shortcut_layer.0.weight",
    "ir_layer.weight",
    "pyramid_fuse.cls_token",
    "pyramid_fuse.pos_embed",
    "pyramid_fuse.downsample_m.weight",
    "pyramid_fuse.blocks.7.block_l.attn_img.kv.weight",
    "pyramid_fuse.blocks.0.block_s.attn_lm.proj.bias",
    "pyramid_fuse.blocks.0.block_m.mlp2.fc1.weight",
    "pyramid_fuse.blocks.0.upsample_m.weight",
    "pyramid_fuse.blocks.0.block_l.conv.weight",
    "pyramid_fuse.norm.weight",
    "se_block.linear2.weight",
    "head.linear.weight",
]


@pytest.fixture(scope="module")
def full():
    return poster.Poster()


def test_full_poster_has_the_official_layout_and_size(full):
    keys = set(full.state_dict())
    assert set(OFFICIAL_KEYS) <= keys
    n = sum(p.numel() for p in full.parameters())
    unused_output_layer = 2 * 512 + 512 * 7 * 7 * 512 + 512 + 2 * 512  # BN2d + Linear + BN1d upstream
    assert abs(n + unused_output_layer - 71.8e6) < 0.1e6  # published: 71.8M (one decimal); ours: 71.85M


def test_forward_returns_logits_and_512d_feature(full):
    with torch.no_grad():
        logits, feature = full.eval()(torch.randn(2, 3, 224, 224))
    assert logits.shape == (2, 7) and feature.shape == (2, 512)


def _official_style_checkpoint(model, path, extra=None):
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state["module.ir_back.output_layer.3.weight"] = torch.zeros(4, 4)  # upstream's unused layer
    torch.save({"model_state_dict": state, "epoch": 3, **(extra or {})}, path)


def test_official_style_checkpoint_loads(tmp_path):
    src = poster.Poster(poster.PosterConfig(num_classes=8))
    _official_style_checkpoint(src, tmp_path / "ck.pth")
    loaded = poster.from_checkpoint(tmp_path / "ck.pth", channels="rgb")
    assert loaded.config.num_classes == 8
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(src.eval()(x)[1], loaded(x)[1])


class Helper:
    """Like the helper objects POSTER++ pickles: building one for real would leave a mark on disk."""

    def __init__(self, marker):
        open(marker, "w").close()
        self.marker = marker

    def __reduce__(self):
        return (Helper, (self.marker,))


class Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_helper_objects_are_inert(tmp_path):
    marker = tmp_path / "constructed"
    helper = Helper(marker)
    marker.unlink()
    src = poster.tiny_poster(0)
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    torch.save({"state_dict": state, "recorder": helper}, tmp_path / "pp.pth")
    obj = load_tensors(tmp_path / "pp.pth")
    assert not marker.exists()  # Helper.__init__ never ran
    assert type(obj["recorder"]).__name__.startswith("Inert[")
    assert set(poster.extract_state_dict(obj)) == set(src.state_dict())


def test_hostile_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "executed"
    torch.save({"state_dict": {}, "x": Hostile(marker)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="refused"):
        load_tensors(tmp_path / "bad.pth")
    assert not marker.exists()


def test_missing_checkpoint_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="zczcwh/POSTER"):
        poster.from_checkpoint(tmp_path / "nope.pth")


def test_wrong_architecture_is_refused(tmp_path):
    _official_style_checkpoint(poster.tiny_poster(0), tmp_path / "tiny.pth")
    with pytest.raises((ValueError, RuntimeError), match="size mismatch|does not match"):
        poster.from_checkpoint(tmp_path / "tiny.pth", channels="rgb")


def test_watermark_classifier_loads_reference_layout(tmp_path):
    model = watermark.ConvNeXt()
    save_file(
        {f"module.{k}": v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "wm.safetensors"
    )
    clf = watermark.watermark_filter(str(tmp_path / "wm.safetensors"))
    loaded = clf.model.state_dict()
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())  # every tensor, unprefixed
    p = clf.probability(np.zeros((300, 200, 3), np.uint8))
    assert p != clf.probability(np.full((300, 200, 3), 255, np.uint8))
    assert watermark.watermark_filter("none") is None
    with pytest.raises(FileNotFoundError, match="boomb0om"):
        watermark.watermark_filter(str(tmp_path / "missing.pth"))
