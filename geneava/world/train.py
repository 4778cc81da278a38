"""The default profile's miniature world: its base text-to-image model and its two face encoders.

The paper starts from SDXL base 1.0, a general model that draws faces and coarse expressions but not
135 fine-grained ones, and measures with POSTER (expressions) and ArcFace (identities). Offline, on a
CPU, the default profile plays the same story in the procedural world of `standin`:

- `vae` + `base`: an SDXL-architecture pipeline at toy width (`models.WORLD_SDXL`: two text encoders,
  pooled projection, text_time conditioning), pre-trained from scratch on world faces captioned with
  the paper's prompt template, every face drawn with only its primary's *coarse* expression
  (`standin.coarse_expression`). With `base_captions: class` (the default) the caption names one of the
  primary's 135 fine words, so, like SDXL, the model knows that "delight" is a kind of joy and draws
  the joyful face, but cannot draw delight apart from gaiety; with `primary` it has only seen the six
  primary words. 10% of captions are dropped (zero embeddings, SDXL's `force_zeros_for_empty_prompt`)
  so classifier-free guidance works.
- `expression`: POSTER's architecture (`PosterConfig.tiny`) trained to tell the 135 fine-grained
  classes apart on fresh world faces; its feature before the head is E_exp, as in the paper.
- `identity`: an ArcFace-style network (IR blocks, 128-d embedding, additive angular margin loss)
  trained on world identities across expressions, so cosine similarity means "same person" there.

Each phase trains from seeded, freshly rendered data (identities disjoint from the stand-in Emo135),
writes its weights atomically as safetensors, and records a fingerprint of its settings in
`run.json`: a rerun skips finished phases with unchanged settings, so a killed run resumes phase by
phase. The `world` DVC stage runs this once; its outputs are committed, so `dvc repro` reuses them.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn
from tqdm.auto import tqdm

from geneava.core import checkpoints, config, emo135, io, prompts
from geneava.core.io import atomic_write_text, write_json
from geneava.networks import models, poster, retinaface
from geneava.networks.identity import WorldArcFace, arcface_logits
from geneava.world import standin

log = logging.getLogger(__name__)

PHASES = ("vae", "base", "expression", "identity", "detector")
SDXL_DIR, POSTER_FILE, IDENTITY_FILE = "sdxl", "poster.safetensors", "identity.safetensors"
DETECTOR_FILE = "retinaface.safetensors"


# ------------------------------------------------------------------ data


def _to_tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()


def render_pool(attrs: list[dict], size: int, desc: str) -> torch.Tensor:
    """uint8 (n, 3, size, size) renders of `attrs`."""
    return _to_tensor(
        [standin.render_face(a, size) for a in tqdm(attrs, desc=desc, unit="face", leave=False)]
    )


def as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1


def augment(x: torch.Tensor, g: torch.Generator, min_scale: float = 0.65) -> torch.Tensor:
    """Random square crops (side `min_scale`..1 of the frame, anywhere inside it) resized back: the
    encoders meet full frames (generated images) and face crops (prepare's) alike."""
    from torchvision.ops import roi_align

    n, _, h, w = x.shape
    side = (min_scale + (1 - min_scale) * torch.rand(n, generator=g)) * w
    x0 = torch.rand(n, generator=g) * (w - side)
    y0 = torch.rand(n, generator=g) * (h - side)
    boxes = torch.stack([torch.arange(n).float(), x0, y0, x0 + side, y0 + side], 1)
    return roi_align(x, boxes, output_size=(h, w), aligned=True)


def base_samples(
    n: int, seed: int, prompt_params: dict, captions: str = "class", caption_share: float = 0.2
) -> list[dict]:
    """Pre-training images of the base model: random people with a *coarse* expression, captioned with
    the paper's template (or, for `caption_share` of them, the Emo135 caption form). The caption's
    expression word is the primary itself (`captions="primary"`) or one of its fine classes drawn at
    random (`"class"`), from a stream of its own: the images are the same either way."""
    if captions not in ("class", "primary"):
        raise config.ParamsError(f"world.base_captions must be class or primary, not {captions!r}")
    races = list(prompt_params["races"])
    if sorted(races) != sorted(standin.RACES):
        raise config.ParamsError(
            f"prompts.races {races} are not the world's groups {list(standin.RACES)}: the default world "
            "renders only those"
        )
    if len(prompt_params["ages"]) != standin.AGE_GROUPS:
        raise config.ParamsError(
            f"the world has {standin.AGE_GROUPS} age groups; prompts.ages lists another number"
        )
    rng, words = np.random.default_rng([23, seed]), np.random.default_rng([37, seed])
    primaries = list(standin.PRIMARY_BASE)
    family = {p: [c.name for c in emo135.classes() if c.primary == p] for p in primaries}
    out = []
    for _ in range(n):
        person = standin.sample_identity(rng)
        primary = primaries[int(rng.integers(len(primaries)))]
        expr = standin.coarse_expression(primary) + rng.normal(
            0, standin.IMAGE_JITTER, len(standin.EXPRESSION_FIELDS)
        )
        word = primary if captions == "primary" else str(words.choice(family[primary]))
        age = prompt_params["ages"][person["age_group"]]
        if rng.random() < caption_share:
            text = prompts.caption(prompt_params, word)
        else:
            text = prompt_params["template"].format(
                article="an" if age[0].lower() in "aeiou" else "a",
                age=age,
                race=person["race"],
                person=prompt_params["genders"][person["gender"]],
                expression=word,
            )
        out.append(
            {
                **person,
                **standin._expression_dict(standin._clip_expression(expr)),
                "primary": primary,
                "prompt": text,
            }
        )
    return out


def class_samples(n_per_class: int, seed: int) -> tuple[list[dict], np.ndarray]:
    """Fresh faces of every fine-grained class (new people, not the stand-in Emo135's)."""
    attrs, labels = [], []
    for c in emo135.classes():
        for i in range(n_per_class):
            attrs.append(standin.sample_attributes(c, 1_000_000 * (seed + 1) + i))
            labels.append(c.index)
    return attrs, np.array(labels)


def identity_samples(people: int, views: int, seed: int) -> tuple[list[dict], np.ndarray]:
    """`views` renders of each of `people` people, each view with another class's expression."""
    rng = np.random.default_rng([29, seed])
    classes = emo135.classes()
    attrs, labels = [], []
    for p in range(people):
        person = standin.sample_identity(rng)
        for _ in range(views):
            c = classes[int(rng.integers(len(classes)))]
            expr = standin.class_expression(c) + rng.normal(
                0, standin.IMAGE_JITTER, len(standin.EXPRESSION_FIELDS)
            )
            attrs.append({**person, **standin._expression_dict(standin._clip_expression(expr))})
            labels.append(p)
    return attrs, np.array(labels)


def detection_samples(
    n: int, seed: int, size: int, scenes: float = 0.0
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Face-detection data: `size`-px canvases with no face (10%; a share `scenes` of them a scene with
    trees and buildings, `standin.render_scene`, the rest a blank wall), one (75%: 0.55-1.35 of the
    frame, off centre, so some are cut by the frame as a too-close face is) or two side by side (15%), of
    new people under any class's expression, slightly blurred. Returns uint8 images and per image
    the faces' boxes (k, 4) and landmarks (k, 5, 2) in pixels (`standin.landmarks`)."""
    rng = np.random.default_rng([41, seed])
    classes = emo135.classes()
    images, boxes, points = [], [], []
    for _ in tqdm(range(n), desc="render detector pool", unit="image", leave=False):
        canvas = Image.new("RGB", (size, size), standin.BACKGROUND)
        count = int(rng.choice(3, p=(0.1, 0.75, 0.15)))
        if count == 0 and scenes and rng.random() < scenes:
            canvas = standin.render_scene(int(rng.integers(2**31)), size)
        b, p = [], []
        for j in range(count):
            c = classes[int(rng.integers(len(classes)))]
            expr = standin.class_expression(c) + rng.normal(
                0, standin.IMAGE_JITTER, len(standin.EXPRESSION_FIELDS)
            )
            a = {**standin.sample_identity(rng), **standin._expression_dict(standin._clip_expression(expr))}
            if count == 1:
                side = round(size * rng.uniform(0.55, 1.35))
                x, y = ((size - side) / 2 + rng.uniform(-0.2, 0.2, 2) * size).round().astype(int)
            else:
                side = round(size * rng.uniform(0.38, 0.5))
                x = round(j * size / 2 + (size / 2 - side) * rng.uniform(0, 1))
                y = round((size - side) * rng.uniform(0.1, 0.9))
            canvas.paste(standin.render_face(a, side), (int(x), int(y)))
            box, pts = standin.landmarks(a)
            b.append([x + box[0] * side, y + box[1] * side, x + box[2] * side, y + box[3] * side])
            p.append([[x + u * side, y + v * side] for u, v in pts])
        canvas = canvas.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.0))))
        images.append(canvas)
        boxes.append(torch.tensor(b, dtype=torch.float32).reshape(-1, 4))
        points.append(torch.tensor(p, dtype=torch.float32).reshape(-1, 5, 2))
    return _to_tensor(images), boxes, points


