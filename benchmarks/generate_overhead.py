"""Benchmark: the project's generator against bare diffusers pipeline calls, same batches.

Both sides build the tiny SDXL + LoRA the same way and render the same rows with the same per-row
generators at the same batch size; the project's side adds what makes it a tool (per-image atomic
writes, sha256, JSON records, the manifest, resumability), with QC off so that only that overhead
is measured. Usage: python benchmarks/generate_overhead.py [--rows 32] [--batch 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from geneava.core import config, prompts
from geneava.networks import models
from geneava.stages import finetune, generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    p = config.load_params()
    model_p, prompt_p = p["models"]["default"], p["prompts"]["default"]
    gen_p = {**p["generate"]["default"], "qc": False, "limit": args.rows, "batch_size": args.batch}

    with tempfile.TemporaryDirectory() as tmp:
        # a LoRA to load, as the real stage does
        pipe = models.sdxl_pipeline("tiny", seed=0, corpus=prompts.vocabulary(prompt_p))
        finetune.prepare_for_training(pipe, rank=4)
        lora_dir = Path(tmp) / "lora"
        finetune.save_lora(pipe.unet, lora_dir)

        def bare() -> float:
            t0 = time.perf_counter()
            pipe = generate.build_pipeline(model_p, prompt_p, gen_p, lora_dir, "cpu")
            rows = generate.select_rows(prompts.prompt_table(prompt_p, seed=gen_p["seed"]), args.rows)
            for i in range(0, len(rows), args.batch):
                batch = rows.iloc[i : i + args.batch]
                generate.render(pipe, batch, list(batch["seed"]), gen_p)
            return time.perf_counter() - t0

        def project(k: int) -> float:
            t0 = time.perf_counter()
            generate.generate(model_p, prompt_p, gen_p, Path(tmp) / f"out{k}", lora_dir)
            return time.perf_counter() - t0

        torch.manual_seed(0)
        bare(), project(-1)  # warm-up: imports, allocator, caches
        # interleaved, so both sides see the same machine state (frequency, caches, other load)
        pairs = [(bare(), project(k)) for k in range(args.repeats)]
        t_bare = statistics.median(b for b, _ in pairs)
        t_proj = statistics.median(p for _, p in pairs)

    print(
        f"tiny SDXL + LoRA, {args.rows} images, batch {args.batch}, {gen_p['steps']} steps, "
        f"{gen_p['resolution']}px, CPU, median of {args.repeats}"
    )
    print(f"bare diffusers calls : {args.rows / t_bare:7.2f} images/s")
    print(f"geneava generate()   : {args.rows / t_proj:7.2f} images/s")
    print(f"overhead             : {100 * (t_proj / t_bare - 1):+.1f}%")


if __name__ == "__main__":
    main()
