"""The world's people and their drawing: a procedural stand-in for Emo135's faces.

Emo135 cannot be downloaded here, so the default profile runs on faces drawn with PIL (written in
Emo135's on-disk layout by `geneava.world.dataset`). Each image's expression (brows, eyes, mouth) and
identity (face shape, skin tone, hair) are known exactly and written to an attributes table.
Expression parameters start from the class's primary category and get a fixed per-class offset, so
the 135 classes differ from one another, as fine-grained classes do.

`data.dvc` pins the result; because rendering is deterministic (seeded numpy, PIL drawing, PNG with
a pinned Pillow), a fresh clone regenerates exactly the pinned bytes and `dvc status` stays clean.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from geneava.core import emo135

log = logging.getLogger(__name__)

DEFAULT_SIZE = 64
# The world's expression space: action-unit-like parameters, each drawn on the face.
EXPRESSION_FIELDS = (
    "mouth_curve",  # -1 frown .. 1 smile (AU12 / AU15)
    "mouth_open",  # 0 closed .. 1 open (AU25-27)
    "brow_tilt",  # -1 inner ends down (anger, AU4) .. 1 inner ends up (worry, AU1)
    "brow_raise",  # 0 .. 1 both brows up (AU1+2)
    "eye_open",  # 0.15 squeezed .. 1 wide (AU5 / AU7)
    "cheek_raise",  # 0 .. 1 cheeks up, lower lids pushed up (AU6)
    "nose_wrinkle",  # 0 .. 1 wrinkled nose bridge (AU9)
)
LIMITS = ((-1, 1), (0, 1), (-1, 1), (0, 1), (0.15, 1), (0, 1), (0, 1))
# The coarse expression of each primary category: all the pretrained base model of the default world
# knows (its captions name only these six), as a general model knows "happy" but not "delight".
PRIMARY_BASE = {
    "love": (0.5, 0.1, 0.2, 0.3, 0.55, 0.5, 0.0),
    "joy": (0.9, 0.5, 0.0, 0.4, 0.6, 0.8, 0.0),
    "surprise": (0.0, 0.9, 0.3, 1.0, 1.0, 0.0, 0.0),
    "anger": (-0.6, 0.2, -0.9, 0.0, 0.75, 0.1, 0.7),
    "sadness": (-0.8, 0.05, 0.8, 0.3, 0.4, 0.0, 0.1),
    "fear": (-0.3, 0.6, 0.7, 0.9, 1.0, 0.0, 0.2),
}
CLASS_SPREAD = 0.3  # fixed per-class offset from the primary's expression (uniform, each parameter)
IMAGE_JITTER = 0.04  # per-image expression noise around the class's expression

# Identity. The seven groups follow the prompts' FairFace list; here a group is only a skin-tone range
# and a hair-colour mix: a toy world's cue, not a claim about real people.
RACES = {
    "White": ((242, 205, 180), (0.25, 0.35, 0.25, 0.15)),
    "Black": ((112, 72, 48), (0.85, 0.15, 0.0, 0.0)),
    "Indian": ((176, 122, 84), (0.8, 0.2, 0.0, 0.0)),
    "East Asian": ((236, 196, 160), (0.85, 0.15, 0.0, 0.0)),
    "Southeast Asian": ((206, 156, 112), (0.8, 0.2, 0.0, 0.0)),
    "Middle Eastern": ((214, 168, 128), (0.6, 0.35, 0.05, 0.0)),
    "Latino": ((198, 150, 108), (0.55, 0.4, 0.05, 0.0)),
}
HAIR_COLOURS = ((24, 18, 14), (78, 50, 28), (150, 100, 52), (214, 178, 112))  # black, brown, auburn, blond
GREY = (188, 188, 184)
IRIS_COLOURS = ((58, 38, 24), (96, 64, 36), (70, 110, 150), (80, 120, 80))
GENDERS = ("female", "male")
AGE_GROUPS = 7  # teenage .. elderly, as the prompts' seven age words
BACKGROUND = (236, 236, 232)
# Framing: the face's oval is drawn at FACE_SCALE of its attributes' size, centred CENTRE_Y down the
# frame, so it spans about 0.64-0.74 of the frame's height with ~10% of it free above and below (hair,
# chin, shoulders in view, as the prompts' "with shoulders visible" asks). At 0.88 of the height (the
# first world), a fine-tuned model's pixel of drift put faces past the frame (docs/decisions.md).
FACE_SCALE = 0.8
CENTRE_Y = 0.49
IDENTITY_FIELDS = (
    "race", "gender", "age_group", "skin_r", "skin_g", "skin_b", "hair_colour", "hair_style",
    "face_width", "face_height", "eye_spacing", "eye_size", "iris", "nose_length", "nose_width",
    "mouth_width", "brow_weight", "beard", "mole_x", "mole_y",
)  # fmt: skip


def _clip_expression(vec) -> np.ndarray:
    return np.clip(vec, [lo for lo, _ in LIMITS], [hi for _, hi in LIMITS])


def class_expression(expression: emo135.Expression) -> np.ndarray:
    """The expression vector of a class: its primary's coarse expression plus a fixed per-class offset."""
    rng = np.random.default_rng([7, expression.index])
    offset = rng.uniform(-CLASS_SPREAD, CLASS_SPREAD, size=len(EXPRESSION_FIELDS))
    return _clip_expression(np.array(PRIMARY_BASE[expression.primary]) + offset)