# ------------------------------------------------------------------ training loops


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


# ------------------------------------------------------------------ checks on held-out renders


@torch.no_grad()
def check_vae(vae, pool: torch.Tensor) -> dict:
    x = as_float(pool)
    rec = torch.cat([vae.decode(vae.encode(c).latent_dist.mean).sample for c in x.split(64)]).clamp(-1, 1)
    mse = F.mse_loss((rec + 1) / 2, (x + 1) / 2).item()
    return {"heldout_psnr_db": round(10 * math.log10(1 / mse), 2), "images": len(x)}


@torch.no_grad()
def check_expression(model, pool: torch.Tensor, labels: np.ndarray) -> dict:
    logits = torch.cat([model.classify(as_float(c))[0] for c in pool.split(64)])
    pred = logits.argmax(1).numpy()
    primary = np.array([c.primary for c in emo135.classes()])
    return {
        "heldout_accuracy": round(float((pred == labels).mean()), 4),
        "heldout_primary_accuracy": round(float((primary[pred] == primary[labels]).mean()), 4),
        "chance": round(1 / 135, 4),
        "images": len(labels),
    }


@torch.no_grad()
def check_identity(net, pool: torch.Tensor, labels: np.ndarray, threshold: float) -> dict:
    """Verification on held-out people: all same-person pairs vs as many different-person pairs."""
    emb = F.normalize(torch.cat([net(as_float(c)) for c in pool.split(64)]))
    sim = emb @ emb.T
    same = torch.as_tensor(labels[:, None] == labels[None, :])
    upper = torch.triu(torch.ones_like(same), 1)
    pos, neg = sim[same & upper], sim[~same & upper]
    neg = neg[torch.randperm(len(neg), generator=torch.Generator().manual_seed(0))[: len(pos)]]
    return {
        "same_mean_cosine": round(float(pos.mean()), 4),
        "different_mean_cosine": round(float(neg.mean()), 4),
        "threshold": threshold,
        "true_accept_rate": round(float((pos > threshold).float().mean()), 4),
        "false_accept_rate": round(float((neg > threshold).float().mean()), 4),
        "people": int(len(np.unique(labels))),
    }


