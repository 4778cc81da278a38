"""The paper profile at SDXL's real size, simulated on a CPU: peak GPU memory and FLOPs of one fine-tuning
step and of generation, what fits on a 24, 48 and 80 GB GPU, and the GPU-hours of a full reproduction.

SDXL base 1.0's UNet, VAE and text encoders are built from their published configurations
(benchmarks/sdxl-base-1.0/) and POSTER at full size, on the meta device; LoRA rank 4 is attached with the
project's own `finetune.add_lora`; every parameter, buffer and input then becomes a fake tensor (torch's
FakeTensorMode: shapes, dtypes and storages without data). The project's own `objective.losses_for_batch`
runs one batch at the paper profile's size (VAE encode, noise, UNet, L_dm; for alpha > 0 the fp32 x̂0
decode and POSTER's L_exp), then its backward and an AdamW step, as `finetune.finetune` does. Generation:
one classifier-free-guidance UNet call at generate.paper.batch_size, and the fp32 VAE decode of one
latent (vae_slicing). Batch sizes, resolution and counts are read from params.yaml's paper profile.

Peak memory = the most bytes of live tensor storage at any moment, counted by a dispatch mode with weak
references; the storages that exist before the step (weights, inputs) are counted once, so a view of a
weight is not a new allocation. FLOPs by torch.utils.flop_counter. Attention is simulated two ways:
`math` (PyTorch's reference path, every attention matrix materialised: an upper bound) and `fused`
(SDPA replaced by the memory-efficient kernel's op, which keeps only the output and a log-sum-exp per
row, as the fused kernels a GPU picks for fp16 do). FLOPs are the fused run's.

Where a real GPU differs: autocast is not simulated (fake "cuda" tensors cannot run backward without a
CUDA driver, so the fakes live on the meta device, where autocast does not exist and is made a no-op
here): the UNet's weights and activations are fp16, the LoRA, VAE and POSTER fp32, as the paper profile
keeps them, but peft's LoRA layers then keep an fp32 copy of each projection's input for the backward
where autocast would keep fp16 (not measured; it raises the peaks, most with checkpointing off); no
allocator fragmentation or cuDNN workspaces; no CUDA context (about 0.5-1 GB; the fit columns add
`--overhead`). Adam's moments are resident (a step is taken before the measured one); DDP's gradient
buckets (the size of the LoRA's gradients, 23 MB) are not counted.

Run: .venv/bin/python benchmarks/sdxl_simulated.py [--write docs/gpu-plan.md]   (about 5 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIGS = ROOT / "benchmarks/sdxl-base-1.0"
GiB = 2**30
# Dense tensor-core peaks (fp16/bf16, tf32) from NVIDIA's datasheets (the sparsity figures halved).
GPUS = {"RTX A6000 (48 GB)": (154.8e12, 77.4e12), "H100 SXM (80 GB)": (989.4e12, 494.7e12)}


class DtypeFlops(FlopCounterMode):
    """torch's FLOP counter, also summing each op's FLOPs by the dtype of its first tensor input: the
    fp16 UNet runs at the fp16 tensor peak, the fp32 VAE and POSTER at best at the tf32 one."""

    def __init__(self):
        super().__init__(display=False)
        self.fp32 = 0

    def _count_flops(self, func_packet, out, args, kwargs):
        if func_packet in self.flop_registry:
            first = next((t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)), None)
            if first is not None and first.dtype == torch.float32:
                self.fp32 += self.flop_registry[func_packet](*args, **kwargs, out_val=out)
        return super()._count_flops(func_packet, out, args, kwargs)


class PeakStorage(TorchDispatchMode):
    """Live bytes of tensor storage: `existing` tensors' storages (weights, inputs) counted once at the
    start, every storage an op creates added until it is collected."""

    def __init__(self, existing=()):
        super().__init__()
        self.seen: set[int] = set()
        self.live = 0
        for t in existing:
            st = t.untyped_storage()
            if st._cdata not in self.seen:
                self.seen.add(st._cdata)
                self.live += st.nbytes()
        self.peak = self.start = self.live

    def _free(self, key: int, n: int) -> None:
        self.seen.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st._cdata
                if key not in self.seen:  # views of existing storages share their key
                    self.seen.add(key)
                    self.live += st.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, key, st.nbytes())
        return out


def config(name: str) -> dict:
    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    return {k: v for k, v in cfg.items() if k not in ("_class_name", "architectures")}


def fake_weights(module, dtype: torch.dtype, trainable: str | None = None) -> None:
    """Every parameter and buffer replaced in place by a fake tensor of `dtype` (Module.to cannot swap
    fakes); parameters whose name contains `trainable` stay fp32 and require grad (the LoRA)."""
    for mname, mod in module.named_modules():
        for pname, p in list(mod._parameters.items()):
            if p is not None:
                train = trainable is not None and trainable in f"{mname}.{pname}"
                fake = torch.empty(p.shape, dtype=torch.float32 if train else dtype, device="meta")
                mod._parameters[pname] = torch.nn.Parameter(fake, requires_grad=train)
        for bname, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[bname] = torch.empty(b.shape, dtype=b.dtype, device="meta")


def meta_models(lora: bool, checkpointing: bool) -> dict:
    """SDXL's components and POSTER on the meta device (LoRA attached outside fake mode: peft moves
    adapters with Module.to, which cannot swap fake tensors)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from geneava.networks import poster
    from geneava.stages.finetune import add_lora

    with torch.device("meta"):
        m = {
            "unet": UNet2DConditionModel.from_config(config("unet")),
            "vae": AutoencoderKL.from_config(config("vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**config("text_encoder"))),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**config("text_encoder_2"))),
            "poster": poster.Poster(poster.PosterConfig(num_classes=7), channels="bgr"),
        }
    if lora:
        add_lora(m["unet"], 4)
    if checkpointing:  # finetune.training_models checkpoints both
        m["unet"].enable_gradient_checkpointing()
        m["vae"].enable_gradient_checkpointing()
    m["unet"].train(lora)
    for name in ("vae", "text_encoder", "text_encoder_2", "poster"):
        m[name].requires_grad_(False).eval()
    return m


@contextlib.contextmanager
def attention(kind: str):
    """SDPA as `math` (PyTorch's reference path) or `fused` (the memory-efficient kernel's op)."""
    real = F.scaled_dot_product_attention

    def fused(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is not None or kwargs.get("enable_gqa"):
            return real(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
        op = torch.ops.aten._scaled_dot_product_efficient_attention
        return op(q, k, v, None, True, dropout_p, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = fused if kind == "fused" else real
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def _meta_autocast() -> None:
    """`torch.autocast("meta", ...)` as a no-op (the project's code opens autocast on its device)."""
    real = torch.autocast

    def autocast(device_type, *args, **kwargs):
        return contextlib.nullcontext() if device_type == "meta" else real(device_type, *args, **kwargs)

    torch.autocast = autocast


def _measure(existing, fn) -> dict:
    peak = PeakStorage(existing)
    with peak, DtypeFlops() as flops:
        fn()
    total = flops.get_total_flops()
    return {"weights": peak.start, "peak": peak.peak, "end": peak.live, "flops": total, "fp32": flops.fp32}


def train_step(
    alpha: float, checkpointing: bool, attn: str, px: int, batch: int, exp_decode: str = "full"
) -> dict:
    """One batch through objective.losses_for_batch, its backward and an AdamW step, as the paper runs it.
    Resident: UNet (fp16) + LoRA (fp32), VAE and POSTER (fp32), both text encoders (fp16: finetune embeds
    the captions once and keeps them on the device)."""
    from diffusers import DDPMScheduler

    from geneava.stages.objective import losses_for_batch

    m = meta_models(lora=True, checkpointing=checkpointing)
    scheduler = DDPMScheduler.from_config(config("scheduler"))
    with FakeTensorMode(allow_non_fake_inputs=True), attention(attn):
        fake_weights(m["unet"], torch.float16, trainable=".lora_")
        for name, dtype in (("vae", torch.float32), ("poster", torch.float32)):
            fake_weights(m[name], dtype)
        for name in ("text_encoder", "text_encoder_2"):
            fake_weights(m[name], torch.float16)
        inputs = [
            torch.empty(batch, 3, px, px, device="meta"),
            torch.empty(batch, 77, 2048, device="meta", dtype=torch.float16),
            torch.empty(batch, 1280, device="meta", dtype=torch.float16),
            torch.empty(batch, 512, device="meta") if alpha > 0 else None,
        ]
        lora = [p for p in m["unet"].parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(lora, lr=1e-6, weight_decay=1e-2)
        for p in lora:  # a step before: Adam's moments are resident through every later step
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        def step():
            loss = losses_for_batch(
                m["unet"], m["vae"], m["poster"], scheduler, *inputs, alpha, px, torch.Generator(),
                exp_decode=exp_decode,
            )[0]  # fmt: skip
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        tensors = [t for mod in m.values() for t in (*mod.parameters(), *mod.buffers())]
        state = [t for st in optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
        return _measure(tensors + state + [t for t in inputs if t is not None], step)


def _resident(m: dict) -> list:
    """What generation keeps on the device: the UNet, both text encoders and the VAE."""
    return [
        t
        for k in ("unet", "text_encoder", "text_encoder_2", "vae")
        for t in (*m[k].parameters(), *m[k].buffers())
    ]


def denoise_step(attn: str, px: int, batch: int) -> dict:
    """One classifier-free-guidance UNet call for `batch` images (UNet batch 2 x batch), fp16; resident:
    the fp16 UNet, both text encoders and the VAE (upcast to fp32 for decoding, SDXL's force_upcast)."""
    m = meta_models(lora=False, checkpointing=False)
    with FakeTensorMode(allow_non_fake_inputs=True), attention(attn):
        for name in ("unet", "text_encoder", "text_encoder_2"):
            fake_weights(m[name], torch.float16)
        fake_weights(m["vae"], torch.float32)
        n = 2 * batch
        x = torch.empty(n, 4, px // 8, px // 8, device="meta", dtype=torch.float16)
        t = torch.full((n,), 500, device="meta")
        enc = torch.empty(n, 77, 2048, device="meta", dtype=torch.float16)
        added = {
            "text_embeds": torch.empty(n, 1280, device="meta", dtype=torch.float16),
            "time_ids": torch.empty(n, 6, device="meta", dtype=torch.float16),
        }
        resident = _resident(m)

        def call():
            with torch.no_grad():
                m["unet"](x, t, enc, added_cond_kwargs=added)

        return _measure(resident + [x, t, enc, *added.values()], call)


def decode_step(attn: str, px: int) -> dict:
    """The fp32 VAE decode of one latent (vae_slicing decodes a batch one image at a time)."""
    m = meta_models(lora=False, checkpointing=False)
    with FakeTensorMode(allow_non_fake_inputs=True), attention(attn):
        for name in ("unet", "text_encoder", "text_encoder_2"):
            fake_weights(m[name], torch.float16)
        fake_weights(m["vae"], torch.float32)
        z = torch.empty(1, 4, px // 8, px // 8, device="meta")
        resident = _resident(m)

        def call():
            with torch.no_grad():
                m["vae"].decode(z)

        return _measure(resident + [z], call)


# ------------------------------------------------------------------ the plan


def paper_counts() -> dict:
    """The paper profile's sizes and counts, from params.yaml."""
    from geneava.core import config, emo135, prompts

    params = config.load_params()  # validated; the paper's weights need not be here
    b = {k: params[k]["paper"] for k in ("prompts", "prepare", "finetune", "generate")}
    rows = len(prompts.prompt_table(b["prompts"], b["generate"]["expressions"], b["generate"]["seed"]))
    limit = b["generate"]["limit"]
    return {
        "px": b["prepare"]["resolution"],
        "train_batch": b["finetune"]["batch_size"],
        "gen_batch": b["generate"]["batch_size"],
        "steps": b["generate"]["steps"],
        "alpha": b["finetune"]["alpha"],
        "checkpointing": b["finetune"]["gradient_checkpointing"],
        "train_images": b["prepare"]["finetune_per_class"] * len(emo135.names()),
        "epochs": b["finetune"]["epochs"],
        "rows": min(rows, limit) if limit else rows,
    }


def gpu_plan(results: dict, counts: dict) -> list[tuple[str, float, float, str]]:
    """(work, fp16 FLOPs, fp32 FLOPs, what it counts) of a full paper-profile reproduction's GPU work."""
    c = counts

    def split(key, times: float) -> tuple[float, float]:
        r = results[key]
        return (r["flops"] - r["fp32"]) * times, r["fp32"] * times

    image_steps = c["train_images"] * c["epochs"] / c["train_batch"]
    per_image = [
        a + b
        for a, b in zip(
            split(("denoise",), c["steps"] / c["gen_batch"]), split(("decode",), 1.0), strict=True
        )
    ]
    ck = c["checkpointing"]
    return [
        (
            f"finetune (alpha {c['alpha']:g})",
            *split(("train", c["alpha"], ck), image_steps),
            f"{c['train_images']:,} images x {c['epochs']} epochs",
        ),
        ("ablation finetune (alpha 0)", *split(("train", 0.0, ck), image_steps), "the same, L_dm alone"),
        (
            "generate: fine-tuned + baseline",
            *(2 * c["rows"] * f for f in per_image),
            f"2 x {c['rows']:,} images, {c['steps']} CFG steps + decode",
        ),
        ("ablation's images", *(c["rows"] * f for f in per_image), f"{c['rows']:,} images"),
    ]


def run_all(counts: dict) -> dict:
    c, out = counts, {}
    cases = [("train", a, ck) for a in (0.0, c["alpha"]) for ck in (False, True)]
    for attn in ("math", "fused"):
        for case in cases:
            t = time.time()
            out[case + (attn,)] = train_step(case[1], case[2], attn, c["px"], c["train_batch"])
            print(f"  {case} {attn}: {time.time() - t:.0f} s", file=sys.stderr, flush=True)
        out[("denoise", attn)] = denoise_step(attn, c["px"], c["gen_batch"])
        out[("decode", attn)] = decode_step(attn, c["px"])
    for key in [k for k in out if k[-1] == "fused"]:  # FLOPs and the fused peak under the short key
        out[key[:-1]] = out[key]
    return out


def page(results: dict, counts: dict, utilisation: float, overhead: float, seconds: float) -> str:
    c, G = counts, 1e9
    lines = [
        "# The paper profile on a GPU: memory and GPU time (generated)",
        "",
        "<!-- Generated: do not edit. Regenerate with",
        "     .venv/bin/python benchmarks/sdxl_simulated.py --write docs/gpu-plan.md [--utilisation 0.4] -->",
        "",
        f"Written by `benchmarks/sdxl_simulated.py` on {datetime.date.today()} (torch {torch.__version__};",
        f"{seconds:.0f} s on a CPU). **Simulated, not measured on a GPU** (none was lent to this project);",
        "the script's docstring says how, and where a GPU differs. Sizes and counts are params.yaml's paper",
        f"profile: {c['px']} px, fine-tuning batch {c['train_batch']}, generation batch {c['gen_batch']}"
        f" with classifier-free guidance and {c['steps']} steps. Every number below is this script's.",
        "",
        "## Peak memory and FLOPs",
        "",
        "Peak: weights and inputs resident plus every live activation, gradient and optimizer state.",
        "`math`: attention matrices materialised (an upper bound); `fused`: the memory-efficient kernel,",
        "what a GPU runs in fp16 (the number to plan with). GiB = 2^30 bytes. Peaks move by up to a GiB",
        "from run to run (Python's garbage collector frees some storages late, as a real run's does);",
        "FLOPs do not.",
        "",
        "| case | grad. checkpointing | resident (GiB) | peak, math (GiB) | peak, fused (GiB) | TFLOPs |",
        "|---|---|---|---|---|---|",
    ]
    rows = [
        (f"fine-tuning step, alpha {a:g}", ("train", a, ck), "on" if ck else "off")
        for a in (0.0, c["alpha"])
        for ck in (False, True)
    ]
    rows += [
        (f"denoising step, CFG, {c['gen_batch']} images", ("denoise",), "-"),
        ("VAE decode of one image (fp32)", ("decode",), "-"),
    ]
    for label, key, ck in rows:
        m, f = results[key + ("math",)], results[key + ("fused",)]
        lines.append(
            f"| {label} | {ck} | {f['weights'] / GiB:.2f} | {m['peak'] / GiB:.2f} | "
            f"{f['peak'] / GiB:.2f} | {f['flops'] / 1e12:.2f} |"
        )
    lines += [
        "",
        f"## What fits (fused peak + {overhead:g} GiB for the CUDA context and allocator)",
        "",
        "The need in GiB (2^30 bytes) against a GPU's size in GB (10^9 bytes), as GPUs are sold.",
        "",
        "| case (need) | 24 GB | 48 GB | 80 GB |",
        "|---|---|---|---|",
    ]
    for label, key, ck in rows[:-2] + [("generation (denoise or decode)", None, "-")]:
        need = (
            max(results[("denoise",)]["peak"], results[("decode",)]["peak"])
            if key is None
            else results[key]["peak"]
        ) / GiB + overhead
        ck_text = f", checkpointing {ck}" if ck != "-" else ""
        fits = " | ".join("yes" if need * GiB <= gb * G else "no" for gb in (24, 48, 80))
        lines.append(f"| {label}{ck_text} ({need:.1f} GiB) | {fits} |")
    plan = gpu_plan(results, c)
    names = list(GPUS)
    lines += [
        "",
        f"## GPU-hours of a full reproduction (at {utilisation:.0%} of the dense tensor-core peak)",
        "",
        "GPU-hours = (fp16 FLOPs / fp16 peak + fp32 FLOPs / tf32 peak) / utilisation / 3600, with NVIDIA's",
        "dense peaks: "
        + "; ".join(f"{n} {a / 1e12:.0f} (fp16), {b / 1e12:.0f} (tf32) TFLOP/s" for n, (a, b) in GPUS.items())
        + ".",
        "fp32 work (the VAE, POSTER) is priced at the tf32 peak: cuDNN convolutions use TF32 by default,",
        "fp32 matmuls do not unless allowed, so that part is optimistic. An H100 PCIe has a lower peak than",
        "the SXM one. The utilisation is an assumption, not a measurement (`--utilisation`; the hours scale",
        "with its inverse). Wall-clock time is GPU-hours / GPUs for the sharded work. Not counted: QC",
        "retries and refills (each one more image), prepare (RetinaFace, the watermark filter), evaluation,",
        "memorization (ArcFace over the reference set), stylization, the fine-tune preview, data loading.",
        "",
        f"| work | counts | PFLOPs (fp32 share) | {names[0]} GPU-h | {names[1]} GPU-h |",
        "|---|---|---|---|---|",
    ]
    total16, total32 = sum(p[1] for p in plan), sum(p[2] for p in plan)
    for work, f16, f32, what in plan + [("total", total16, total32, "")]:
        hours = [(f16 / a + f32 / b) / utilisation / 3600 for a, b in GPUS.values()]
        share = f32 / (f16 + f32)
        flops = f"{(f16 + f32) / 1e15:,.0f} ({share:.0%})"
        lines.append(f"| {work} | {what} | {flops} | {hours[0]:,.1f} | {hours[1]:,.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", type=Path, help="also write the page here (e.g. docs/gpu-plan.md)")
    ap.add_argument("--utilisation", type=float, default=0.4, help="assumed share of the dense fp16 peak")
    ap.add_argument("--overhead", type=float, default=1.0, help="GiB added for CUDA context and allocator")
    args = ap.parse_args(argv)
    _meta_autocast()
    counts = paper_counts()
    t = time.time()
    results = run_all(counts)
    text = page(results, counts, args.utilisation, args.overhead, time.time() - t)
    print(text)
    if args.write:
        from geneava.core.io import atomic_write_text

        atomic_write_text(ROOT / args.write if not args.write.is_absolute() else args.write, text)


if __name__ == "__main__":
    main()
