"""benchmarks/sdxl_simulated.py's accounting (docs/gpu-plan.md is its output): the peak counter against
analytic counts, the fused-attention stand-in, and the paper step at a small size."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from .conftest import ROOT

MiB = 2**20


@pytest.fixture(scope="module")
def sim():
    spec = importlib.util.spec_from_file_location("sdxl_simulated", ROOT / "benchmarks/sdxl_simulated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module._meta_autocast()
    return module


def _chain(sim, depth: int, grad: bool) -> dict:
    """A Linear/GELU chain on 4096 x 1024 fp32 activations (16 MiB each); the resident tensors are
    listed with repeats and a view, which must each count once."""
    with torch.device("meta"):
        layers = [m for _ in range(depth) for m in (torch.nn.Linear(1024, 1024), torch.nn.GELU())]
        net = torch.nn.Sequential(*layers)
    with FakeTensorMode(allow_non_fake_inputs=True):
        sim.fake_weights(net, torch.float32, trainable="" if grad else None)
        x = torch.empty(4096, 1024, device="meta")
        kept = []
        r = sim._measure([*net.parameters(), x, x, net[0].weight.t()], lambda: kept.append(net(x)))
        kept.clear()
    return r


@pytest.mark.parametrize("depth", [4, 20])
def test_peak_counts_each_storage_once_and_frees_it(sim, depth):
    # resident: the weights (4 MiB + 4 KiB each) and the input (16 MiB), counted once
    r = _chain(sim, depth, grad=False)
    assert r["weights"] == depth * (1024 * 1024 + 1024) * 4 + 16 * MiB
    # without grad a layer's output dies when the next one's is made: two at a time, at any depth
    # (a view of a weight, the transpose inside Linear, is not a new allocation)
    assert r["peak"] - r["weights"] == 2 * 16 * MiB
    assert r["end"] == r["weights"] + 16 * MiB  # every storage freed but the output the lambda kept
    # with grad every Linear and GELU output is kept for the backward
    g = _chain(sim, depth, grad=True)
    assert g["peak"] - g["weights"] == 2 * depth * 16 * MiB


def test_fused_attention_keeps_no_attention_matrix(sim):
    sdpa = torch.nn.functional.scaled_dot_product_attention
    peaks = {}
    for kind in ("math", "fused"):
        with FakeTensorMode(allow_non_fake_inputs=True), sim.attention(kind):
            q = torch.empty(1, 8, 4096, 64, device="meta", dtype=torch.float16)
            out = []
            r = sim._measure(
                [q],
                lambda q=q, out=out: out.append(torch.nn.functional.scaled_dot_product_attention(q, q, q)),
            )
            assert out[0].shape == q.shape and out[0].dtype == q.dtype
        peaks[kind] = r["peak"] - r["weights"]
    matrix = 8 * 4096 * 4096 * 2
    assert peaks["math"] >= matrix  # the reference path materialises the 8 x 4096 x 4096 scores
    assert peaks["fused"] < matrix / 16
    assert torch.nn.functional.scaled_dot_product_attention is sdpa  # restored


@pytest.mark.e2e
def test_the_simulation_checkpoints_as_finetune_does(sim):
    """finetune.training_models checkpoints the UNet and the VAE; so do the simulated models."""
    m = sim.meta_models(lora=True, checkpointing=True)
    for name in ("unet", "vae"):
        flags = [
            mod.gradient_checkpointing for mod in m[name].modules() if hasattr(mod, "gradient_checkpointing")
        ]
        assert flags and all(flags), name
    off = sim.meta_models(lora=True, checkpointing=False)
    assert not any(getattr(mod, "gradient_checkpointing", False) for mod in off["unet"].modules())


@pytest.mark.e2e
def test_paper_step_at_a_small_size(sim):
    """The project's own training step (alpha 1) at SDXL's full architecture, 512 px: checkpointing lowers
    the peak and recomputes the forward; the resident weights are SDXL's and POSTER's."""
    r = {ck: sim.train_step(1.0, ck, "fused", 512, 1) for ck in (False, True)}
    resident = r[False]["weights"]
    # the published parameter counts (tests/test_sdxl_shapes.py) in their dtypes, LoRA + Adam's moments
    fp16 = 2_567_463_684 + 123_060_480 + 694_659_840
    fp32 = 83_653_863 + 3 * 5_806_080
    assert fp16 * 2 + fp32 * 4 < resident < fp16 * 2 + fp32 * 4 + 0.35 * 2**30  # + POSTER, buffers, inputs
    assert resident < r[True]["peak"] < r[False]["peak"]
    assert r[True]["flops"] > r[False]["flops"] > 0


def test_flops_are_split_by_the_dtype_they_run_in(sim):
    """The GPU-hours price fp32 work (VAE, POSTER) at the tf32 peak and fp16 work at the fp16 one."""
    with torch.device("meta"):
        a, b = torch.nn.Linear(256, 256), torch.nn.Linear(256, 256)
    with FakeTensorMode(allow_non_fake_inputs=True):
        sim.fake_weights(a, torch.float16)
        sim.fake_weights(b, torch.float32)
        x = torch.empty(64, 256, device="meta", dtype=torch.float16)
        r = sim._measure([x], lambda: b(a(x).float()))
    per_linear = 2 * 64 * 256 * 256
    assert r["flops"] == 2 * per_linear and r["fp32"] == per_linear


def test_gpu_hours_follow_from_the_flops_and_the_counts(sim):
    """gpu_plan and the page's hours from made-up results: the arithmetic, not the simulation."""
    r = {"weights": 0, "peak": 2**30, "fp32": 0}
    results = {
        ("train", a, ck): {**r, "flops": (2e12 if a else 1e12)} for a in (0.0, 1.0) for ck in (False, True)
    }
    results[("denoise",)] = {**r, "flops": 4e12}  # one CFG call for a batch of 4 images
    results[("decode",)] = {**r, "flops": 1e12, "fp32": 1e12}
    for key in list(results):
        results[key + ("math",)] = results[key + ("fused",)] = results[key]
    counts = {"px": 1024, "train_batch": 1, "gen_batch": 4, "steps": 50, "alpha": 1.0, "checkpointing": True,
              "train_images": 1080, "epochs": 8, "rows": 13230}  # fmt: skip
    plan = {work: (f16, f32) for work, f16, f32, _ in sim.gpu_plan(results, counts)}
    assert plan["finetune (alpha 1)"] == (1080 * 8 * 2e12, 0)
    assert plan["ablation finetune (alpha 0)"] == (1080 * 8 * 1e12, 0)
    assert plan["generate: fine-tuned + baseline"] == (2 * 13230 * 50 * 1e12, 2 * 13230 * 1e12)
    page = sim.page(results, counts, utilisation=0.5, overhead=1.0, seconds=1)
    a6000_fp16, a6000_tf32 = sim.GPUS["RTX A6000 (48 GB)"]
    hours = (1080 * 8 * 2e12 / a6000_fp16) / 0.5 / 3600
    assert f"| finetune (alpha 1) | 1,080 images x 8 epochs | 17 (0%) | {hours:,.1f} |" in page
