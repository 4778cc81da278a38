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
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from geneava.core import checkpoints, config, emo135, io, prompts
from geneava.core.io import atomic_write_text, write_json
from geneava.networks import models, poster, retinaface
from geneava.networks.identity import WorldArcFace
from geneava.world import standin
from geneava.world.checks import check_detector, check_expression, check_identity, check_vae
from geneava.world.loops import through_vae, train_base, train_classifier, train_detector, train_vae
from geneava.world.samples import (
    _to_tensor,
    as_float,
    base_samples,
    class_samples,
    detection_samples,
    identity_samples,
    render_pool,
)

log = logging.getLogger(__name__)

PHASES = ("vae", "base", "expression", "identity", "detector")
SDXL_DIR, POSTER_FILE, IDENTITY_FILE = "sdxl", "poster.safetensors", "identity.safetensors"
DETECTOR_FILE = "retinaface.safetensors"


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
    """Each phase's fingerprint, of the settings it reads and of how the world draws faces: changing one
    phase's settings retrains only it (and a new VAE or new prompts mean a new base model)."""
    # every phase trains on rendered faces: a change to the drawing retrains them all
    common = {
        **{k: params[k] for k in ("seed", "size", "batch_size", "lr")},
        "drawing": standin.drawing_fingerprint(),
    }
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


def _save_weights(path: Path, model: nn.Module, meta: dict | None = None) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    _save_atomic(path, lambda p: save_file(state, p, metadata=meta))


def train_vae_phase(params: dict, prompt_params: dict, out_dir: Path) -> dict:
    """The SDXL-architecture VAE on world faces, with its latent scaling factor measured (vae/)."""
    seed, size = params["seed"], params["size"]
    pipe = models.tiny_sdxl(seed, prompts.vocabulary(prompt_params), models.WORLD_SDXL)
    attrs = base_samples(params["pool"], seed, prompt_params)
    pool = render_pool(attrs, size, "render vae pool")
    losses, scaling = train_vae(pipe.vae, pool, params, seed)
    pipe.vae.register_to_config(scaling_factor=scaling)
    held = render_pool(base_samples(256, seed + 1, prompt_params), size, "render held-out")
    _save_atomic(out_dir / "vae", lambda p: pipe.vae.save_pretrained(p, safe_serialization=True))
    return {
        **check_vae(pipe.vae, held),
        "scaling_factor": scaling,
        "final_loss": float(np.mean(losses[-20:])),
    }


def train_base_phase(params: dict, prompt_params: dict, out_dir: Path) -> dict:
    """The UNet and both text encoders on captioned world faces, through the trained VAE (sdxl/)."""
    seed, size = params["seed"], params["size"]
    pipe = models.tiny_sdxl(seed, prompts.vocabulary(prompt_params), models.WORLD_SDXL)
    pipe.vae = _trained_vae(out_dir)
    pipe.register_modules(vae=pipe.vae)
    attrs = base_samples(params["pool"], seed, prompt_params, params["base_captions"])
    pool = render_pool(attrs, size, "render base pool")
    with torch.no_grad():
        dists = [pipe.vae.encode(as_float(c)).latent_dist for c in pool.split(64)]
    latents, logvar = torch.cat([d.mean for d in dists]), torch.cat([d.logvar for d in dists])
    losses = train_base(pipe, latents, logvar, [a["prompt"] for a in attrs], params, seed)
    _save_atomic(out_dir / SDXL_DIR, lambda p: pipe.save_pretrained(p, safe_serialization=True))
    shutil.rmtree(out_dir / "vae", ignore_errors=True)  # kept inside sdxl/ from now on
    return {"final_loss": float(np.mean(losses[-50:])), "steps": len(losses), "images": len(pool)}


def train_expression_phase(params: dict, prompt_params: dict, out_dir: Path) -> dict:
    """POSTER's architecture on the 135 classes of fresh world faces (poster.safetensors)."""
    seed, size = params["seed"], params["size"]
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
    _save_weights(out_dir / POSTER_FILE, model, {"poster_config": json.dumps(poster.config_dict(model))})
    return {**result, "final_loss": float(np.mean(losses[-20:]))}


def train_identity_phase(params: dict, prompt_params: dict, out_dir: Path) -> dict:
    """The ArcFace-style network on world identities across expressions (identity.safetensors)."""
    seed, size = params["seed"], params["size"]
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
    _save_weights(out_dir / IDENTITY_FILE, net, {"world_arcface": json.dumps(net.config)})
    return {**result, "final_loss": float(np.mean(losses[-20:]))}


def train_detector_phase(params: dict, prompt_params: dict, out_dir: Path) -> dict:
    """RetinaFace on canvases with 0-2 faces, half of them through the VAE (retinaface.safetensors)."""
    seed, size = params["seed"], params["size"]
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
    result["scene_false_detections"] = check_detector(model, empty, [torch.zeros(0, 4)] * 200, [None] * 200)[
        "false_detections"
    ]
    decoded = check_detector(model, through_vae(held, vae), held_boxes, held_points)
    result.update({f"vae_{k}": decoded[k] for k in ("heldout_recall", "right_count_share")})
    _save_weights(out_dir / DETECTOR_FILE, model)
    return {**result, "final_loss": float(np.mean(losses[-20:]))}


PHASE_TRAINERS = {
    "vae": train_vae_phase,
    "base": train_base_phase,
    "expression": train_expression_phase,
    "identity": train_identity_phase,
    "detector": train_detector_phase,
}


def pretrain(params: dict, prompt_params: dict, out_dir: Path, phases: tuple[str, ...] = PHASES) -> dict:
    """Train the world's models into `out_dir` (sdxl/, poster.safetensors, identity.safetensors,
    retinaface.safetensors, report.json), phase by phase in PHASES order.

    Finished phases with unchanged settings are skipped (`run.json`), so a killed run resumes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run_file, report_file = out_dir / "run.json", out_dir / "report.json"
    done = json.loads(run_file.read_text()) if run_file.is_file() else {}
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    keys = phase_keys(params, prompt_params)
    for phase in PHASES:
        if phase not in phases or (done.get(phase) == keys[phase] and phase in report):
            continue
        report[phase] = PHASE_TRAINERS[phase](params, prompt_params, out_dir)
        done[phase] = keys[phase]
        write_json(report_file, report)
        write_json(run_file, done)
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
