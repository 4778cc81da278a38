"""Fine-tuning checkpoints: LoRA weights (safetensors), optimizer state (tensors only) and counters.

Written atomically (a temporary folder, then a rename); tagged with a fingerprint of the run's
settings so a checkpoint of other settings is never resumed. Nothing here unpickles arbitrary objects:
the optimizer state loads with weights_only=True, and no RNG state is stored (the training loop seeds
every draw from (seed, micro-batch, rank) instead).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from geneava.core import io

log = logging.getLogger(__name__)


def fingerprint(*parts) -> str:
    """Identifies a training run: checkpoints of another run are never resumed."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save(folder: Path, unet, optimizer, accelerator, state: dict, keep: int) -> None:
    """Write checkpoint `step-N` atomically (temporary folder, then rename) and keep the newest `keep`."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{state['step']:06d}"
    tmp = folder / f".{final.name}.tmp"
    for stale in folder.glob(".step-*.tmp"):  # this one, or another a killed run left half-written
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    lora = get_peft_model_state_dict(accelerator.unwrap_model(unet))
    io.save_tensors(tmp / "lora.safetensors", lora)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if accelerator.scaler is not None:
        torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
    (tmp / "state.json").write_text(json.dumps(state, sort_keys=True))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old)


def latest(folder: Path, run_id: str) -> Path | None:
    """The newest complete checkpoint of this run (others are from different settings: ignored)."""
    for ckpt in sorted(folder.glob("step-*"), reverse=True):
        try:
            state = json.loads((ckpt / "state.json").read_text())
        except (OSError, ValueError):
            continue
        if state.get("run_id") == run_id:
            return ckpt
        log.warning("ignoring %s: made with other settings", ckpt)
    return None


def load(ckpt: Path, unet, optimizer, accelerator) -> dict:
    set_peft_model_state_dict(accelerator.unwrap_model(unet), load_file(ckpt / "lora.safetensors"))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    if accelerator.scaler is not None and (ckpt / "scaler.pt").exists():
        accelerator.scaler.load_state_dict(torch.load(ckpt / "scaler.pt", weights_only=True))
    return json.loads((ckpt / "state.json").read_text())
