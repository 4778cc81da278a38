"""The trained LoRA for the tools people use: the same weights in kohya's layout (AUTOMATIC1111, ComfyUI,
SD.Next, InvokeAI) beside diffusers' file, and a model card that says what the LoRA is and how to use it.

diffusers ships the key conversion (`convert_all_state_dict_to_peft`, then `convert_state_dict_to_kohya`,
as its training scripts' docs show); nothing is renamed here by hand. Stock diffusers'
`load_lora_weights(folder, weight_name=KOHYA_FILE)` reads the kohya file back (tested: same image).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from geneava.core import io

KOHYA_FILE = "geneava_lora_kohya.safetensors"
CARD_FILE = "README.md"
SAMPLES = "samples.png"  # the released card's grid of faces (generate's grid.png)
PENDING = [  # the training card's Results: Table 1 does not exist yet
    "Table 1 (CLIP, DINOv2, LPIPS, Exp, recognition, with bootstrap CIs) for this LoRA is computed after",
    "training, by the evaluate stage: `outputs/evaluate/table1.md` of the run that trained it; the release",
    "stage writes this card again with it (`outputs/release/lora/`).",
]
MEASURED = [
    "Measured by the evaluate stage of the run that trained this LoRA (fine-tuned against the base model",
    "on the same prompts and seeds; `outputs/evaluate/table1.md`):",
]
GRID = (
    f"![Faces this LoRA drew, the generate stage's grid]({SAMPLES}) (faces QC rejected are marked so; the"
    " refill stage drew those rows again)"
)
PAPER_BASE = "stabilityai/stable-diffusion-xl-base-1.0"


def save_kohya(lora_file: Path) -> Path:
    """`lora_file` (diffusers' layout) converted to kohya's keys (`lora_unet_..._to_q.lora_down.weight` and
    a `.alpha` per module), written atomically beside it."""
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from safetensors.torch import load_file

    state = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(load_file(lora_file)))
    kohya = Path(lora_file).with_name(KOHYA_FILE)
    return io.save_tensors(kohya, state, metadata={"ss_network_module": "networks.lora"})


def _world(base: str) -> bool:
    return Path(base).parts[:2] == ("models", "world")


def _licence(base: str) -> list[str]:
    """The card's licence lines: the base model's terms and the fine-tuning images'."""
    if _world(base):
        return [
            "The base model is the miniature world's (`models/world/`), trained by this project on "
            "procedural faces, as were the fine-tuning images (the stand-in for Emo135 in `data/`): no "
            "third-party weights or faces."
        ]
    emo135 = "Emo135 (the fine-tuning images) is distributed by its authors under their own terms."
    if base == PAPER_BASE:
        return [
            "The LoRA adapts SDXL base 1.0, released under the CreativeML Open RAIL++-M licence: its use "
            "restrictions carry over to this adapter (read them on the base model's card).",
            emo135,
        ]
    return [f"The base model `{base}` is not SDXL base 1.0: check its own licence.", emo135]


def _training_settings(params: dict) -> dict:
    """The finetune settings the card records; a lean expression loss (objective.py) is named, the
    paper's (exp_decode: full) is not."""
    keys = ("rank", "lr", "epochs", "batch_size", "alpha", "seed", "mixed_precision")
    trained = {k: params[k] for k in keys}
    if params.get("exp_decode", "full") != "full":
        trained["exp_decode"] = params["exp_decode"]
        if params["exp_decode"] == "crop":
            trained["exp_crop"] = params["exp_crop"]
    return trained


def model_card(
    model_params: dict,
    prompt_params: dict,
    params: dict,
    metrics: dict,
    resolution: int,
    lora_dir: Path,
) -> str:
    """The card's Markdown, from the run's own parameters and metrics (no clock, no paths outside the
    project: the same run writes the same bytes). Its Results section says where Table 1 will be: the
    release stage writes the card again with it (`released_card`)."""
    base = str(model_params["sdxl"])
    files = {
        name: io.sha256_file(Path(lora_dir) / name)
        for name in ("pytorch_lora_weights.safetensors", KOHYA_FILE)
        if (Path(lora_dir) / name).is_file()
    }
    example = prompt_params["template"].format(
        article="a", age="middle-aged", race="Indian", person="woman", expression="delight"
    )
    trained = _training_settings(params)
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: diffusers",
        "tags: [lora, text-to-image, stable-diffusion-xl, facial-expression, geneava]",
        "---",
        "",
        "# GenEAva expression LoRA",
        "",
        "A rank-{rank} LoRA on the UNet attention projections of `{base}`, fine-tuned with GenEAva's".format(
            rank=params["rank"], base=base
        ),
        "expression-guided loss (L = L_dm + alpha * L_exp, POSTER embeddings of the real image and of the",
        "one-step reconstruction) on {images} images of {source}.".format(
            images=metrics["images"],
            source="the procedural stand-in for Emo135's classes" if _world(base) else "Emo135's classes",
        ),
        "",
        "## Usage (no trigger word: the expression phrase of the prompt drives it)",
        "",
        f"Prompt template: `{prompt_params['template']}`",
        f"(training captions: `{prompt_params['caption']}`), e.g. `{example}`",
        "",
        "```python",
        "from diffusers import StableDiffusionXLPipeline",
        f'pipe = StableDiffusionXLPipeline.from_pretrained("{base}")',
        'pipe.load_lora_weights("path/to/lora")  # this folder: diffusers reads pytorch_lora_weights',
        f'image = pipe("{example}").images[0]',
        "```",
        "",
        f"AUTOMATIC1111 / ComfyUI / SD.Next: copy `{KOHYA_FILE}` into the LoRA folder "
        f"(`<lora:{Path(KOHYA_FILE).stem}:1>` in A1111). The same weights in kohya's key layout.",
        "",
        "## Training",
        "",
        "```json",
        json.dumps({**trained, "resolution": resolution, "steps": metrics["steps"]}, indent=1),
        "```",
        "",
        f"Final loss {metrics['final_loss']:.4f}; the loss curves and a before/after grid on the same seeds",
        "are `loss.png` and `before_after.png` in the finetune stage's folder (`outputs/finetune/`).",
        "",
        "## Results",
        "",
        *PENDING,
        "",
        "## Files",
        "",
        *(f"- `{name}`: sha256 `{digest}`" for name, digest in files.items()),
        "",
        "## Licence",
        "",
        *_licence(base),
        "",
    ]
    return "\n".join(lines)


