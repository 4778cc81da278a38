"""SDXL base 1.0's real shapes, from its published component configurations (benchmarks/sdxl-base-1.0/),
built on the meta device (no memory, no weights): parameter counts against the published figures, and the
LoRA rank-4 trainable count with the project's own adapter code against a count from the configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CONFIGS = Path(__file__).resolve().parents[1] / "benchmarks" / "sdxl-base-1.0"
# Parameter counts of stabilityai/stable-diffusion-xl-base-1.0's components, as published (model card
# and the diffusers/transformers loaders' reports of the released weights).
PUBLISHED = {
    "unet": 2_567_463_684,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
}


def _config(name: str) -> dict:
    return {k: v for k, v in json.loads((CONFIGS / f"{name}.json").read_text()).items() if k != "_class_name"}


def _build(name: str) -> torch.nn.Module:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        if name == "unet":
            return UNet2DConditionModel.from_config(_config(name))
        if name == "vae":
            return AutoencoderKL.from_config(_config(name))
        cls = CLIPTextModel if name == "text_encoder" else CLIPTextModelWithProjection
        cfg = {k: v for k, v in _config(name).items() if k != "architectures"}
        return cls(CLIPTextConfig(**cfg))


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_each_component_has_sdxls_published_parameter_count(name):
    model = _build(name)
    assert next(model.parameters()).device.type == "meta"
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]


def test_the_published_configuration_facts():
    unet, vae, sched = _config("unet"), _config("vae"), _config("scheduler")
    assert unet["block_out_channels"] == [320, 640, 1280] and unet["transformer_layers_per_block"] == [
        1,
        2,
        10,
    ]
    assert unet["cross_attention_dim"] == 2048 and unet["addition_time_embed_dim"] == 256
    # the added conditioning: pooled text embedding (1280) + 6 micro-conditioning numbers x 256
    assert unet["projection_class_embeddings_input_dim"] == 1280 + 6 * 256
    assert vae["scaling_factor"] == 0.13025
    assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"], sched["num_train_timesteps"]) == (
        0.00085,
        0.012,
        "scaled_linear",
        1000,
    )
    # the two text encoders' hidden sizes concatenate to the UNet's cross-attention width
    assert _config("text_encoder")["hidden_size"] + _config("text_encoder_2")["hidden_size"] == 2048


def _lora_count_from_config(unet: dict, rank: int) -> int:
    """LoRA on to_q, to_k, to_v, to_out.0 of every transformer block: r * (in + out) per projection.
    Self-attention: four C -> C projections; cross-attention: q and out C -> C, k and v 2048 -> C."""
    widths = unet["block_out_channels"]
    layers = unet["transformer_layers_per_block"]
    cross = unet["cross_attention_dim"]
    blocks: dict[int, int] = {}
    for i, kind in enumerate(unet["down_block_types"]):
        if kind.startswith("CrossAttn"):
            blocks[widths[i]] = blocks.get(widths[i], 0) + unet["layers_per_block"] * layers[i]
    blocks[widths[-1]] += layers[-1]  # the mid block
    for i, kind in enumerate(unet["up_block_types"]):
        level = len(widths) - 1 - i
        if kind.startswith("CrossAttn"):
            blocks[widths[level]] += (unet["layers_per_block"] + 1) * layers[level]
    per_block = {c: rank * (4 * 2 * c + 2 * 2 * c + 2 * (cross + c)) for c in blocks}
    return sum(per_block[c] * n for c, n in blocks.items())


def test_lora_rank_4_trains_what_the_configuration_says():
    from geneava.stages.finetune import add_lora

    unet = _build("unet")
    trainable = add_lora(unet, rank=4)
    n = sum(p.numel() for p in trainable)
    assert n == _lora_count_from_config(_config("unet"), 4)
    assert n == 5_806_080  # 70 transformer blocks: 10 at 640 channels, 60 at 1280
    assert all(".lora_" in name for name, p in unet.named_parameters() if p.requires_grad)
