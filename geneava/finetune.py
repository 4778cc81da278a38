"""Expression-guided LoRA fine-tuning of SDXL (paper, "Expression-guided fine-tuning").

The loop follows diffusers' train_text_to_image_lora_sdxl.py: encode prompt -> add noise ->
predict -> loss -> backward through `accelerate`. peft supplies the LoRA layers, diffusers the
noise schedule and the LoRA file format, accelerate the devices and mixed precision.

Foundation scope: the diffusion loss L_dm. The expression term α·L_exp (POSTER embeddings of x_0
and of the one-step reconstruction x̂_0) is issue #4; until then alpha must be 0.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import StableDiffusionXLPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from tqdm.auto import tqdm

from geneava import models, prompts
from geneava.config import ParamsError
from geneava.data import load_rgb, read_split
from geneava.io import sha256_file, write_csv, write_json

log = logging.getLogger(__name__)

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the attention projections, as in diffusers' script
LORA_FILE = "pytorch_lora_weights.safetensors"


class ImageCaptionSet(torch.utils.data.Dataset):
    """Fine-tuning images as tensors in [-1, 1], with the index of their caption."""

    def __init__(self, paths: list[str], caption_index: list[int], resolution: int):
        self.paths, self.caption_index, self.resolution = paths, caption_index, resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = load_rgb(Path(self.paths[i]))
        if img.size != (self.resolution, self.resolution):
            img = img.resize((self.resolution, self.resolution))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        return x, self.caption_index[i]


def add_lora(unet: torch.nn.Module, rank: int) -> list[torch.nn.Parameter]:
    """Freeze the UNet and attach LoRA adapters; return the (only) trainable parameters."""
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    )
    return [p for p in unet.parameters() if p.requires_grad]


def time_ids(resolution: int, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's micro-conditioning: (original h, w, crop top, left, target h, w); images are uncropped."""
    ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=device, dtype=dtype)
    return ids.repeat(batch, 1)


def finetune(
    model_params: dict,
    prompt_params: dict,
    params: dict,
    prepare_dir: Path,
    out_dir: Path,
    resolution: int,
) -> pd.DataFrame:
    """Train the LoRA; write `out_dir/lora/`, `loss.csv` and `metrics.json`; return the loss history."""
    if params["alpha"] > 0:
        raise ParamsError(
            f"finetune alpha = {params['alpha']}: the expression loss L_exp is not implemented yet "
            "(issue #4). Set finetune.<profile>.alpha: 0 to train with the diffusion loss alone."
        )
    out_dir = Path(out_dir)
    accelerator = Accelerator(
        mixed_precision=params["mixed_precision"],
        gradient_accumulation_steps=params["gradient_accumulation_steps"],
    )
    set_seed(params["seed"])
    device = accelerator.device

    # --- models: SDXL from the factory; only the LoRA layers train
    pipe = models.sdxl_pipeline(
        model_params["sdxl"],
        seed=model_params["seed"],
        dtype=model_params["dtype"],
        local_files_only=model_params["local_files_only"],
        corpus=prompts.vocabulary(prompt_params),
    )
    unet, vae = pipe.unet, pipe.vae
    for module in (vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
    vae.to(device, dtype=torch.float32)  # SDXL's VAE overflows in fp16; keep it in fp32
    pipe.text_encoder.to(device)
    pipe.text_encoder_2.to(device)
    unet.to(device)
    add_lora(unet, params["rank"])
    cast_training_params(unet, dtype=torch.float32)  # trainable LoRA weights stay fp32 under fp16
    if params["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    noise_scheduler = models.training_scheduler(pipe)

    # --- data: captions embedded once per class (the text encoders are frozen)
    rows = read_split(prepare_dir, "finetune")
    if rows.empty:
        raise ParamsError(f"no fine-tuning images in {prepare_dir}; check prepare.*.finetune_per_class")
    expressions = sorted(rows["expression"].unique())
    with torch.no_grad():
        prompt_embeds, _, pooled_embeds, _ = pipe.encode_prompt(
            [prompts.caption(prompt_params, e) for e in expressions],
            device=device,
            do_classifier_free_guidance=False,
        )
    caption_index = [expressions.index(e) for e in rows["expression"]]
    dataset = ImageCaptionSet(list(rows["path"]), caption_index, resolution)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=params["batch_size"],
        shuffle=True,
        generator=torch.Generator().manual_seed(params["seed"]),
    )

    lora_params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        lora_params,
        lr=params["lr"],
        betas=(params["adam_beta1"], params["adam_beta2"]),
        weight_decay=params["weight_decay"],
    )
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)

    steps_per_epoch = math.ceil(len(loader) / params["gradient_accumulation_steps"])
    total = params["max_train_steps"] or params["epochs"] * steps_per_epoch
    history = []
    bar = tqdm(total=total, desc="finetune", unit="step", disable=not accelerator.is_local_main_process)
    step = 0
    unet.train()
    for epoch in range(params["epochs"]):
        for pixels, caption in loader:
            with accelerator.accumulate(unet):
                with torch.no_grad():
                    latents = vae.encode(pixels.to(device, torch.float32)).latent_dist.sample()
                    latents = (latents * vae.config.scaling_factor).to(prompt_embeds.dtype)
                noise = torch.randn_like(latents)
                t = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (len(latents),), device=device
                )
                # z_t = sqrt(ᾱ_t) z_0 + sqrt(1 − ᾱ_t) ε
                noisy = noise_scheduler.add_noise(latents, noise, t)
                eps = unet(
                    noisy,
                    t,
                    encoder_hidden_states=prompt_embeds[caption],
                    added_cond_kwargs={
                        "text_embeds": pooled_embeds[caption],
                        "time_ids": time_ids(resolution, len(latents), device, prompt_embeds.dtype),
                    },
                ).sample
                # L_dm = ||ε − ε_θ(z_t, t, τ(p))||²
                loss_dm = F.mse_loss(eps.float(), noise.float())
                loss = loss_dm
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                step += 1
                history.append({"step": step, "epoch": epoch, "loss": loss.item(), "loss_dm": loss_dm.item()})
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if step >= total:
                    break
        if step >= total:
            break
    bar.close()

    accelerator.wait_for_everyone()
    history = pd.DataFrame(history)
    if accelerator.is_main_process:
        lora_dir = out_dir / "lora"
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(accelerator.unwrap_model(unet)))
        StableDiffusionXLPipeline.save_lora_weights(
            lora_dir, unet_lora_layers=layers, safe_serialization=True
        )
        write_csv(out_dir / "loss.csv", history)
        write_json(
            out_dir / "metrics.json",
            {
                "steps": int(step),
                "images": len(dataset),
                "final_loss": float(history["loss"].iloc[-1]),
                "mean_loss_last_epoch": float(
                    history[history["epoch"] == history["epoch"].max()]["loss"].mean()
                ),
                "lora_sha256": sha256_file(lora_dir / LORA_FILE),
            },
        )
    return history


def plot_loss(history: pd.DataFrame, save_to: Path | None = None):
    """The training loss per step with a moving average (seaborn)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(6, 3))
    sns.lineplot(data=history, x="step", y="loss", ax=ax, alpha=0.4, label="loss")
    window = max(1, len(history) // 10)
    ax.plot(history["step"], history["loss"].rolling(window, min_periods=1).mean(), label=f"mean of {window}")
    ax.set(title="Fine-tuning loss", xlabel="step", ylabel="loss")
    ax.legend()
    fig.tight_layout()
    if save_to:
        fig.savefig(save_to, dpi=120)
    return fig