@torch.no_grad()
def check_detector(model, pool: torch.Tensor, boxes: list[torch.Tensor], points: list[torch.Tensor]) -> dict:
    """Held-out canvases: faces found at IoU >= 0.5, false detections, images with the right count of
    faces (what QC's one-face rule needs) and landmark error relative to the box width."""
    from torchvision.ops import box_iou

    found = false = right = 0
    errors = []
    for img, b, pts in zip(pool, boxes, points, strict=True):
        dets = retinaface.detect(model, img.permute(1, 2, 0).numpy())
        right += len(dets) == len(b)
        if not dets:
            continue
        pred = torch.tensor([d[0] for d in dets])
        iou = box_iou(b, pred) if len(b) else torch.zeros(0, len(pred))
        hit = iou.max(1).values >= 0.5 if len(b) else torch.zeros(0, dtype=torch.bool)
        found += int(hit.sum())
        false += int(len(pred) - (iou.max(0).values >= 0.5).sum()) if len(b) else len(pred)
        for k in torch.nonzero(hit).flatten().tolist():
            j = int(iou[k].argmax())
            err = (torch.tensor(dets[j][2]) - pts[k]).norm(dim=1).mean() / (b[k, 2] - b[k, 0])
            errors.append(float(err))
    faces = sum(len(b) for b in boxes)
    return {
        "heldout_recall": round(found / max(1, faces), 4),
        "false_detections": false,
        "right_count_share": round(right / len(pool), 4),
        "landmark_error_of_box_width": round(float(np.mean(errors)) if errors else float("nan"), 4),
        "images": len(pool),
        "faces": faces,
    }


