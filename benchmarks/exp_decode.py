"""A leaner expression loss: what `finetune.<profile>.exp_decode` (full, half, crop) costs and does (#23).

Three measurements, each recorded in benchmarks/exp_decode/ and shown in its table.md:

- `--simulate`: one fine-tuning step of the paper profile at SDXL's real shapes (1024 px, fp16 UNet,
  alpha 1, fused attention; gradient checkpointing off and on) for each choice, with
  `sdxl_simulated.train_step` (fake tensors): peak memory and FLOPs. Simulated, as docs/gpu-plan.md is.
- `--gradients N`: on the world (the default run's models, split and trained LoRA), N micro-batches drawn
  exactly as training draws them. Per batch, the LoRA's gradient of L_exp under each lean choice against
  the full decode's: cosine per batch (mean with a 95% bootstrap CI) and the cosine of the summed
  gradients (the direction the steps add up to); also of the total loss L_dm + L_exp. Then the CPU step
  time of each choice (forward, backward; median of `--steps`).
- `--evidence`: the default run's training, rendering and Table 1 with each choice: the LoRA trained with
  it (validation off), the default run's prompt rows rendered by generate's own code, and evaluate's
  Table 1 and recognition against the run's own baseline, with CIs; the evidence holds when the Exp.
  difference CI lies below 0 and the recognition difference CI above 0.

Reads a finished default run (`--outputs`, e.g. a fresh clone's outputs/ after `make repro`). Timed: run
it alone (one torch job).

Run: .venv/bin/python benchmarks/exp_decode.py --outputs /tmp/repro/outputs --simulate
         .venv/bin/python benchmarks/exp_decode.py --outputs /tmp/repro/outputs --gradients 200 --evidence
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import provenance  # noqa: E402  (benchmarks/, on the path above)

RESULTS = ROOT / "benchmarks/exp_decode"
CHOICES = ("full", "half", "crop")


def simulate() -> dict:
    import sdxl_simulated as sim

    sim._meta_autocast()  # the step opens autocast on the meta device, as sdxl_simulated's main allows
    counts = sim.paper_counts()
    out = {"px": counts["px"], "batch": counts["train_batch"], "cases": []}
    for checkpointing in (False, True):
        for how in CHOICES:
            t = time.time()
            r = sim.train_step(1.0, checkpointing, "fused", counts["px"], counts["train_batch"], how)
            out["cases"].append({"exp_decode": how, "checkpointing": checkpointing, **r})
            print(f"  simulated {how}, checkpointing {checkpointing}: {time.time() - t:.0f} s", flush=True)
    return out


def _world(outputs: Path):
    """The default run's models with its trained LoRA loaded into trainable peft layers."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    from geneava.core import config
    from geneava.stages import finetune

    b = config.blocks("models", "prompts", "finetune", "prepare", profile="default")
    pipe, encoder = finetune.training_models(b["models"], b["prompts"], b["finetune"], torch.device("cpu"))
    state, _ = StableDiffusionXLPipeline.lora_state_dict(str(outputs / "finetune" / "lora"))
    unet_state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    set_peft_model_state_dict(pipe.unet, convert_unet_state_dict_to_peft(unet_state))
    back = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    if back.keys() != unet_state.keys() or any(not torch.equal(back[k], unet_state[k]) for k in back):
        raise SystemExit("the run's LoRA did not load into the training layers unchanged")
    return b, pipe, encoder


def _ci(values, seed: int = 0) -> dict:
    import numpy as np

    v = np.asarray(values, dtype=float)
    boot = np.random.default_rng(seed).choice(v, (2000, len(v))).mean(1)
    return {
        "mean": float(v.mean()),
        "lo": float(np.quantile(boot, 0.025)),
        "hi": float(np.quantile(boot, 0.975)),
    }


