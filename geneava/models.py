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
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from geneava.tokenizer import train_clip_tokenizer

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


def tiny_sdxl(seed: int, corpus: list[str]) -> StableDiffusionXLPipeline:
    """A StableDiffusionXLPipeline of SDXL's architecture with seeded random weights."""
    tokenizer = train_clip_tokenizer(corpus)
    text_config = CLIPTextConfig(
        **TINY_SDXL["text_encoder"],
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # One seed per component, so adding a component later does not change the others' weights.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_SDXL["unet"])
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_SDXL["vae"])
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
        scheduler=EulerDiscreteScheduler(**TINY_SDXL["scheduler"]),
        add_watermarker=False,
    )


def sdxl_pipeline(
    source: str,
    *,
    seed: int = 0,
    dtype: str = "float32",
    local_files_only: bool = True,
    corpus: list[str] | None = None,
) -> StableDiffusionXLPipeline:
    """SDXL from real weights (hub id or folder) or, for source="tiny", its seeded tiny twin."""
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
    if Path(source).expanduser().exists():
        source = str(Path(source).expanduser())
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(
            source, dtype=DTYPES[dtype], use_safetensors=True, local_files_only=local_files_only
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
    from geneava import prompts  # prompts' vocabulary trains the tiny model's offline tokenizer

    return sdxl_pipeline(
        model_params["sdxl"],
        seed=model_params["seed"],
        dtype=model_params["dtype"],
        local_files_only=model_params["local_files_only"],
        corpus=prompts.vocabulary(prompt_params),
    )


def training_scheduler(pipe: StableDiffusionXLPipeline) -> DDPMScheduler:
    """The DDPM noise schedule (ᾱ_t) the model was trained with, from the pipeline's own config."""
    return DDPMScheduler.from_config(pipe.scheduler.config)


def expression_encoder(source: str, seed: int = 0) -> torch.nn.Module:
    """E_exp, the expression encoder: POSTER from an official checkpoint file, or its tiny twin.

    Returned frozen and in eval mode; `.embed(images in [-1, 1])` gives the 512-d (tiny: 64-d)
    feature before POSTER's classifier head, differentiable with respect to the images.
    """
    from geneava import poster

    model = poster.tiny_poster(seed) if source == "tiny" else poster.from_checkpoint(Path(source))
    return model.requires_grad_(False).eval()