def coarse_expression(primary: str) -> np.ndarray:
    """What the base model's world knows of a primary category: its coarse expression, no finer."""
    return np.array(PRIMARY_BASE[primary], dtype=float)


def sample_identity(
    rng: np.random.Generator, race: str | None = None, gender: str | None = None, age_group: int | None = None
) -> dict:
    """A random person; race, gender and age group drawn unless given."""
    race = race or str(rng.choice(list(RACES)))
    gender = gender or str(rng.choice(GENDERS))
    age_group = int(rng.integers(AGE_GROUPS)) if age_group is None else int(age_group)
    tone, hair_mix = RACES[race]
    skin = np.clip(np.array(tone) * rng.uniform(0.9, 1.08) + rng.normal(0, 5, 3), 0, 255).round()
    male = gender == "male"
    return {
        "race": race,
        "gender": gender,
        "age_group": age_group,
        "skin_r": int(skin[0]),
        "skin_g": int(skin[1]),
        "skin_b": int(skin[2]),
        "hair_colour": int(rng.choice(len(HAIR_COLOURS), p=hair_mix)),
        # 0 cropped, 1 side part, 2 shoulder length, 3 long; men mostly short, women mostly long
        "hair_style": int(rng.choice(4, p=(0.45, 0.4, 0.1, 0.05) if male else (0.05, 0.15, 0.4, 0.4))),
        "face_width": round(float(rng.uniform(0.31, 0.37) + (0.015 if male else 0)), 4),
        "face_height": round(float(rng.uniform(0.40, 0.46)), 4),
        "eye_spacing": round(float(rng.uniform(0.36, 0.48)), 4),
        "eye_size": round(float(rng.uniform(0.85, 1.2) * (1.1 if age_group == 0 else 1.0)), 4),
        "iris": int(rng.integers(len(IRIS_COLOURS))),
        "nose_length": round(float(rng.uniform(0.22, 0.34)), 4),
        "nose_width": round(float(rng.uniform(0.10, 0.17)), 4),
        "mouth_width": round(float(rng.uniform(0.38, 0.52)), 4),
        "brow_weight": round(float(rng.uniform(0.8, 1.3) * (1.25 if male else 1.0)), 4),
        "beard": int(rng.choice(3, p=(0.5, 0.3, 0.2))) if male and age_group > 0 else 0,
        # a mole somewhere on the cheeks (or none: x = 0)
        "mole_x": round(float(rng.choice([0.0, rng.uniform(-0.6, 0.6)])), 4),
        "mole_y": round(float(rng.uniform(0.0, 0.4)), 4),
    }


def _expression_dict(vec) -> dict:
    return {k: round(float(v), 4) for k, v in zip(EXPRESSION_FIELDS, vec, strict=True)}