# ------------------------------------------------------------------ the stage


def _save_atomic(path: Path, save) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    save(tmp)
    io.normal_tree(tmp)  # safetensors writes 0600
    if path.is_dir():
        shutil.rmtree(path)
    tmp.replace(path)


def _trained_vae(out_dir: Path):
    """The VAE phase's model: in vae/ until the base phase folds it into sdxl/vae."""
    from diffusers import AutoencoderKL

    own = Path(out_dir) / "vae"
    return AutoencoderKL.from_pretrained(own if own.is_dir() else Path(out_dir) / SDXL_DIR / "vae").eval()


def phase_keys(params: dict, prompt_params: dict) -> dict[str, str]:
    """Each phase's fingerprint, of the settings it reads: changing one phase's settings retrains only it
    (and a new VAE or new prompts mean a new base model)."""
    common = {k: params[k] for k in ("seed", "size", "batch_size", "lr")}
    own = {
        "vae": ("pool", "vae_steps", "vae_kl"),
        "base": ("pool", "base_steps", "caption_dropout", "base_captions"),
        "expression": ("expression_per_class", "expression_steps"),
        "identity": (
            "identity_people",
            "identity_views",
            "identity_steps",
            "arcface_scale",
            "arcface_margin",
        ),
        "detector": ("detector_pool", "detector_steps", "detector_scenes"),
    }
    keys = {ph: checkpoints.fingerprint(ph, common, {k: params[k] for k in own[ph]}) for ph in PHASES}
    keys["base"] = checkpoints.fingerprint(keys["base"], prompt_params)
    keys["base"] = checkpoints.fingerprint(keys["base"], keys["vae"])  # a new VAE means a new base model
    keys["detector"] = checkpoints.fingerprint(keys["detector"], keys["vae"])  # trained through the VAE
    return keys


