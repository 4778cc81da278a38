"""The world's training loops: a warm-up/cosine learning rate, the shared step loop with its progress
bar, and one loop per kind of model (VAE, base UNet + text encoders, classifiers, RetinaFace)."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from geneava.networks import models, retinaface
from geneava.networks.identity import arcface_logits
from geneava.world.samples import (
    as_float,
    augment,
)

log = logging.getLogger(__name__)


def _lr(step: int, total: int, lr: float, warmup: int = 50) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def _loop(params, steps: int, lr: float, step_fn, desc: str) -> list[float]:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    bar = tqdm(range(steps), desc=desc, unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        loss = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.4f}")
    return losses


def train_vae(vae, pool: torch.Tensor, p: dict, seed: int) -> tuple[list[float], float]:
    """Reconstruction (L1 + MSE) with a small KL weight; returns losses and the latent scaling factor."""
    g = torch.Generator().manual_seed(seed)
    vae.train()

    def step(_):
        idx = torch.randint(len(pool), (p["batch_size"],), generator=g)
        x = as_float(pool[idx])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        return F.l1_loss(rec, x) + F.mse_loss(rec, x) + p["vae_kl"] * post.kl().mean()

    losses = _loop(list(vae.parameters()), p["vae_steps"], p["lr"], step, "world vae")
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(as_float(c)).latent_dist.mean for c in pool[:512].split(64)])
    return losses, float(1 / z.std())


def train_base(pipe, latents: torch.Tensor, logvar: torch.Tensor, texts: list[str], p: dict, seed: int):
    """UNet and both text encoders from scratch, with SDXL's ε-prediction loss and DDPM schedule."""
    g = torch.Generator().manual_seed(seed)
    unet, te1, te2 = pipe.unet, pipe.text_encoder, pipe.text_encoder_2
    scheduler = models.training_scheduler(pipe)
    scale = pipe.vae.config.scaling_factor
    size = p["size"]
    tok = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids  # fmt: skip
    for m in (unet, te1, te2):
        m.train()

    def embed(ids):
        # SDXL: penultimate hidden states of both encoders, concatenated; pooled from the second
        o1 = te1(ids, output_hidden_states=True)
        o2 = te2(ids, output_hidden_states=True)
        return torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], -1), o2.text_embeds

    def step(_):
        idx = torch.randint(len(latents), (p["batch_size"],), generator=g)
        mean, std = latents[idx], (0.5 * logvar[idx]).exp()
        z0 = (mean + std * torch.randn(mean.shape, generator=g)) * scale
        hidden, pooled = embed(tok[idx])
        keep = (torch.rand(len(idx), generator=g) >= p["caption_dropout"]).float()
        hidden, pooled = hidden * keep[:, None, None], pooled * keep[:, None]
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=g)
        zt = scheduler.add_noise(z0, noise, t)
        tid = torch.tensor([size, size, 0, 0, size, size], dtype=torch.float32).repeat(len(idx), 1)
        eps = unet(
            zt, t, encoder_hidden_states=hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": tid}
        ).sample
        return F.mse_loss(eps, noise)

    params = [q for m in (unet, te1, te2) for q in m.parameters()]
    losses = _loop(params, p["base_steps"], p["lr"], step, "world base model")
    for m in (unet, te1, te2):
        m.eval()
    return losses


def train_classifier(model, forward, pool, labels, steps, p, seed, desc, arcface=None):
    """Cross-entropy (or ArcFace margin) training on augmented renders; returns the losses."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(labels)
    params = [q for q in model.parameters() if q.requires_grad]
    if arcface is not None:
        params.append(arcface)
    model.train()

    def step(_):
        idx = torch.randint(len(pool), (p["batch_size"],), generator=g)
        x = augment(as_float(pool[idx]), g)
        out = forward(x)
        if arcface is not None:
            out = arcface_logits(out, arcface, labels[idx], p["arcface_scale"], p["arcface_margin"])
        return F.cross_entropy(out, labels[idx])

    losses = _loop(params, steps, p["lr"], step, desc)
    model.eval()
    return losses


@torch.no_grad()
def through_vae(pool: torch.Tensor, vae) -> torch.Tensor:
    """uint8 images after the VAE's encode/decode: what every generated image goes through."""
    out = [
        (vae.decode(vae.encode(as_float(c)).latent_dist.mean).sample + 1) * 127.5
        for c in tqdm(pool.split(64), desc="through the VAE", unit="batch", leave=False)
    ]
    return torch.cat(out).round().clamp(0, 255).to(torch.uint8)


def train_detector(model, pool, boxes, points, p: dict, seed: int) -> list[float]:
    """RetinaFace's loss on the detection pool, at the pool's size (the world's images are all one
    size; face sizes vary within it); brightness and contrast vary per image."""
    g = torch.Generator().manual_seed(seed)
    h, w = pool.shape[-2:]
    anchors, unit = retinaface.priors(h, w), torch.tensor([w, h], dtype=torch.float32)
    labels, loc, landm = (
        torch.stack(t)
        for t in zip(
            *(
                retinaface.targets(b / unit.repeat(2), q / unit, anchors)
                for b, q in zip(boxes, points, strict=True)
            ),
            strict=True,
        )
    )
    model.train()

    def step(_):
        idx = torch.randint(len(pool), (p["batch_size"],), generator=g)
        x = pool[idx].float() / 255
        gain = 0.8 + 0.4 * torch.rand(len(idx), 1, 1, 1, generator=g)
        x = ((x - 0.5) * gain + 0.5 + 0.1 * (torch.rand(len(idx), 1, 1, 1, generator=g) - 0.5)).clamp(0, 1)
        out = model(retinaface.to_input(x))
        return retinaface.loss(out, labels[idx], loc[idx], landm[idx])["total"]

    losses = _loop(list(model.parameters()), p["detector_steps"], p["lr"], step, "world RetinaFace")
    model.eval()
    return losses
