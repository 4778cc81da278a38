"""Expression-guided LoRA fine-tuning of SDXL (paper, "Expression-guided fine-tuning").

The loop follows diffusers' train_text_to_image_lora_sdxl.py: encode prompt -> add noise ->
predict -> loss -> backward through `accelerate`. peft supplies the LoRA layers, diffusers the noise
schedule and the LoRA file format, accelerate devices, mixed precision, accumulation and DDP.

Resuming is exact: the data order of epoch e is a permutation seeded by (seed, e), and every random
draw of micro-batch m (noise, timesteps, VAE sample) comes from a generator seeded by (seed, m, rank).
A checkpoint therefore needs only the LoRA weights (safetensors), the optimizer state (tensors,
loaded with weights_only=True) and the counters; no pickled RNG state is ever loaded.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import pandas as pd
import torch
from accelerate import Accelerator
from diffusers import StableDiffusionXLPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from tqdm.auto import tqdm

from geneava.core import checkpoints, cli, config, io, parallel, prompts
from geneava.core.config import ParamsError
from geneava.core.images import load_images, read_split
from geneava.core.io import sha256_file, source_fingerprint, write_csv, write_json
from geneava.networks import models
from geneava.stages import lora_export, validation
from geneava.stages.objective import key_settings, losses_for_batch, real_view, vae_factor

log = logging.getLogger(__name__)

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the attention projections, as in diffusers' script
LORA_FILE = "pytorch_lora_weights.safetensors"


# ------------------------------------------------------------------ pieces of the method


def add_lora(unet: torch.nn.Module, rank: int) -> list[torch.nn.Parameter]:
    """Freeze the UNet and attach LoRA adapters; return the (only) trainable parameters."""
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    )
    return [p for p in unet.parameters() if p.requires_grad]


def prepare_for_training(pipe, rank: int) -> list[torch.nn.Parameter]:
    """Freeze the VAE and both text encoders, attach LoRA to the UNet; return the trainable params."""
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
    return add_lora(pipe.unet, rank)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This process's micro-batches of epoch `epoch`: a (seed, epoch)-seeded permutation, sharded so
    every process gets the same number of batches (DDP steps in lock-step)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    per_process = len(batches) // world
    if per_process == 0:
        raise ParamsError(f"{n} images make fewer batches of {batch_size} than the {world} processes")
    return batches[rank * per_process : (rank + 1) * per_process]


def micro_generator(seed: int, micro: int, rank: int, device: torch.device) -> torch.Generator:
    key = hashlib.sha256(f"{seed}:{micro}:{rank}".encode()).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(key[:8], "little") >> 1)


def save_lora(unet, lora_dir: Path) -> Path:
    """The LoRA in diffusers' format, which stock `StableDiffusionXLPipeline.load_lora_weights` reads."""
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionXLPipeline.save_lora_weights(lora_dir, unet_lora_layers=layers, safe_serialization=True)
    io.normal_tree(lora_dir)  # safetensors writes 0600
    return Path(lora_dir) / LORA_FILE


# ------------------------------------------------------------------ the training run