def pretrain(params: dict, prompt_params: dict, out_dir: Path, phases: tuple[str, ...] = PHASES) -> dict:
    """Train the world's models into `out_dir` (sdxl/, poster.safetensors, identity.safetensors, report.json).

    Finished phases with unchanged settings are skipped (`run.json`), so a killed run resumes."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run_file, report_file = out_dir / "run.json", out_dir / "report.json"
    done = json.loads(run_file.read_text()) if run_file.is_file() else {}
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    seed, size = params["seed"], params["size"]
    corpus = prompts.vocabulary(prompt_params)
    keys = phase_keys(params, prompt_params)

    def finished(phase: str) -> bool:
        return done.get(phase) == keys[phase] and phase in report

    def mark(phase: str, result: dict) -> None:
        done[phase] = keys[phase]
        report[phase] = result
        write_json(report_file, report)
        write_json(run_file, done)

    sdxl_dir = out_dir / SDXL_DIR
    if "vae" in phases and not finished("vae"):
        pipe = models.tiny_sdxl(seed, corpus, models.WORLD_SDXL)
        attrs = base_samples(params["pool"], seed, prompt_params)
        pool = render_pool(attrs, size, "render vae pool")
        losses, scaling = train_vae(pipe.vae, pool, params, seed)
        pipe.vae.register_to_config(scaling_factor=scaling)
        held = render_pool(base_samples(256, seed + 1, prompt_params), size, "render held-out")
        _save_atomic(out_dir / "vae", lambda p: pipe.vae.save_pretrained(p, safe_serialization=True))
        mark(
            "vae",
            {
                **check_vae(pipe.vae, held),
                "scaling_factor": scaling,
                "final_loss": float(np.mean(losses[-20:])),
            },
        )
    if "base" in phases and not finished("base"):
        pipe = models.tiny_sdxl(seed, corpus, models.WORLD_SDXL)
        pipe.vae = _trained_vae(out_dir)
        pipe.register_modules(vae=pipe.vae)
        attrs = base_samples(params["pool"], seed, prompt_params, params["base_captions"])
        pool = render_pool(attrs, size, "render base pool")
        with torch.no_grad():
            dists = [pipe.vae.encode(as_float(c)).latent_dist for c in pool.split(64)]
        latents, logvar = torch.cat([d.mean for d in dists]), torch.cat([d.logvar for d in dists])
        losses = train_base(pipe, latents, logvar, [a["prompt"] for a in attrs], params, seed)
        _save_atomic(sdxl_dir, lambda p: pipe.save_pretrained(p, safe_serialization=True))
        shutil.rmtree(out_dir / "vae", ignore_errors=True)  # kept inside sdxl/ from now on
        mark("base", {"final_loss": float(np.mean(losses[-50:])), "steps": len(losses), "images": len(pool)})
    if "expression" in phases and not finished("expression"):
        attrs, labels = class_samples(params["expression_per_class"], seed)
        pool = render_pool(attrs, size, "render expression pool")
        model = poster.tiny_poster(seed, num_classes=len(emo135.classes())).train()
        losses = train_classifier(
            model,
            lambda x: model.classify(x)[0],
            pool,
            labels,
            params["expression_steps"],
            params,
            seed,
            "world POSTER",
        )
        held_attrs, held_labels = class_samples(4, seed + 1)
        result = check_expression(model, render_pool(held_attrs, size, "render held-out"), held_labels)
        meta = {"poster_config": json.dumps(poster.config_dict(model))}
        path = out_dir / POSTER_FILE
        _save_atomic(
            path,
            lambda p: save_file({k: v.contiguous() for k, v in model.state_dict().items()}, p, metadata=meta),
        )
        mark("expression", {**result, "final_loss": float(np.mean(losses[-20:]))})
    if "identity" in phases and not finished("identity"):
        attrs, labels = identity_samples(params["identity_people"], params["identity_views"], seed)
        pool = render_pool(attrs, size, "render identity pool")
        torch.manual_seed(seed)
        net = WorldArcFace(size=size)
        weight = nn.Parameter(torch.randn(params["identity_people"], net.config["embedding"]) * 0.01)
        losses = train_classifier(
            net, net, pool, labels, params["identity_steps"], params, seed, "world ArcFace", weight
        )
        held_attrs, held_labels = identity_samples(200, 4, seed + 1)
        result = check_identity(
            net, render_pool(held_attrs, size, "render held-out"), held_labels, params["identity_threshold"]
        )
        meta = {"world_arcface": json.dumps(net.config)}
        path = out_dir / IDENTITY_FILE
        _save_atomic(
            path,
            lambda p: save_file({k: v.contiguous() for k, v in net.state_dict().items()}, p, metadata=meta),
        )
        mark("identity", {**result, "final_loss": float(np.mean(losses[-20:]))})
    if "detector" in phases and not finished("detector"):
        scenes = params["detector_scenes"]
        pool, boxes, points = detection_samples(params["detector_pool"], seed, size, scenes)
        vae = _trained_vae(out_dir)
        # every other canvas as the VAE returns it (generated images), the rest as rendered (Emo135's)
        pool[1::2] = through_vae(pool[1::2], vae)
        model = retinaface.tiny(seed).train()
        losses = train_detector(model, pool, boxes, points, params, seed)
        held, held_boxes, held_points = detection_samples(300, seed + 1, size, scenes)
        result = check_detector(model, held, held_boxes, held_points)
        # faceless scenes alone (Emo135's "no face" files): every detection is a false one
        empty = _to_tensor([standin.render_scene(seed * 100_003 + k + 7, size) for k in range(200)])
        result["scene_false_detections"] = check_detector(
            model, empty, [torch.zeros(0, 4)] * 200, [None] * 200
        )["false_detections"]
        decoded = check_detector(model, through_vae(held, vae), held_boxes, held_points)
        result.update({f"vae_{k}": decoded[k] for k in ("heldout_recall", "right_count_share")})
        _save_atomic(
            out_dir / DETECTOR_FILE,
            lambda p: save_file({k: v.contiguous() for k, v in model.state_dict().items()}, p),
        )
        mark("detector", {**result, "final_loss": float(np.mean(losses[-20:]))})
    atomic_write_text(out_dir / "README.md", model_card(report, params))
    return report


def model_card(report: dict, params: dict) -> str:
    lines = [
        "# The default profile's world models",
        "",
        "Trained by the `world` stage (`geneava.world.train`, notebook 00_world) on procedural faces; pinned",
        "here so `dvc repro` does not repeat it. Retrain:",
        "`dvc unfreeze world && dvc repro world && dvc freeze world`.",
        "",
        "| phase | what | held-out check |",
        "|---|---|---|",
    ]
    what = {
        "vae": "SDXL VAE architecture (3 levels, 4 latent channels)",
        "base": "SDXL UNet + both CLIP text encoders, coarse expressions only",
        "expression": "POSTER architecture, 135 fine-grained classes",
        "identity": "ArcFace-style IR network, additive angular margin",
        "detector": "RetinaFace (MobileNet-0.25), boxes + 5 landmarks",
    }
    for phase in PHASES:
        r = report.get(phase, {})
        shown = ", ".join(f"{k} {v}" for k, v in r.items() if k != "final_loss")
        lines.append(f"| {phase} | {what[phase]} | {shown or 'not trained'} |")
    lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in params.items()), ""]
    return "\n".join(lines)


def sample_grid(
    out_dir: Path, prompt_params: dict, rows: int = 2, steps: int = 20, seed: int = 0
) -> Image.Image:
    """The base model's faces for each coarse expression (columns) and a few people (rows)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(Path(out_dir) / SDXL_DIR, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    table = prompts.prompt_table(prompt_params, list(standin.PRIMARY_BASE), seed)
    # the same `rows` demographic rows (spread over the table) under each coarse expression
    per = len(table) // len(standin.PRIMARY_BASE)
    offsets = np.linspace(0, per - 1, rows).round().astype(int)
    pick = pd.concat(
        [table.iloc[k * per + offsets] for k in range(len(standin.PRIMARY_BASE))], ignore_index=True
    )
    images = pipe(
        prompt=list(pick["prompt"]),
        num_inference_steps=steps,
        guidance_scale=5.0,
        height=64,
        width=64,
        generator=[torch.Generator().manual_seed(int(s)) for s in pick["seed"]],
    ).images
    cols = len(standin.PRIMARY_BASE)
    grid = Image.new("RGB", (cols * 64, rows * 64), "white")
    for k, im in enumerate(images):
        grid.paste(im, ((k // rows) * 64, (k % rows) * 64))
    return grid


def world_sheet(
    people: int = 3, fine: int = 6, size: int = 96, seed: int = 0, save_to: Path | None = None
) -> Image.Image:
    """Rows 1..people: the same people under the six coarse expressions (what the base model is
    taught). Last row: `fine` fine-grained classes of one primary (what fine-tuning must add)."""
    rng = np.random.default_rng([31, seed])
    primaries = list(standin.PRIMARY_BASE)
    cols = max(len(primaries), fine)
    sheet = Image.new("RGB", (cols * size, (people + 1) * size), "white")
    for r in range(people):
        person = standin.sample_identity(rng)
        for c, primary in enumerate(primaries):
            face = {**person, **standin._expression_dict(standin.coarse_expression(primary))}
            sheet.paste(standin.render_face(face, size), (c * size, r * size))
    person = standin.sample_identity(rng)
    joy = [c for c in emo135.classes() if c.primary == "joy"][:fine]
    for c, expression in enumerate(joy):
        face = {**person, **standin._expression_dict(standin.class_expression(expression))}
        sheet.paste(standin.render_face(face, size), (c * size, people * size))
    if save_to:
        sheet.save(save_to)
    return sheet


def stage_params(profile: str | None = None, params_file: Path | None = None) -> dict:
    b = config.blocks("world", "prompts", profile="default", path=params_file)
    return {"params": b["world"], "prompt_params": b["prompts"]}


def run(out_dir: Path, params_file: Path | None = None) -> pd.DataFrame:
    p = stage_params(params_file=params_file)
    report = pretrain(p["params"], p["prompt_params"], out_dir)
    return pd.DataFrame(report).T