def released_card(card: str, table1: str, rendered: dict) -> str:
    """The training card with its Results section replaced by Table 1 as the evaluate stage wrote it, how
    the project rendered (generate's settings) and the grid of faces; every other line is the card's."""
    head, rest = card.split("\n## Results\n", 1)
    tail = rest.split("\n## Files\n", 1)[1]
    how = ", ".join(f"{k} {v}" for k, v in rendered.items())
    results = [*MEASURED, "", table1.strip(), "", f"The project rendered with {how}.", "", GRID, ""]
    return "\n".join([head, "## Results", "", *results, "## Files", tail])


def package(outputs: Path, out_dir: Path) -> Path:
    """`out_dir` as released: the trained LoRA's files (diffusers', kohya's), generate's grid of its faces
    and its card with Table 1 (`released_card`). Built aside and moved into place: whole or absent."""
    import pandas as pd

    from geneava.core.io import temp_dir

    outputs, out_dir = Path(outputs), Path(out_dir)
    lora = outputs / "finetune" / "lora"
    files = [lora / "pytorch_lora_weights.safetensors", lora / KOHYA_FILE, lora / CARD_FILE]
    table1, grid = outputs / "evaluate" / "table1.md", outputs / "generate" / "grid.png"
    manifest = outputs / "generate" / "finetuned" / "manifest.csv"
    for path in [*files, table1, grid, manifest]:
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the finetune, generate and evaluate stages first")
    first = pd.read_csv(manifest, nrows=1).iloc[0]
    rendered = {k: first[k] for k in ("sampler", "steps", "guidance_scale", "resolution") if k in first}
    tmp = temp_dir(out_dir.parent, out_dir.name)
    try:
        for f in files[:2]:
            shutil.copyfile(f, tmp / f.name)
        shutil.copyfile(grid, tmp / SAMPLES)
        card = released_card(files[2].read_text(), table1.read_text(), rendered)
        (tmp / CARD_FILE).write_text(card)  # the folder as a whole is moved into place
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def write(
    model_params: dict, prompt_params: dict, params: dict, metrics: dict, resolution: int, lora_file: Path
) -> Path:
    """The kohya file and the card, beside diffusers' file. Returns the kohya file's path."""
    kohya = save_kohya(lora_file)
    card = model_card(model_params, prompt_params, params, metrics, resolution, Path(lora_file).parent)
    io.atomic_write_text(Path(lora_file).parent / CARD_FILE, card)
    return kohya