def finetune(
    model_params: dict,
    prompt_params: dict,
    params: dict,
    prepare_dir: Path,
    out_dir: Path,
    resolution: int,
) -> pd.DataFrame:
    """Train the LoRA; write `out_dir/lora/`, `loss.csv`, `metrics.json`; return the loss history.

    Resumes from the newest checkpoint in `out_dir/checkpoints` made with the same settings.
    """
    out_dir = Path(out_dir)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=params["mixed_precision"],
        gradient_accumulation_steps=params["gradient_accumulation_steps"],
        log_with="tensorboard",  # offline event files in out_dir/logs (validation.Watch)
        project_dir=str(out_dir),
    )
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    alpha, seed = params["alpha"], params["seed"]

    pipe, encoder = training_models(model_params, prompt_params, params, device)
    unet, vae, noise_scheduler = pipe.unet, pipe.vae, models.training_scheduler(pipe)
    rows, caption_of, prompt_embeds, pooled_embeds, real_embeds = training_data(
        pipe, encoder, prompt_params, prepare_dir, resolution, params, device
    )
    moments = cached_moments(vae, list(rows["path"]), resolution, device) if params["cache_latents"] else None
    paths = list(rows["path"])

    lora_params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        lora_params,
        lr=params["lr"],
        betas=(params["adam_beta1"], params["adam_beta2"]),
        weight_decay=params["weight_decay"],
    )
    unet, optimizer = accelerator.prepare(unet, optimizer)

    accum = params["gradient_accumulation_steps"]
    per_epoch = len(epoch_batches(len(paths), params["batch_size"], seed, 0, rank, world)) // accum
    if per_epoch == 0:
        raise ParamsError("fewer micro-batches per process than gradient_accumulation_steps")
    total = params["max_train_steps"] or params["epochs"] * per_epoch
    # the weights behind the model paths too: a base retrained in place never resumes old checkpoints
    weights = [source_fingerprint(model_params[k]) for k in ("sdxl", "expression")]
    # what can change the weights
    trains = key_settings({k: v for k, v in params.items() if k not in validation.KEYS})
    run_id = checkpoints.fingerprint(
        model_params, prompt_params, trains, resolution, world, list(rows["sha256"]), weights
    )
    ckpt_dir = out_dir / "checkpoints"
    step, micro, history = 0, 0, []
    ckpt = checkpoints.latest(ckpt_dir, run_id) if params["resume"] else None
    if ckpt is not None:
        state = checkpoints.load(ckpt, unet, optimizer, accelerator)
        step, micro, history = state["step"], state["micro"], state["history"]
        log.info("resumed from %s (step %d of %d)", ckpt.name, step, total)
    elif ckpt_dir.exists() and accelerator.is_main_process:
        shutil.rmtree(ckpt_dir)  # checkpoints of other settings (or resume: false) would only mislead

    watch = validation.Watch(accelerator, pipe, prompt_params, params, resolution, out_dir, step)
    bar = tqdm(
        total=total, initial=step, desc="finetune", unit="step", disable=not accelerator.is_main_process
    )
    unet.train()
    epoch, seen = 0, 0  # `seen` counts micro-batches over epochs, to skip those done before a resume
    while step < total:
        for batch in epoch_batches(len(paths), params["batch_size"], seed, epoch, rank, world):
            if seen < micro:
                seen += 1
                continue
            g = micro_generator(seed, seen, rank, device)
            idx = torch.tensor(batch)
            cached = moments[idx].to(device) if moments is not None else None
            pixels = (
                None if cached is not None else load_images([paths[i] for i in batch], resolution).to(device)
            )
            caption = caption_of[idx].to(device)
            with accelerator.accumulate(unet):
                loss, loss_dm, loss_exp = losses_for_batch(
                    unet,
                    vae,
                    encoder,
                    noise_scheduler,
                    pixels,
                    prompt_embeds[caption],
                    pooled_embeds[caption],
                    real_embeds[idx.to(device)] if alpha > 0 else None,
                    alpha,
                    resolution,
                    g,
                    cached,
                    params["exp_decode"],
                    params["exp_crop"],
                )
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            seen += 1
            micro = seen
            if not accelerator.sync_gradients:
                continue
            step += 1
            losses = torch.stack([loss.detach(), loss_dm.detach(), loss_exp.detach()])
            losses = accelerator.reduce(losses, reduction="mean").tolist()
            history.append(
                {"step": step, "epoch": epoch, "loss": losses[0], "loss_dm": losses[1], "loss_exp": losses[2]}
            )
            watch.after_step(step, total, dict(zip(("loss", "loss_dm", "loss_exp"), losses, strict=True)))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[0]:.4f}")
            if params["checkpoint_every"] and step % params["checkpoint_every"] == 0 and step < total:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    state = {"step": step, "micro": micro, "history": history, "run_id": run_id}
                    checkpoints.save(
                        ckpt_dir, unet, optimizer, accelerator, state, params["checkpoints_total_limit"]
                    )
                    watch.flush()
            if step >= total:
                break
        epoch += 1
    bar.close()

    accelerator.wait_for_everyone()
    history = pd.DataFrame(history, columns=["step", "epoch", "loss", "loss_dm", "loss_exp"])
    if accelerator.is_main_process:
        about = {"model_params": model_params, "prompt_params": prompt_params, "params": params}
        unet_ = accelerator.unwrap_model(unet)
        write_outputs(unet_, history, step, len(paths), world, out_dir, about, resolution)
    accelerator.end_training()
    return history


