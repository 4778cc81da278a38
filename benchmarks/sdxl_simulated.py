"""The paper profile's fine-tuning step and SDXL's denoising step at 1024 px, simulated on a CPU: peak
memory and FLOPs with no weights and no GPU.

SDXL base 1.0's UNet and VAE are built from their published configurations (benchmarks/sdxl-base-1.0/)
and POSTER at full size, on the meta device; LoRA rank 4 is attached with the project's own
`finetune.add_lora`; then every parameter, buffer and input becomes a fake tensor (torch's FakeTensorMode:
shapes, dtypes and storages without data), and the project's own `finetune.losses_for_batch` runs one
batch (VAE encode, noise, UNet, L_dm, and for alpha 1 the fp32 x̂0 decode and POSTER's L_exp) and its
backward. Peak memory = the most bytes of live tensor storage at any moment, weights included, counted by a
dispatch mode with weak references; FLOPs by torch.utils.flop_counter.

Limits (where a real GPU will differ):
- fp16 UNet weights and activations, fp32 LoRA, VAE and POSTER, as the paper profile; autocast is
  skipped (fake "cuda" tensors cannot run backward without a CUDA driver, so the fake tensors live on the
  meta device, where autocast does not exist: the script turns `torch.autocast("meta")` into a no-op);
- no text encoders (prompt embeddings are inputs: finetune embeds captions once) and no optimizer state
  (Adam's two moments of the 5.8 M LoRA parameters: 46 MB in fp32);
- attention takes PyTorch's math path under fake tensors, materialising each attention matrix; flash /
  memory-efficient kernels on a GPU do not, so the peaks are upper bounds;
- no allocator fragmentation, cuDNN workspaces or CUDA context (~0.5-1 GB on a real GPU).

Run: .venv/bin/python benchmarks/sdxl_simulated.py   (about four minutes on 2 cores)
"""

from __future__ import annotations

import contextlib
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


def _meta_autocast():
    """`torch.autocast("meta", ...)` as a no-op (the project's code opens autocast on its device)."""
    real = torch.autocast

    def autocast(device_type, *args, **kwargs):
        return contextlib.nullcontext() if device_type == "meta" else real(device_type, *args, **kwargs)

    torch.autocast = autocast


def _config(name: str) -> dict:
    cfg = json.loads((ROOT / f"benchmarks/sdxl-base-1.0/{name}.json").read_text())
    cfg.pop("_class_name")
    return cfg


def _fp32_frozen(module) -> None:
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                fake = torch.empty(p.shape, dtype=torch.float32, device="meta")
                mod._parameters[name] = torch.nn.Parameter(fake, requires_grad=False)


def train_step(alpha: float, checkpointing: bool, px: int = 1024) -> dict:
    """One batch of 1 through finetune.losses_for_batch and its backward, as the paper profile runs it."""
    from diffusers import AutoencoderKL, DDPMScheduler

    from geneava.networks import poster
    from geneava.stages.finetune import losses_for_batch

    unet = meta_unet(checkpointing, lora=True)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(_config("vae"))
        encoder = poster.Poster(poster.PosterConfig(num_classes=7), channels="bgr")
    if checkpointing:
        vae.enable_gradient_checkpointing()  # finetune does both
    vae.requires_grad_(False)
    encoder.requires_grad_(False).eval()
    scheduler = DDPMScheduler.from_config(_config("scheduler"))
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake_parameters(unet)
        _fp32_frozen(vae)
        _fp32_frozen(encoder)
        weights = sum(p.numel() * p.element_size() for m in (unet, vae, encoder) for p in m.parameters())
        pixels = torch.empty(1, 3, px, px, device="meta")
        prompt = torch.empty(1, 77, 2048, device="meta", dtype=torch.float16)
        pooled = torch.empty(1, 1280, device="meta", dtype=torch.float16)
        real = torch.empty(1, 512, device="meta")
        peak = PeakStorage(weights)
        with peak, FlopCounterMode(display=False) as flops:
            loss, _, _ = losses_for_batch(
                unet, vae, encoder, scheduler, pixels, prompt, pooled, real, alpha, px, torch.Generator()
            )
            loss.backward()
    return {"weights": weights, "peak": peak.peak, "flops": flops.get_total_flops()}


def denoise_step(px: int = 1024) -> dict:
    """One classifier-free-guidance UNet call (batch 2: conditional and unconditional) in fp16."""
    unet = meta_unet(False, lora=False)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake_parameters(unet)
        weights = sum(p.numel() * p.element_size() for p in unet.parameters())
        x = torch.empty(2, 4, px // 8, px // 8, device="meta", dtype=torch.float16)
        t = torch.full((2,), 500, device="meta")
        enc = torch.empty(2, 77, 2048, device="meta", dtype=torch.float16)
        added = {
            "text_embeds": torch.empty(2, 1280, device="meta", dtype=torch.float16),
            "time_ids": torch.empty(2, 6, device="meta", dtype=torch.float16),
        }
        peak = PeakStorage(weights)
        with peak, FlopCounterMode(display=False) as flops, torch.no_grad():
            unet(x, t, enc, added_cond_kwargs=added)
    return {"weights": weights, "peak": peak.peak, "flops": flops.get_total_flops()}


def main() -> None:
    _meta_autocast()
    rows = [
        (f"fine-tuning step, alpha {a:g}", "on" if ck else "off", train_step(a, ck))
        for a in (0.0, 1.0)
        for ck in (False, True)
    ]
    rows.append(("denoising step with CFG (batch 2)", "-", denoise_step()))
    print(f"SDXL base 1.0 at 1024 px, paper profile dtypes (simulated; torch {torch.__version__})")
    print("| case | grad. checkpointing | weights (GiB) | peak (GiB) | TFLOPs |")
    print("|---|---|---|---|---|")
    for case, ck, r in rows:
        print(
            f"| {case} | {ck} | {r['weights'] / GiB:.2f} | {r['peak'] / GiB:.2f} | {r['flops'] / 1e12:.2f} |"
        )
    print(f"50-step generation with CFG: {rows[-1][2]['flops'] * 50 / 1e12:.0f} TFLOPs per image (UNet)")


if __name__ == "__main__":
    main()
