"""Benchmark: cost of the expression loss, and what cached latents save, per training step on the tiny
SDXL + tiny POSTER.

Runs each setting in its own process (so peak memory is that setting's own) and prints step time
and peak RSS for alpha = 0 (diffusion loss only) and alpha = 1 (plus decode + POSTER + backward
through both), each with the VAE encode in the step and with cached latents (`cache_latents`: the
latent drawn from moments encoded once), and the ratios.
Usage: python benchmarks/finetune_step.py [--steps 30] [--batch 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
from geneava.core import config, prompts
from geneava.networks import models
from geneava.stages import finetune, objective
alpha, steps, batch, res = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cache = sys.argv[5] == "cached"
torch.manual_seed(0)
p = config.load_params()
pipe = models.sdxl_pipeline("tiny", seed=0, corpus=prompts.vocabulary(p["prompts"]["default"]))
finetune.prepare_for_training(pipe, rank=4)
encoder = models.expression_encoder("tiny", 0)
sched = models.training_scheduler(pipe)
with torch.no_grad():
    emb, _, pooled, _ = pipe.encode_prompt(["a face of rage"] * batch, device="cpu",
                                           do_classifier_free_guidance=False)
pixels = torch.rand(batch, 3, res, res) * 2 - 1
real = encoder.embed(pixels).detach()
with torch.no_grad():
    moments = pipe.vae.encode(pixels).latent_dist.parameters if cache else None
opt = torch.optim.AdamW([q for q in pipe.unet.parameters() if q.requires_grad], lr=1e-4)
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
for i in range(steps + 3):
    t0 = time.perf_counter()
    loss = objective.losses_for_batch(pipe.unet, pipe.vae, encoder, sched, None if cache else pixels, emb,
                                     pooled, real, alpha, res, torch.Generator().manual_seed(i), moments)[0]
    loss.backward(); opt.step(); opt.zero_grad()
    if i >= 3:  # warm-up steps are not timed
        times.append(time.perf_counter() - t0)
times.sort()
print(json.dumps({"median_s": times[len(times) // 2], "peak_rss_mb": resource.getrusage(
    resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_loop_mb": base_rss / 1024}))
"""


def measure(alpha: float, steps: int, batch: int, res: int, mode: str = "encoded") -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(alpha), str(steps), str(batch), str(res), mode],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=64)
    args = ap.parse_args()
    runs = {(a, m): measure(a, args.steps, args.batch, args.resolution, m) for a in (0.0, 1.0)
            for m in ("encoded", "cached")}  # fmt: skip
    print(
        f"tiny SDXL + tiny POSTER, batch {args.batch}, {args.resolution}px, "
        f"median of {args.steps} steps (CPU)"
    )
    print(f"{'':20s} {'step (ms)':>10s} {'peak RSS (MB)':>14s}")
    for (a, m), r in runs.items():
        print(f"{f'alpha={a:g}, {m}':20s} {1000 * r['median_s']:10.1f} {r['peak_rss_mb']:14.0f}")
    r0, r1 = runs[(0.0, "encoded")], runs[(1.0, "encoded")]
    print(
        f"expression-loss overhead: step time x{r1['median_s'] / r0['median_s']:.2f}, "
        f"peak RSS x{r1['peak_rss_mb'] / r0['peak_rss_mb']:.2f}"
    )
    for a in (0.0, 1.0):
        saved = runs[(a, "cached")]["median_s"] / runs[(a, "encoded")]["median_s"]
        print(f"cached latents, alpha={a:g}: step time x{saved:.2f} of the encoded step")


if __name__ == "__main__":
    main()