def sample_attributes(expression: emo135.Expression, i: int) -> dict:
    """Identity and expression of Emo135 stand-in image `i` of a class (small per-image jitter)."""
    rng = np.random.default_rng([11, expression.index, i])
    expr = _clip_expression(
        class_expression(expression) + rng.normal(0, IMAGE_JITTER, len(EXPRESSION_FIELDS))
    )
    return {**sample_identity(rng), **_expression_dict(expr)}


def _layout(a: dict, s: float) -> dict:
    """Where `render_face` draws the face's parts on an `s`-pixel canvas (one place for the drawing
    and for the ground truth of `landmarks`)."""
    cx, cy, k = s / 2, s * CENTRE_Y, s * FACE_SCALE
    fw, fh = a["face_width"] * k, a["face_height"] * k * (0.95 if a["age_group"] == 0 else 1.0)
    ex, ey = fw * a["eye_spacing"] * 1.05, cy - fh * 0.12
    return {
        "cx": cx, "cy": cy, "fw": fw, "fh": fh, "ex": ex, "ey": ey,
        "ew": fw * 0.2 * a["eye_size"],
        "nl": fh * a["nose_length"], "nw": fw * a["nose_width"],
        "my": cy + fh * 0.5, "mw": fw * a["mouth_width"],
        "curve": fh * 0.14 * a["mouth_curve"],
    }  # fmt: skip


def landmarks(a: dict) -> tuple[tuple[float, ...], tuple[tuple[float, float], ...]]:
    """The rendered face's box (x0, y0, x1, y1: the skin oval) and its five landmarks (eye centres,
    nose tip, mouth corners; image-left first, RetinaFace's order), as fractions of the image side."""
    at = _layout(a, 1.0)
    cx, cy, fw, fh = at["cx"], at["cy"], at["fw"], at["fh"]
    mouth_y = at["my"] - at["curve"] * 0.5  # the mouth line's ends (see render_face)
    points = (
        (cx - at["ex"], at["ey"]),
        (cx + at["ex"], at["ey"]),
        (cx, at["ey"] + at["nl"]),
        (cx - at["mw"], mouth_y),
        (cx + at["mw"], mouth_y),
    )
    return (cx - fw, cy - fh, cx + fw, cy + fh), points


