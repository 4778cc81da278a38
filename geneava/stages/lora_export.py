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
GRID = f"![Faces drawn with this LoRA]({SAMPLES})"
PAPER_BASE = "stabilityai/stable-diffusion-xl-base-1.0"


def save_kohya(lora_file: Path) -> Path:
    """`lora_file` (diffusers' layout) converted to kohya's keys (`lora_unet_..._to_q.lora_down.weight` and
    a `.alpha` per module), written atomically beside it."""
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from safetensors.torch import load_file

    state = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(load_file(lora_file)))
    kohya = Path(lora_file).with_name(KOHYA_FILE)
    return io.save_tensors(kohya, state, metadata={"ss_network_module": "networks.lora"})


def _licence(base: str) -> str:
    if base == PAPER_BASE:
        return (
            "The LoRA adapts SDXL base 1.0, released under the CreativeML Open RAIL++-M licence: its use "
            "restrictions carry over to this adapter (read them on the base model's card)."
        )
    return (
        f"The base model `{base}` is not SDXL base 1.0: check its own licence. The miniature world's "
        "models (`models/world/`) are trained by this project on procedural faces."
    )


def model_card(
    model_params: dict,
    prompt_params: dict,
    params: dict,
    metrics: dict,
    resolution: int,
    lora_dir: Path,
    results: str | None = None,
) -> str:
    """The card's Markdown, from the run's own parameters and metrics (no clock, no paths outside the
    project: the same run writes the same bytes). `results`: Table 1 as the evaluate stage wrote it (the
    released card, `package`); None: the training card says where Table 1 will be."""
    base = str(model_params["sdxl"])
    files = {
        name: io.sha256_file(Path(lora_dir) / name)
        for name in ("pytorch_lora_weights.safetensors", KOHYA_FILE)
        if (Path(lora_dir) / name).is_file()
    }
    example = prompt_params["template"].format(
        article="a", age="middle-aged", race="Indian", person="woman", expression="delight"
    )
    keys = ("rank", "lr", "epochs", "batch_size", "alpha", "seed", "mixed_precision")
    trained = {k: params[k] for k in keys}
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
        "one-step reconstruction) on {images} images of Emo135's expression classes.".format(
            images=metrics["images"]
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
        *(PENDING if results is None else [*MEASURED, "", results.strip(), "", GRID]),
        "",
        "## Files",
        "",
        *(f"- `{name}`: sha256 `{digest}`" for name, digest in files.items()),
        "",
        "## Licence",
        "",
        _licence(base),
        "Emo135 (the fine-tuning images) is distributed by its authors under their own terms.",
        "",
    ]
    return "\n".join(lines)


def about(profile: str | None, params_file: Path | None = None) -> dict:
    """The parameter blocks a card describes (as the finetune stage reads them)."""
    from geneava.core import config

    b = config.blocks("models", "prompts", "finetune", "prepare", profile=profile, path=params_file)
    return {
        "model_params": b["models"],
        "prompt_params": b["prompts"],
        "params": b["finetune"],
        "resolution": b["prepare"]["resolution"],
    }


def package(about: dict, outputs: Path, out_dir: Path) -> Path:
    """`out_dir` as released: the trained LoRA's files (diffusers', kohya's), a grid of faces it drew
    (generate's) and its card with Table 1. Built aside and moved into place, so it is whole or absent.
    `about`: the model, prompt, finetune and prepare parameter blocks of the run."""
    from geneava.core.io import temp_dir

    lora, out_dir = Path(outputs) / "finetune" / "lora", Path(out_dir)
    needed = [
        lora / "pytorch_lora_weights.safetensors",
        lora / KOHYA_FILE,
        Path(outputs) / "finetune" / "metrics.json",
    ]
    needed += [Path(outputs) / "evaluate" / "table1.md", Path(outputs) / "generate" / "grid.png"]
    for path in needed:
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the finetune, generate and evaluate stages first")
    tmp = temp_dir(out_dir.parent, out_dir.name)
    try:
        for f in needed[:2]:
            shutil.copyfile(f, tmp / f.name)
        shutil.copyfile(needed[4], tmp / SAMPLES)
        card = model_card(
            about["model_params"],
            about["prompt_params"],
            about["params"],
            json.loads(needed[2].read_text()),
            about["resolution"],
            tmp,
            results=needed[3].read_text(),
        )
        io.atomic_write_text(tmp / CARD_FILE, card)
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
