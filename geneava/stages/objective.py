"""The paper's training objective for one batch: L = L_dm + alpha * L_exp (finetune runs it every step).

L_exp compares POSTER's expression embeddings of the real image x_0 and of the one-step reconstruction
x̂_0 = D(ẑ_0). `exp_decode` says how much of ẑ_0 the VAE decodes for it (finetune.<profile>.exp_decode):

- `full` (the paper): all of ẑ_0, at the training resolution.
- `half`: ẑ_0 average-pooled 2x, so a quarter of the decode (POSTER resizes to 224 px anyway, so at
  1024 px it sees the same number of pixels); the real image is embedded whole, as for `full`.
- `crop`: the central `exp_crop` share of ẑ_0 on each side, where prepare's framing puts the face (the
  paper profile's crops centre the face box at 1/(1 + 2 * 0.35) of the side; the world draws faces in the
  central ~70%), and the real image's same pixels.

docs/stages/finetune.md gives what each choice costs and does (benchmarks/exp_decode.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from geneava.core.schema import EXP_DECODES


def time_ids(resolution: int, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's micro-conditioning: (original h, w, crop top, left, target h, w); images are uncropped."""
    ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=device, dtype=dtype)
    return ids.repeat(batch, 1)


def predict_z0(
    z_t: torch.Tensor, eps: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """One-step estimate of the clean latent (paper): ẑ_0 = (z_t − √(1−ᾱ_t)·ε_θ) / √ᾱ_t."""
    a = alphas_cumprod.to(z_t.device)[t].float().view(-1, 1, 1, 1)
    return (z_t.float() - (1 - a).sqrt() * eps.float()) / a.sqrt()


def centre_window(n: int, share: float) -> tuple[int, int]:
    """(start, length) of the central `share` of `n` cells, at least one cell."""
    length = max(1, min(n, round(n * share)))
    return (n - length) // 2, length


def vae_factor(vae) -> int:
    """Pixels per latent cell on a side (8 for SDXL's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def decoded_view(vae, z0: torch.Tensor, exp_decode: str = "full", exp_crop: float = 0.75) -> torch.Tensor:
    """x̂_0 as L_exp sees it: the decode of all of ẑ_0 (unscaled latents), of its 2x pooling, or of its
    central window."""
    if exp_decode == "half":
        z0 = F.avg_pool2d(z0, 2)
    elif exp_decode == "crop":
        (top, h), (left, w) = (centre_window(n, exp_crop) for n in z0.shape[-2:])
        z0 = z0[..., top : top + h, left : left + w]
    elif exp_decode != "full":
        raise ValueError(f"exp_decode '{exp_decode}' is not one of {', '.join(EXP_DECODES)}")
    return vae.decode(z0 / vae.config.scaling_factor).sample


def real_view(pixels: torch.Tensor, factor: int, exp_decode: str = "full", exp_crop: float = 0.75):
    """The real images as L_exp compares them with `decoded_view`: for `crop`, the pixels of the same
    latent window (`factor`: `vae_factor`), else whole."""
    if exp_decode != "crop":
        return pixels
    (top, h), (left, w) = (centre_window(n // factor, exp_crop) for n in pixels.shape[-2:])
    return pixels[..., top * factor : (top + h) * factor, left * factor : (left + w) * factor]


def key_settings(params: dict) -> dict:
    """`params` without the objective's settings that cannot change the weights: `exp_crop` unless
    `exp_decode` is crop, and `exp_decode` at `full` (the paper's loss, as before the option existed, so
    checkpoints made then still resume)."""
    out = dict(params)
    if out.get("exp_decode") != "crop":
        out.pop("exp_crop", None)
    if out.get("exp_decode") == "full":
        out.pop("exp_decode")
    return out


def losses_for_batch(
    unet,
    vae,
    encoder,
    noise_scheduler,
    pixels,
    prompt_embeds,
    pooled_embeds,
    real_embeds,
    alpha: float,
    resolution: int,
    g: torch.Generator,
    moments: torch.Tensor | None = None,
    exp_decode: str = "full",
    exp_crop: float = 0.75,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L, L_dm, L_exp) for one batch of images in [-1, 1]; all randomness drawn from `g`. With `moments`
    (the images' cached latent distributions, `cache_latents`), `pixels` may be None: the latent is drawn
    from the cached mean and variance with the same draw from `g` the VAE encode would have made.
    `real_embeds`: E_exp of `real_view` of the batch's real images."""
    device = prompt_embeds.device
    with torch.no_grad():
        dist = (
            DiagonalGaussianDistribution(moments)
            if moments is not None
            else vae.encode(pixels.float()).latent_dist
        )
        latents = dist.sample(generator=g)
        latents = (latents * vae.config.scaling_factor).to(prompt_embeds.dtype)
    noise = torch.randn(latents.shape, generator=g, device=device, dtype=latents.dtype)
    t = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=g, device=device
    )
    # z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε
    z_t = noise_scheduler.add_noise(latents, noise, t)
    eps = unet(
        z_t,
        t,
        encoder_hidden_states=prompt_embeds,
        added_cond_kwargs={
            "text_embeds": pooled_embeds,
            "time_ids": time_ids(resolution, len(latents), device, prompt_embeds.dtype),
        },
    ).sample
    # L_dm = ‖ε − ε_θ(z_t, t, τ(p))‖²
    loss_dm = F.mse_loss(eps.float(), noise.float())
    loss_exp = torch.zeros((), device=device)
    if alpha > 0:
        # x̂_0 = D((z_t − √(1−ᾱ_t)·ε_θ) / √ᾱ_t) and L_exp = MSE(E_exp(x_0), E_exp(x̂_0)); the decode
        # runs in fp32 even under mixed precision, and the gradient flows through D and E_exp to ε_θ.
        with torch.autocast(device.type, enabled=False):
            z0 = predict_z0(z_t, eps, noise_scheduler.alphas_cumprod, t)
            x0_hat = decoded_view(vae, z0, exp_decode, exp_crop)
            loss_exp = F.mse_loss(encoder.embed(x0_hat), real_embeds)
    return loss_dm + alpha * loss_exp, loss_dm, loss_exp