def render_face(a: dict, size: int = DEFAULT_SIZE, supersample: int = 4) -> Image.Image:
    """Draw one face from its attributes on a plain light background.

    Shading (eye sockets, nose, ears, neck) and a slight blur make the faces findable by a real face
    detector, so the default run exercises real detection.
    """
    s = size * supersample
    img = Image.new("RGB", (s, s), BACKGROUND)
    d = ImageDraw.Draw(img)
    at = _layout(a, s)
    cx, cy, fw, fh = at["cx"], at["cy"], at["fw"], at["fh"]
    age = a["age_group"]
    skin = (a["skin_r"], a["skin_g"], a["skin_b"])
    shade = tuple(int(c * 0.8) for c in skin)
    dark = tuple(int(c * 0.45) for c in skin)
    line = tuple(int(c * 0.62) for c in skin)
    grey = min(1.0, max(0.0, (age - 3) / 3))  # greying from the late middle-aged group on
    hair = tuple(
        int(h * (1 - grey) + g * grey) for h, g in zip(HAIR_COLOURS[a["hair_colour"]], GREY, strict=True)
    )
    style = a["hair_style"]
    lw = max(2, s // 64)

    # shoulders, long hair behind the head, neck, ears, face
    d.ellipse((cx - fw * 1.6, cy + fh * 0.85, cx + fw * 1.6, cy + fh * 2.6), fill=(90, 110, 140))
    if style >= 2:
        bottom = cy + fh * (0.55 if style == 2 else 1.05)
        d.rounded_rectangle(
            (cx - fw * 1.15, cy - fh * 0.7, cx + fw * 1.15, bottom), radius=fw * 0.3, fill=hair
        )
    d.rectangle((cx - fw * 0.35, cy + fh * 0.6, cx + fw * 0.35, cy + fh * 1.1), fill=shade)
    for side in (-1, 1):
        ex = cx + side * fw * 0.95
        d.ellipse((ex - fw * 0.12, cy - fh * 0.2, ex + fw * 0.12, cy + fh * 0.15), fill=shade)
    d.ellipse((cx - fw, cy - fh, cx + fw, cy + fh), fill=skin)
    if a["beard"]:
        beard = tuple(int(h * 0.8 + c * 0.2) for h, c in zip(hair, skin, strict=True))
        if a["beard"] == 1:  # stubble: a darker lower face
            beard = tuple(int(c * 0.72 + h * 0.28) for h, c in zip(hair, skin, strict=True))
        d.chord((cx - fw, cy - fh * 0.2, cx + fw, cy + fh), 10, 170, fill=beard)

    # age: forehead lines from the middle-aged group, cheek folds for seniors
    for k in range(max(0, age - 2)):
        y = cy - fh * (0.55 + 0.07 * k)
        d.arc((cx - fw * 0.5, y - fh * 0.05, cx + fw * 0.5, y + fh * 0.05), 200, 340, fill=line, width=lw)
    if age >= 5:
        for side in (-1, 1):
            x = cx + side * fw * 0.42
            d.line((x, cy + fh * 0.2, x + side * fw * 0.08, cy + fh * 0.55), fill=line, width=lw)

    # eye sockets, then hair over the forehead, then eyes: openness scales the visible height
    ex, ey, ew = at["ex"], at["ey"], at["ew"]
    for side in (-1, 1):
        x = cx + side * ex
        d.ellipse((x - ew * 1.5, ey - fh * 0.16, x + ew * 1.5, ey + fh * 0.14), fill=shade)
    if style == 0:
        d.chord((cx - fw * 1.0, cy - fh * 1.04, cx + fw * 1.0, cy - fh * 0.35), 180, 360, fill=hair)
    elif style == 1:  # side part: a fringe heavier on one side
        d.chord((cx - fw * 1.05, cy - fh * 1.08, cx + fw * 1.05, cy - fh * 0.1), 180, 360, fill=hair)
        d.pieslice((cx - fw * 1.05, cy - fh * 1.0, cx + fw * 0.2, cy - fh * 0.2), 180, 270, fill=hair)
    else:
        d.chord((cx - fw * 1.05, cy - fh * 1.08, cx + fw * 1.05, cy), 180, 360, fill=hair)
    eh = fh * 0.12 * a["eye_open"] * a["eye_size"]
    lid = eh * 0.6 * a["cheek_raise"]  # raised cheeks push the lower lids up
    iris = IRIS_COLOURS[a["iris"]]
    for side in (-1, 1):
        x = cx + side * ex
        r = min(eh, fw * 0.09)
        for half, fill in ((ew, (250, 250, 250)), (r, iris), (r * 0.45, (15, 10, 10))):
            top = ey - min(half, eh)
            d.ellipse((x - half, top, x + half, max(top, ey + min(half, eh) - lid)), fill=fill)
        if a["cheek_raise"] > 0.3:  # cheek bulges under the eyes
            cyl = ey + eh + fh * 0.06
            d.arc((x - ew, cyl - fh * 0.05, x + ew, cyl + fh * 0.05), 200, 340, fill=line, width=lw)

    # brows: raise lifts both; tilt > 0 lifts the inner ends (worry), < 0 lowers them (anger)
    by = ey - fh * (0.2 + 0.12 * a["brow_raise"])
    tilt = fh * 0.1 * a["brow_tilt"]
    bw = max(2, int(s / 30 * a["brow_weight"]))
    for side in (-1, 1):
        inner, outer = cx + side * fw * 0.12, cx + side * (ex + ew * 1.3)
        d.line(
            (inner, by - tilt, outer, by + tilt * 0.3), fill=hair if a["hair_colour"] < 2 else dark, width=bw
        )

    # nose, with wrinkles across the bridge (AU9)
    nl, nw = at["nl"], at["nw"]
    d.polygon([(cx, ey + fh * 0.05), (cx - nw, ey + nl), (cx + nw, ey + nl)], fill=shade)
    for side in (-1, 1):
        nx = cx + side * nw * 0.6
        d.ellipse((nx - fw * 0.04, ey + nl - fh * 0.04, nx + fw * 0.04, ey + nl + fh * 0.02), fill=dark)
    for k in range(int(round(3 * a["nose_wrinkle"]))):
        y = ey + fh * (0.02 + 0.05 * k)
        d.line((cx - fw * 0.12, y, cx + fw * 0.12, y), fill=line, width=lw)
    if a["mole_x"]:
        mx, my_ = cx + a["mole_x"] * fw * 0.8, cy + a["mole_y"] * fh
        d.ellipse((mx - fw * 0.035, my_ - fw * 0.035, mx + fw * 0.035, my_ + fw * 0.035), fill=dark)

    # mouth: corners rise for a smile (curve > 0) and fall for a frown; openness draws the inside
    my, mw, curve = at["my"], at["mw"], at["curve"]
    opening = fh * 0.22 * a["mouth_open"]
    lips = (170, 60, 70) if a["gender"] == "female" else (150, 70, 64)
    if opening > fh * 0.02:
        top = my - opening / 2 + curve * 0.3
        d.ellipse((cx - mw * 0.7, top, cx + mw * 0.7, top + opening), fill=(90, 20, 30))
        if a["mouth_open"] > 0.35:  # teeth
            d.rectangle(
                (cx - mw * 0.45, top + opening * 0.08, cx + mw * 0.45, top + opening * 0.3),
                fill=(240, 236, 226),
            )
    pts = [(x, my - curve * (((x - cx) / mw) ** 2 - 0.5)) for x in np.linspace(cx - mw, cx + mw, 9)]
    d.line(pts, fill=lips, width=max(3, s // 36))
    img = img.filter(ImageFilter.GaussianBlur(s / 160))
    return img.resize((size, size), Image.Resampling.LANCZOS)


def drawing_fingerprint() -> str:
    """A digest of how the world draws people: the pixels of a few fixed faces (every class's primary,
    both genders, young and old) and a scene. Any change to the drawing changes it, so the stand-in
    dataset (`dataset --ensure`) and the world's trained models (`train.phase_keys`) know they are stale."""
    h = hashlib.sha256()
    for k, expression in enumerate(emo135.classes()[::27]):
        a = {**sample_attributes(expression, 0), "gender": GENDERS[k % 2], "age_group": (0, 6)[k % 2]}
        h.update(render_face(a).tobytes())
    h.update(render_scene(0).tobytes())
    return h.hexdigest()[:16]


def render_scene(seed: int, size: int = DEFAULT_SIZE) -> Image.Image:
    """A picture with nobody in it (sky, ground, a few buildings and trees), different for every seed."""
    rng = np.random.default_rng(seed)
    img = Image.new(
        "RGB", (size, size), tuple(int(c) for c in rng.integers((120, 160, 200), (190, 215, 250)))
    )
    d = ImageDraw.Draw(img)
    horizon = int(size * rng.uniform(0.5, 0.8))
    d.rectangle(
        (0, horizon, size, size), fill=tuple(int(c) for c in rng.integers((60, 90, 40), (120, 150, 90)))
    )
    for _ in range(rng.integers(2, 5)):
        w, h = rng.integers(size // 8, size // 3, 2)
        x = int(rng.integers(0, size - w))
        colour = tuple(int(c) for c in rng.integers((70, 70, 70), (160, 150, 140)))
        if rng.random() < 0.5:  # a building
            d.rectangle((x, horizon - h, x + w, horizon), fill=colour)
        else:  # a tree
            d.rectangle((x + w // 2 - 1, horizon - h // 2, x + w // 2 + 1, horizon), fill=(80, 60, 40))
            d.ellipse((x, horizon - h, x + w, horizon - h // 3), fill=(40, int(rng.integers(90, 140)), 50))
    return img


def render_hard_case(kind: str, a: dict, b: dict, size: int) -> Image.Image:
    """Files the prepare stage must drop: `empty` (no face, a scene seeded by `a`) or `pair` (two faces)."""
    if kind == "empty":
        return render_scene(int(hashlib.sha256(repr(sorted(a.items())).encode()).hexdigest()[:8], 16), size)
    img = Image.new("RGB", (size, size), BACKGROUND)
    for face, x in ((a, 0), (b, size // 2)):
        img.paste(render_face(face, size // 2), (x, size // 4))
    return img
