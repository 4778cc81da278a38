"""One real fine-tuning step of SDXL's full-size architecture on the CPU (opt-in; not CI).

SDXL base 1.0's UNet (random weights, bf16) and VAE (fp32) from their published configurations
(benchmarks/sdxl-base-1.0/), POSTER at full size (random, fp32), LoRA rank 4 by the project's
`finetune.add_lora`, gradient checkpointing of UNet and VAE as the paper profile sets it; then the
project's own `objective.losses_for_batch` with the expression loss (alpha 1) at a reduced resolution, and
its backward. It shows the paper profile's code path runs at SDXL's real size end to end; the numbers it
prints are wall time and peak RSS on this machine, not a GPU projection (see sdxl_simulated.py for that).

Run: .venv/bin/python benchmarks/sdxl_cpu_step.py [resolution, default 256]   (needs ~12 GB of RAM)
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sdxl_simulated import config as _config  # noqa: E402  (the one reader of the published configs)


def main(px: int = 256) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from geneava.networks import poster
    from geneava.stages.finetune import add_lora
    from geneava.stages.objective import losses_for_batch

    torch.manual_seed(0)
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)  # build the 2.6 B-parameter UNet in bf16 directly
    unet = UNet2DConditionModel.from_config(_config("unet"))
    torch.set_default_dtype(torch.float32)
    params = add_lora(unet, 4)
    for p in params:
        p.data = p.data.float()  # LoRA trains in fp32, as under mixed precision
    vae = AutoencoderKL.from_config(_config("vae")).requires_grad_(False)
    encoder = poster.Poster(poster.PosterConfig(num_classes=7), channels="bgr").requires_grad_(False).eval()
    unet.enable_gradient_checkpointing()
    vae.enable_gradient_checkpointing()
    unet.train()
    scheduler = DDPMScheduler.from_config(_config("scheduler"))
    built = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, px, px) * 2 - 1
    prompt = torch.randn(1, 77, 2048, dtype=torch.bfloat16)
    pooled = torch.randn(1, 1280, dtype=torch.bfloat16)
    real = torch.randn(1, 512)
    t1 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, loss_dm, loss_exp = losses_for_batch(
            unet, vae, encoder, scheduler, pixels, prompt, pooled, real, 1.0, px, g
        )
    loss.backward()
    step = time.perf_counter() - t1
    loss_dm, loss_exp = loss_dm.detach(), loss_exp.detach()
    grads = sum(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in params)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GiB
    print(f"SDXL full-size fine-tuning step on CPU, {px} px, bf16 UNet, alpha 1, checkpointing on")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"build {built:.0f} s, step (forward + backward) {step:.0f} s, peak RSS {rss:.1f} GiB")
    losses = f"L_dm {loss_dm.item():.4f}, L_exp {loss_exp.item():.4f}"
    print(f"{losses}; {grads}/{len(params)} LoRA tensors got finite gradients")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 256)