def training_models(model_params: dict, prompt_params: dict, params: dict, device) -> tuple:
    """SDXL and E_exp from the factory, on `device`; only the LoRA layers (rank `params["rank"]`) train.
    Seeded first, so the LoRA's initial weights are the run's."""
    torch.manual_seed(params["seed"])
    pipe = models.sdxl_from_params(model_params, prompt_params)
    unet, vae = pipe.unet, pipe.vae
    prepare_for_training(pipe, params["rank"])
    for module in (unet, vae, pipe.text_encoder, pipe.text_encoder_2):
        module.to(device)
    if vae.dtype != torch.float32:
        vae.to(dtype=torch.float32)  # SDXL's VAE overflows in fp16: encode and decode in fp32
    cast_training_params(unet, dtype=torch.float32)  # trainable LoRA weights stay fp32 under fp16
    if params["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()  # the x̂_0 decode is backpropagated through
    encoder = models.expression_encoder(
        model_params["expression"], model_params["seed"], model_params["expression_channels"]
    ).to(device)
    return pipe, encoder


def training_data(pipe, encoder, prompt_params: dict, prepare_dir: Path, resolution: int, params, device):
    """The fine-tuning split, each row's caption index, the captions embedded once per class, and (alpha >
    0) the real images' expression embeddings E_exp(x_0) (of the view `exp_decode` compares), once per
    image: both are fixed in training."""
    rows = read_split(prepare_dir, "finetune")
    if rows.empty:
        raise ParamsError(f"no fine-tuning images in {prepare_dir}; check prepare.*.finetune_per_class")
    expressions = sorted(rows["expression"].unique())
    caption_of = torch.tensor([expressions.index(e) for e in rows["expression"]])
    paths = list(rows["path"])
    with torch.no_grad():
        prompt_embeds, _, pooled_embeds, _ = pipe.encode_prompt(
            [prompts.caption(prompt_params, e) for e in expressions],
            device=device,
            do_classifier_free_guidance=False,
        )
        real_embeds = None
        if params["alpha"] > 0:  # computed in batches
            chunks = [paths[i : i + 16] for i in range(0, len(paths), 16)]
            view = {
                "factor": vae_factor(pipe.vae),
                "exp_decode": params["exp_decode"],
                "exp_crop": params["exp_crop"],
            }
            real_embeds = torch.cat(
                [encoder.embed(real_view(load_images(c, resolution).to(device), **view)) for c in chunks]
            )
    return rows, caption_of, prompt_embeds, pooled_embeds, real_embeds


def cached_moments(vae, paths: list[str], resolution: int, device, batch: int = 16) -> torch.Tensor:
    """kohya's `cache_latents`: each training image's latent distribution (mean and log-variance, as the
    VAE encoder returns them) computed once, kept on the CPU, instead of one VAE encode per step."""
    with torch.no_grad():
        chunks = [paths[i : i + batch] for i in range(0, len(paths), batch)]
        return torch.cat(
            [
                vae.encode(load_images(c, resolution).to(device).float()).latent_dist.parameters.cpu()
                for c in chunks
            ]
        )


def write_outputs(
    unet, history: pd.DataFrame, step: int, images: int, world: int, out_dir: Path, about: dict, resolution
) -> None:
    """lora/ (diffusers' file, the same LoRA in kohya's layout, a model card), loss.csv and metrics.json.
    `about`: the model, prompt and finetune parameter blocks the card describes."""
    lora_file = save_lora(unet, out_dir / "lora")
    write_csv(out_dir / "loss.csv", history)
    last = history[history["epoch"] == history["epoch"].max()]
    metrics = {
        "steps": int(step),
        "images": images,
        "processes": world,
        "final_loss": float(history["loss"].iloc[-1]),
        "mean_loss_last_epoch": float(last["loss"].mean()),
        "mean_loss_dm_last_epoch": float(last["loss_dm"].mean()),
        "mean_loss_exp_last_epoch": float(last["loss_exp"].mean()),
        "lora_sha256": sha256_file(lora_file),
    }
    lora_export.write(**about, metrics=metrics, resolution=resolution, lora_file=lora_file)
    write_json(out_dir / "metrics.json", metrics)


# ------------------------------------------------------------------ entry points


def stage_params(profile: str | None, params_file: Path | None = None) -> dict:
    """The parameter blocks the stage reads (the file is read once)."""
    b = config.blocks("models", "prompts", "finetune", "prepare", profile=profile, path=params_file)
    return {
        "model_params": b["models"],
        "prompt_params": b["prompts"],
        "params": b["finetune"],
        "resolution": b["prepare"]["resolution"],
    }


def run(
    profile: str | None, prepare_dir: Path, out_dir: Path, params_file: Path | None = None
) -> pd.DataFrame:
    """Run the stage: in this process, or under `accelerate launch` when num_processes > 1."""
    p = stage_params(profile, params_file)
    paths = {"prepare_dir": prepare_dir, "out_dir": out_dir}
    if parallel.run_here(p["params"]["num_processes"]):
        return finetune(**p, **paths)
    parallel.launch_stage(
        "geneava.stages.finetune",
        p["params"]["num_processes"],
        profile,
        params_file,
        paths,
        p["params"]["mixed_precision"],
    )
    return pd.read_csv(Path(out_dir) / "loss.csv")


def _one_process(profile, prepare_dir, out_dir, params_file=None):
    return finetune(**stage_params(profile, params_file), prepare_dir=prepare_dir, out_dir=out_dir)


def main(argv: list[str] | None = None) -> int:
    return cli.stage_main(run, argv, __doc__, _one_process)


def plot_loss(history: pd.DataFrame, save_to: Path | None = None):
    """Total, diffusion and expression loss per step, with moving averages (seaborn)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    cols = [c for c in ("loss", "loss_dm", "loss_exp") if c in history and history[c].abs().sum() > 0]
    fig, axes = plt.subplots(1, len(cols), figsize=(4 * len(cols), 3), squeeze=False)
    window = max(1, len(history) // 10)
    for ax, col in zip(axes[0], cols, strict=True):
        sns.lineplot(data=history, x="step", y=col, ax=ax, alpha=0.35)
        ax.plot(
            history["step"], history[col].rolling(window, min_periods=1).mean(), label=f"mean of {window}"
        )
        ax.set(title={"loss": "L", "loss_dm": "L_dm", "loss_exp": "L_exp"}[col], xlabel="step", ylabel="")
        ax.legend()
    fig.tight_layout()
    if save_to:
        fig.savefig(save_to, dpi=120)
    return fig


if __name__ == "__main__":
    raise SystemExit(main())
