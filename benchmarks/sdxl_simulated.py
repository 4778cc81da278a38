"""SDXL base 1.0's UNet at 1024 px, simulated on a CPU: peak memory and FLOPs of one LoRA training step
and of one classifier-free-guidance denoising step, with no weights and no GPU.

The UNet is built from its published configuration (benchmarks/sdxl-base-1.0/unet.json) on the meta
device, LoRA rank 4 is attached with the project's own `finetune.add_lora`, and every parameter, buffer
and input is then a fake tensor (torch's FakeTensorMode: shapes, dtypes and storages without data).
Peak memory = the most bytes of live tensor storage at any moment (weights included), counted by a
dispatch mode with weak references; FLOPs by torch.utils.flop_counter.

A first step of issue 20's rehearsal, with these limits (where a real GPU will differ):
- UNet only: no VAE decode of x̂0, no POSTER, no text encoders, no optimizer state (Adam's two moments
  of the 5.8 M LoRA parameters: 46 MB in fp32);
- fp16 weights and activations, fp32 LoRA, no autocast (fake "cuda" tensors cannot run backward
  without a CUDA driver, so the fake tensors live on the meta device);
- attention goes through PyTorch's math path under fake tensors, which materialises each attention
  matrix; flash / memory-efficient kernels on a GPU do not, so the peaks are upper bounds;
- no allocator fragmentation, cuDNN workspaces or CUDA context (~0.5-1 GB on a real GPU).

Run: .venv/bin/python benchmarks/sdxl_simulated.py   (about a minute and a half on 2 cores)
"""

from __future__ import annotations

import json
import sys
import weakref
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GiB = 2**30


class PeakStorage(TorchDispatchMode):
    """Live bytes of the storages created while active (freed when their storage is collected)."""

    def __init__(self, start: int = 0):
        super().__init__()
        self.live = self.peak = start
        self.seen: set[int] = set()

    def _free(self, key: int, n: int) -> None:
        self.seen.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st._cdata
                if key not in self.seen:
                    self.seen.add(key)
                    self.live += st.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, key, st.nbytes())
        return out


def meta_unet(checkpointing: bool, lora: bool):
    """The UNet on the meta device (shapes only), LoRA attached by the project's code (outside fake mode:
    peft moves adapters with Module.to, which cannot swap fake tensors)."""
    from diffusers import UNet2DConditionModel

    from geneava.stages.finetune import add_lora

    cfg = json.loads((ROOT / "benchmarks/sdxl-base-1.0/unet.json").read_text())
    cfg.pop("_class_name")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    if lora:
        add_lora(unet, 4)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    return unet.train(lora)


def fake_parameters(unet) -> None:
    """Every parameter and buffer replaced in place by a fake tensor (fp16; LoRA fp32 and trainable)."""
    for mname, mod in unet.named_modules():  # fake storages in place (Module.to cannot swap fakes)
        for pname, p in list(mod._parameters.items()):
            if p is None:
                continue
            trainable = ".lora_" in f"{mname}.{pname}"
            dtype = torch.float32 if trainable else torch.float16
            mod._parameters[pname] = torch.nn.Parameter(
                torch.empty(p.shape, dtype=dtype, device="meta"), requires_grad=trainable
            )
        for bname, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[bname] = torch.empty(b.shape, dtype=b.dtype, device="meta")


def measure(case: str, checkpointing: bool = False, batch: int = 1, px: int = 1024) -> dict:
    train = case == "train step"
    unet = meta_unet(checkpointing, lora=train)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake_parameters(unet)
        weights = sum(p.numel() * p.element_size() for p in unet.parameters())
        h = px // 8
        x = torch.randn(batch, 4, h, h, device="meta", dtype=torch.float16)
        t = torch.full((batch,), 500, device="meta")
        enc = torch.randn(batch, 77, 2048, device="meta", dtype=torch.float16)
        added = {
            "text_embeds": torch.randn(batch, 1280, device="meta", dtype=torch.float16),
            "time_ids": torch.randn(batch, 6, device="meta", dtype=torch.float16),
        }
        peak = PeakStorage(weights)
        with peak, FlopCounterMode(display=False) as flops:
            if train:
                out = unet(x, t, enc, added_cond_kwargs=added).sample
                torch.nn.functional.mse_loss(out.float(), x.float()).backward()
            else:
                with torch.no_grad():
                    unet(x, t, enc, added_cond_kwargs=added)
        return {
            "case": case,
            "checkpointing": checkpointing,
            "batch": batch,
            "weights_gib": weights / GiB,
            "peak_gib": peak.peak / GiB,
            "tflops": flops.get_total_flops() / 1e12,
        }


def main() -> None:
    rows = [
        measure("train step", checkpointing=False),
        measure("train step", checkpointing=True),
        measure("denoising step (CFG: batch 2)", batch=2),
    ]
    print(f"SDXL base 1.0 UNet, 1024 px, fp16 (simulated; torch {torch.__version__})")
    print("| case | grad. checkpointing | batch | weights (GiB) | peak (GiB) | TFLOPs |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ck = "on" if r["checkpointing"] else "off"
        print(
            f"| {r['case']} | {ck} | {r['batch']} | {r['weights_gib']:.2f} | {r['peak_gib']:.2f} "
            f"| {r['tflops']:.2f} |"
        )
    gen = rows[2]["tflops"] * 50
    print(f"50-step generation with CFG: {gen:.0f} TFLOPs per image (UNet only)")


if __name__ == "__main__":
    main()
