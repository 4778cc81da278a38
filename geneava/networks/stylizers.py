"""Stylizers (paper, "Stylization"): a realistic face in, an avatar of the same size out.

Stylizers share one interface, `stylize(images, rows) -> images` (RGB PIL images of the same size):
- `cartoon`: a classical cartoonizer (edge-preserving smoothing, colour quantisation, dark edges) with
  OpenCV; runs anywhere, the default profile's stylizer;
- `dctnet`: DCT-Net's 3D-cartoon model (the paper's), ported to PyTorch (`geneava.networks.dctnet`):
  background network on the whole image, head network on a 5-point-aligned 288 px crop, alpha-blended back;
- `sdxl_img2img`: diffusers' SDXL img2img with a cartoon prompt (and optionally a cartoon LoRA), a modern
  alternative the paper's framework allows;
- `passthrough`: returns the input; a control that must score perfect preservation.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from PIL import Image

from geneava.core import config, schema
from geneava.networks import dctnet_pipeline, models

log = logging.getLogger(__name__)

STYLIZERS = schema.STYLIZERS  # the names validation accepts; stylizer() builds each


class Passthrough:
    name = "passthrough"

    def stylize(self, images: list[Image.Image], rows: pd.DataFrame) -> list[Image.Image]:
        return [im.copy() for im in images]


class Cartoon:
    """Edge-preserving smoothing (repeated bilateral filter), flat colour regions and dark edges from an
    adaptive threshold. A plain background stays one flat colour: the threshold's offset keeps flat
    regions free of edges. The filters are sized for a 256 px face: a smaller image is cartooned at
    256 px and brought back (at 64 px, 9 px edge blocks blackened whole eyes and hair).

    Flat regions come from quantising the lightness only (`quantize="tone"`, CIELAB L* into `levels`
    bands, hue and chroma kept, as in Winnemöller et al.'s video abstraction) or the colours
    (`"colors"`, median cut to `colors`). The median cut shares its few colours over skin, hair, shirt
    and background, so mid skin tones snap to a neighbour's: on the world's faces it kept identity
    for 79% (Middle Eastern 57%) in an early run; tone bands keep far more (the current share is
    `identity_kept_share` in the stage's metrics, docs/results.md). The edge threshold's offset (8 grey
    levels) draws outlines on strong edges only: at 4 it also outlined shading and wrinkles, ringed the
    eyes and read as another expression to POSTER (mean distance 7.5 vs 5.2; seniors' 9.8 vs 6.6)."""

    name = "cartoon"
    WORK = 256
    QUANTIZE = ("tone", "colors")

    def __init__(
        self,
        colors: int = 12,
        smoothing: int = 5,
        edge_block: int = 9,
        edge_offset: int = 8,
        quantize: str = "colors",
        levels: int = 8,
    ):
        if quantize not in self.QUANTIZE:
            raise ValueError(f"stylize.quantize must be one of {', '.join(self.QUANTIZE)}, not {quantize!r}")
        self.colors, self.smoothing, self.edge_block, self.edge_offset = (
            colors,
            smoothing,
            edge_block,
            edge_offset,
        )
        self.quantize, self.levels = quantize, levels

    def one(self, img: Image.Image) -> Image.Image:
        img = img.convert("RGB")
        if min(img.size) >= self.WORK:
            return self._cartoon(img)
        k = self.WORK / min(img.size)
        big = img.resize((round(img.width * k), round(img.height * k)), Image.Resampling.BICUBIC)
        return self._cartoon(big).resize(img.size, Image.Resampling.LANCZOS)

    def _cartoon(self, img: Image.Image) -> Image.Image:
        import cv2

        rgb = np.asarray(img)
        scale = max(1, round(min(rgb.shape[:2]) / 256))  # filters sized to the image, 256 px reference
        smooth = rgb
        for _ in range(self.smoothing):
            smooth = cv2.bilateralFilter(smooth, 5 * scale, 40, 5 * scale)
        if self.quantize == "tone":
            lab = cv2.cvtColor(smooth, cv2.COLOR_RGB2LAB)
            band = 256 / self.levels
            lab[..., 0] = np.clip((np.floor(lab[..., 0] / band) + 0.5) * band, 0, 255).astype(np.uint8)
            flat = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
        else:
            flat = np.asarray(
                Image.fromarray(smooth).quantize(self.colors, method=Image.Quantize.MEDIANCUT).convert("RGB")
            )
        gray = cv2.medianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), 2 * scale + 1)
        block = self.edge_block * scale | 1
        edges = cv2.adaptiveThreshold(
            gray, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, block, self.edge_offset
        )
        out = np.where(edges[..., None] == 0, (flat * 0.35).astype(np.uint8), flat)
        return Image.fromarray(out)

    def stylize(self, images: list[Image.Image], rows: pd.DataFrame) -> list[Image.Image]:
        return [self.one(im) for im in images]


class DCTNet:
    """DCT-Net's compound pipeline: background network, aligned head network, alpha blend."""

    name = "dctnet"
    HEAD = dctnet_pipeline.HEAD

    def __init__(self, source: str, seed: int = 0, device=None):
        from geneava.networks import dctnet

        self.device = device or torch.device("cpu")
        if source == "tiny":
            self.bg, self.head = dctnet.tiny_generator(seed), dctnet.tiny_generator(seed + 1)
            yy, xx = np.mgrid[: self.HEAD, : self.HEAD] / (self.HEAD - 1) * 2 - 1
            self.alpha = np.clip(1.5 - 1.5 * np.sqrt(xx**2 / 0.7 + yy**2 / 0.9), 0, 1).astype(np.float32)
        else:
            folder = config.path(source)
            for f in ("bg.safetensors", "head.safetensors", "alpha.png"):
                if not (folder / f).is_file():
                    raise FileNotFoundError(
                        f"{folder / f} not found: convert DCT-Net's graphs first "
                        "(python -m geneava.networks.dctnet convert <modelscope folder> <folder>; "
                        "see docs/stages/stylize.md)"
                    )
            self.bg = dctnet.load_generator(folder / "bg.safetensors")
            self.head = dctnet.load_generator(folder / "head.safetensors")
            self.alpha = dctnet_pipeline.load_alpha(folder / "alpha.png")
        self.bg.to(self.device)
        self.head.to(self.device)
        self._points = None

    def _run(self, net: str, bgr: np.ndarray) -> np.ndarray:
        """One of the two networks on a BGR uint8 image, as the released graphs compute it (no TF32)."""
        from geneava.networks import dctnet

        x = torch.from_numpy(bgr.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None].to(self.device)
        with torch.no_grad(), dctnet_pipeline.full_float32():
            return dctnet.to_uint8((self.bg if net == "bg" else self.head)(x))[0]

    def one(self, img: Image.Image) -> Image.Image:
        if self._points is None:
            self._points = dctnet_pipeline.landmarks68()
        out = dctnet_pipeline.cartoonize(np.asarray(img.convert("RGB")), self._run, self.alpha, self._points)
        return Image.fromarray(out)

    def stylize(self, images: list[Image.Image], rows: pd.DataFrame) -> list[Image.Image]:
        return [self.one(im) for im in images]


class SDXLImg2Img:
    """diffusers' SDXL img2img on the generation model's components, with a cartoon prompt per row."""

    name = "sdxl_img2img"

    def __init__(self, model_params: dict, prompt_params: dict, params: dict, device):
        from diffusers import StableDiffusionXLImg2ImgPipeline

        base = models.sdxl_from_params(model_params, prompt_params)
        self.pipe = StableDiffusionXLImg2ImgPipeline(**base.components).to(device)
        if params["lora"]:
            self.pipe.load_lora_weights(str(config.path(params["lora"])))
        self.pipe.set_progress_bar_config(disable=True)
        self.params, self.device = params, device

    def stylize(self, images: list[Image.Image], rows: pd.DataFrame) -> list[Image.Image]:
        p = self.params
        prompts = [p["prompt"].format(expression=r.expression) for r in rows.itertuples()]
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in rows["seed_used"]]
        out = self.pipe(
            prompt=prompts,
            image=images,
            strength=p["strength"],
            num_inference_steps=p["steps"],
            guidance_scale=p["guidance_scale"],
            generator=gens,
        ).images
        return [o.resize(i.size) for o, i in zip(out, images, strict=True)]


# Bumped when a stylizer's output changes, so resumed runs do not keep avatars of the old code.
# cartoon 2: small faces are cartooned at 256 px (edges were four times too wide at 64 px).
# cartoon 3: edges on strong contrasts only (offset 8: outlines of shading and wrinkles read as another
#            expression).
# dctnet 2: ModelScope's pipeline exactly (fit direction, pupils, truncated working size, float blend
#           rounded once, no TF32; geneava/networks/dctnet_pipeline.py).
REVISION = {"cartoon": 3, "dctnet": 2}


def stylizer(params: dict, model_params: dict, prompt_params: dict, device=None):
    name = params["stylizer"]
    if name == "cartoon":
        return Cartoon(params["colors"], quantize=params["quantize"], levels=params["levels"])
    if name == "passthrough":
        return Passthrough()
    if name == "dctnet":
        return DCTNet(params["dctnet"], model_params["seed"], device)
    if name == "sdxl_img2img":
        return SDXLImg2Img(model_params, prompt_params, params, device or torch.device("cpu"))
    raise ValueError(f"unknown stylizer '{name}' (known: {', '.join(STYLIZERS)})")
