"""The world's training data: seeded, freshly rendered faces for each phase of `geneava.world.train`
(the base model's captioned pool, classes for POSTER, identities for ArcFace, canvases for RetinaFace)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFilter
from tqdm.auto import tqdm

from geneava.core import config, emo135, prompts
from geneava.world import standin


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
    trees and buildings, `standin.render_scene`, the rest a blank wall), one (75%: a face of about
    0.47-1.17 of the frame, off centre, so some are cut by the frame as a too-close face is) or two side
    by side (15%; faces of about 0.26-0.35 of the frame), of new people under any class's expression,
    slightly blurred. Returns uint8 images and per image the faces' boxes (k, 4) and landmarks (k, 5, 2)
    in pixels (`standin.landmarks`)."""
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
                # renders of 0.69-1.69 of the frame: faces of about 0.47-1.17 of it, some cut by the frame
                side = round(size * rng.uniform(0.55, 1.35) / standin.FACE_SCALE)
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