def gradients(outputs: Path, batches: int, steps: int) -> dict:
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from geneava.core.images import load_images
    from geneava.networks import models
    from geneava.stages import finetune, objective

    b, pipe, encoder = _world(outputs)
    params, res = b["finetune"], b["prepare"]["resolution"]
    sched, dev = models.training_scheduler(pipe), torch.device("cpu")
    lora = [p for p in pipe.unet.parameters() if p.requires_grad]
    data = {}
    for how in ("full", "crop"):  # full and half embed the real images whole, crop their window
        rows, caption_of, emb, pooled, real = finetune.training_data(
            pipe, encoder, b["prompts"], outputs / "prepare", res, {**params, "exp_decode": how}, dev
        )
        data[how] = real
    data["half"] = data["full"]
    paths, seed, bs = list(rows["path"]), params["seed"], params["batch_size"]
    order = [bt for e in range(100) for bt in finetune.epoch_batches(len(paths), bs, seed, e, 0, 1)][:batches]

    def losses(micro, batch, how):
        idx = torch.tensor(batch)
        return objective.losses_for_batch(
            pipe.unet, pipe.vae, encoder, sched, load_images([paths[i] for i in batch], res),
            emb[caption_of[idx]], pooled[caption_of[idx]], data[how][idx], params["alpha"], res,
            finetune.micro_generator(seed, micro, 0, dev),
            exp_decode=how, exp_crop=params["exp_crop"],
        )  # fmt: skip

    flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
    cos = {f"{how} {term}": [] for how in CHOICES[1:] for term in ("exp", "total")}
    sums = {f"{how} {term}": 0 for how in CHOICES for term in ("exp", "total")}
    for micro, batch in enumerate(tqdm(order, desc="gradients", unit="batch")):
        g = {}
        for how in CHOICES:
            _, loss_dm, loss_exp = losses(micro, batch, how)
            g[f"{how} exp"] = flat(torch.autograd.grad(loss_exp, lora, retain_graph=how == "full"))
            if how == "full":
                g_dm = flat(torch.autograd.grad(loss_dm, lora))  # the same for every choice (same draws)
            g[f"{how} total"] = g_dm + params["alpha"] * g[f"{how} exp"]
        for k in sums:
            sums[k] = sums[k] + g[k]
        for k in cos:
            cos[k].append(F.cosine_similarity(g[k], g[k.replace(k.split()[0], "full")], dim=0).item())
    out = {
        "batches": batches,
        "batch_size": bs,
        "resolution": res,
        "per_batch_cosine": {},
        "summed_cosine": {},
    }
    for k in cos:
        out["per_batch_cosine"][k] = _ci(cos[k])
        full = sums[k.replace(k.split()[0], "full")]
        out["summed_cosine"][k] = F.cosine_similarity(sums[k], full, dim=0).item()
    out["step_seconds"] = {}
    for how in CHOICES:  # timed apart from the gradient loop: forward and one backward of L
        times = []
        for micro, batch in enumerate(order[: steps + 2]):
            t = time.perf_counter()
            losses(micro, batch, how)[0].backward()
            pipe.unet.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
        out["step_seconds"][how] = sorted(times[2:])[len(times[2:]) // 2]
    return out


def evidence(outputs: Path, work: Path) -> dict:
    from safetensors.torch import load_file

    from geneava.core import config
    from geneava.core.io import sha256_file
    from geneava.stages import evaluate, finetune, generate

    b = config.blocks("models", "prompts", "finetune", "prepare", "generate", "evaluate", profile="default")
    run_lora = outputs / "finetune" / "lora" / finetune.LORA_FILE
    out = []
    for how in CHOICES:
        here = work / how
        params = {**b["finetune"], "exp_decode": how, "validation_every": None, "resume": False}
        t = time.perf_counter()
        finetune.finetune(
            b["models"],
            b["prompts"],
            params,
            outputs / "prepare",
            here / "finetune",
            b["prepare"]["resolution"],
        )
        seconds = time.perf_counter() - t
        lora = here / "finetune" / "lora"
        m = generate.generate(b["models"], b["prompts"], b["generate"], here / "generate" / "finetuned", lora)
        variants = {
            "finetuned": here / "generate" / "finetuned",
            "baseline": outputs / "generate" / "baseline",
        }
        ev = evaluate.evaluate(
            b["models"], b["evaluate"], outputs / "prepare", None, here / "evaluate", variants=variants,
            cache_dir=work / "embeddings",
        )["result"]  # fmt: skip
        diff, rec = ev["per_class_pairs"]["difference"], ev["recognition"]["difference"]
        out.append({
            "exp_decode": how,
            "finetune_seconds": seconds,
            "same_lora_as_run": sha256_file(lora / finetune.LORA_FILE) == sha256_file(run_lora),
            "qc_kept": int((m["qc"] == "pass").sum()),
            "rows": len(m),
            "difference": {k: diff[k] for k in ("exp", "clip", "dino", "lpips")},
            "recognition_difference": rec,
            "holds": diff["exp"]["hi"] < 0 and rec["lo"] > 0,
        })  # fmt: skip
        print(json.dumps(out[-1]), flush=True)
    # kohya's cache_latents at the stage's scale: the full decode's training again, latents cached
    params = {**b["finetune"], "cache_latents": True, "validation_every": None, "resume": False}
    t = time.perf_counter()
    finetune.finetune(
        b["models"], b["prompts"], params, outputs / "prepare", work / "cached", b["prepare"]["resolution"]
    )
    cached = {"finetune_seconds": time.perf_counter() - t}
    a, c = (load_file(d / "lora" / finetune.LORA_FILE) for d in (work / "full" / "finetune", work / "cached"))
    cached["lora_max_abs_difference"] = max(float((a[k] - c[k]).abs().max()) for k in a)
    print(json.dumps(cached), flush=True)
    return {"settings": out, "cached_latents": cached}


def table(record: dict) -> str:
    def ci(d: dict, digits: int = 3, scale: float = 1) -> str:
        m, lo, hi = (scale * d[k] for k in ("mean", "lo", "hi"))
        return f"{m:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"

    lines = [
        "# exp_decode: full, half or crop (generated)",
        "",
        "<!-- Generated by benchmarks/exp_decode.py: do not edit. -->",
        "",
        f"Commit {record['commit']}, {record['cpus']} CPUs. What each choice decodes:"
        " geneava/stages/objective.py.",
    ]
    if "simulated" in record:
        s = record["simulated"]
        lines += [
            "",
            f"## At SDXL's size, simulated ({s['date']}; {s['px']} px, batch {s['batch']}, alpha 1, fused"
            " attention)",
            "",
            "One fine-tuning step as `benchmarks/sdxl_simulated.py` runs it (fake tensors, not a GPU).",
            "",
            "| exp_decode | grad. checkpointing | peak (GiB) | TFLOPs | TFLOPs in fp32 |",
            "|---|---|---|---|---|",
        ]
        for c in s["cases"]:
            lines.append(
                f"| {c['exp_decode']} | {'on' if c['checkpointing'] else 'off'} | {c['peak'] / 2**30:.1f} "
                f"| {c['flops'] / 1e12:.1f} | {c['fp32'] / 1e12:.1f} |"
            )
    if "gradients" in record:
        g = record["gradients"]
        lines += [
            "",
            f"## On the world: gradients and step time ({g['date']})",
            "",
            f"The default run's models, split and trained LoRA; {g['batches']} micro-batches of"
            f" {g['batch_size']} at {g['resolution']} px, drawn as training draws them. Cosine of the LoRA's"
            " gradient under the lean choice with the full decode's: per batch (mean, 95% bootstrap CI)"
            " and of the gradients summed over all batches.",
            "",
            "| exp_decode | gradient of | cosine per batch | cosine of the sums |",
            "|---|---|---|---|",
        ]
        for k, v in sorted(g["per_batch_cosine"].items(), key=lambda kv: CHOICES.index(kv[0].split()[0])):
            how, term = k.split()
            name = "L_exp" if term == "exp" else "L = L_dm + L_exp"
            lines.append(f"| {how} | {name} | {ci(v)} | {g['summed_cosine'][k]:+.3f} |")
        full = g["step_seconds"]["full"]
        steps = ", ".join(
            f"{h} {1000 * g['step_seconds'][h]:.0f} ms (x{g['step_seconds'][h] / full:.2f})" for h in CHOICES
        )
        lines += ["", f"CPU step (forward and backward, median): {steps}."]
    if "evidence" in record:
        e = record["evidence"]
        lines += [
            "",
            f"## On the world: the default run's evidence with each choice ({e['date']})",
            "",
            "The LoRA trained with the choice (the default run's split and settings, validation off), the"
            " run's prompt rows rendered with it, Table 1 and recognition against the run's own baseline"
            " (fine-tuned - baseline, 95% bootstrap CIs). Holds: Exp. CI below 0 and recognition CI above 0.",
            "",
            "| exp_decode | finetune (s) | QC kept | Exp. | CLIP | recognition (points) | holds"
            " | LoRA = the run's |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in e["settings"]:
            d = r["difference"]
            lines.append(
                f"| {r['exp_decode']} | {r['finetune_seconds']:.0f} | {r['qc_kept']} of {r['rows']} "
                f"| {ci(d['exp'])} | {ci(d['clip'], 4)} | {ci(r['recognition_difference'], 1, 100)} "
                f"| {'yes' if r['holds'] else 'no'} | {'yes' if r['same_lora_as_run'] else 'no'} |"
            )
        if "cached_latents" in e:
            c, full = e["cached_latents"], e["settings"][0]["finetune_seconds"]
            d = c["lora_max_abs_difference"]
            same = (
                "is the encoded run's, bit for bit"
                if d == 0
                else f"differs from the encoded run's by at most {d:.1e} (the encoder sees other batches)"
            )
            lines += [
                "",
                f"Cached latents (`cache_latents: true`, full decode): finetune {c['finetune_seconds']:.0f} s"
                f" (x{c['finetune_seconds'] / full:.2f} of the encoded run's); the LoRA {same}.",
            ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--outputs", type=Path, help="a finished default run's outputs/ (--gradients, --evidence)"
    )
    ap.add_argument("--simulate", action="store_true", help="SDXL's size on fake tensors")
    ap.add_argument("--gradients", type=int, default=0, metavar="N", help="N micro-batches on the world")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per choice (--gradients)")
    ap.add_argument("--evidence", action="store_true", help="train, render and evaluate with each choice")
    ap.add_argument("--work", type=Path, default=Path("/tmp/exp-decode"), help="LoRAs and renders go here")
    args = ap.parse_args(argv)
    from geneava.core.io import atomic_write_text, write_json

    if (args.gradients or args.evidence) and not (
        args.outputs and (args.outputs / "finetune" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    ):
        raise SystemExit(f"--outputs {args.outputs}: not a finished default run's outputs/ (run make repro)")
    record = json.loads((RESULTS / "record.json").read_text()) if (RESULTS / "record.json").is_file() else {}
    today = date.today().isoformat()
    if args.simulate:
        record["simulated"] = {"date": today, **simulate()}
    if args.gradients:
        record["gradients"] = {"date": today, **gradients(args.outputs, args.gradients, args.steps)}
    if args.evidence:
        record["evidence"] = {"date": today, **evidence(args.outputs, args.work)}
    record.update(commit=provenance.commit(), cpus=os.cpu_count())
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "record.json", record)
    atomic_write_text(RESULTS / "table.md", table(record))
    print(table(record))


if __name__ == "__main__":
    main()
