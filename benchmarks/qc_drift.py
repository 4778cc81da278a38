"""How the fine-tuned world model's framing drifts with training: why the 100% rehearsal stopped (issue 20).

Trains the LoRA on a rehearsal run's fine-tuning split (`<run>/outputs/prepare`) with the rehearsal's
settings (rehearsal.overrides: the default profile's world, the paper's 8 epochs) and the given alpha,
keeping a checkpoint every `--every` steps. Then it renders one stratified prompt sample (`--per-race`
rows of each race from the full 13,230-row table, the same rows and seeds at every step) with the base
model (step 0) and each checkpoint, and runs generate's QC on every image: the first attempt, no
retries. Per step it records the QC failure rate with a 95% Wilson interval, the failures by race, and
the detected face's mean height, vertical centre and smallest margin to the frame (px): the drift that
QC only reacts to once a face crosses the frame's edge.

Writes benchmarks/rehearsal/qc-drift/alpha<alpha>.json; `--detector` instead checks the QC detector on
procedural faces of known size, per race (detector.json). `rehearsal.py --page` shows both in
docs/rehearsal.md. One torch job: run it alone.

Run: .venv/bin/python benchmarks/qc_drift.py --run /tmp/reh100 --alpha 1 [--every 270] [--per-race 140]
     .venv/bin/python benchmarks/qc_drift.py --detector [--per-race 300]
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import provenance  # noqa: E402  (benchmarks/, on the path above)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def params_file(alpha: float, every: int, steps: int, folder: Path) -> Path:
    """params.yaml with the rehearsal's overrides, this alpha, and checkpoints every `every` steps kept."""
    import rehearsal
    import yaml

    from geneava.core import config

    over = rehearsal.overrides(1.0, None, steps) | {
        "finetune.default.alpha": alpha,
        "finetune.default.checkpoint_every": every,
        "finetune.default.checkpoints_total_limit": 1000,
        "finetune.default.validation_every": None,  # images of their own are not needed here
    }
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(rehearsal.apply(config.read_yaml(ROOT / "params.yaml"), over)))
    return path


def measure(frame, pipe, detector, gen: dict):
    """(QC verdict, face height, centre y, margin) of each row's first attempt."""
    import numpy as np

    from geneava.stages import generate, qc

    out = []
    size = gen["resolution"]
    for i in range(0, len(frame), gen["batch_size"]):
        chunk = frame.iloc[i : i + gen["batch_size"]]
        for im in generate.render(pipe, chunk, [int(s) for s in chunk["seed"]], gen):
            faces = detector.detect(np.asarray(im))
            verdict = qc.check(faces, size, size, gen["qc_border"]) or "pass"
            if len(faces) == 1:
                x0, y0, x1, y1 = faces[0].box
                out.append((verdict, y1 - y0, (y0 + y1) / 2, min(x0, y0, size - x1, size - y1)))
            else:
                out.append((verdict, math.nan, math.nan, math.nan))
    return out


def summary(frame, found) -> dict:
    import pandas as pd

    d = frame.assign(**dict(zip(("qc", "h", "cy", "margin"), zip(*found, strict=True), strict=True)))
    failed = d[d["qc"] != "pass"]
    lo, hi = wilson(len(failed), len(d))
    return {
        "n": len(d),
        "failed": len(failed),
        "rate": len(failed) / len(d),
        "ci95": [lo, hi],
        "by_race": {r: int(n) for r, n in failed["race"].value_counts().sort_index().items()},
        "by_verdict": {v: int(n) for v, n in failed["qc"].value_counts().items()},
        "face_height": float(pd.Series(d["h"]).mean()),
        "face_centre_y": float(pd.Series(d["cy"]).mean()),
        "margin": float(pd.Series(d["margin"]).mean()),
    }


def detector_check(per_race: int, size: int, seed: int = 0) -> dict:
    """The QC detector on procedural faces of known size (the world's renderer, centred, 0.8-1.15 of the
    frame): per race, the detected box's width over the true one, and how often QC calls a face too close
    whose true box lies inside the frame. A detector that drew darker faces wider would show it here."""
    import numpy as np
    from PIL import Image

    from geneava.core import config, emo135
    from geneava.networks.faces import face_detector
    from geneava.stages import qc
    from geneava.world import standin

    gen = config.blocks("generate", profile="default")["generate"]
    detector = face_detector(gen["detector"], gen["detector_root"], gen["detector_pack"])
    rng, classes, out = np.random.default_rng([53, seed]), emo135.classes(), {}
    for race in sorted(standin.RACES):
        ratio, false_close, inside = [], 0, 0
        for _ in range(per_race):
            c = classes[int(rng.integers(len(classes)))]
            a = {
                **standin.sample_identity(rng, race=race),
                **standin._expression_dict(standin.class_expression(c)),
            }
            side = round(size * rng.uniform(0.8, 1.15))
            off = (size - side) // 2
            canvas = Image.new("RGB", (size, size), standin.BACKGROUND)
            canvas.paste(standin.render_face(a, side), (off, off))
            box, _ = standin.landmarks(a)
            x0, y0, x1, y1 = (off + v * side for v in box)
            faces = detector.detect(np.asarray(canvas))
            if len(faces) == 1:
                ratio.append((faces[0].box[2] - faces[0].box[0]) / (x1 - x0))
            if min(x0, y0) >= 0 and max(x1, y1) <= size:
                inside += 1
                false_close += qc.check(faces, size, size, gen["qc_border"]) == "face too close"
        out[race] = {"width_ratio": float(np.mean(ratio)), "too_close_when_inside": false_close / inside}
    return {"per_race": per_race, "size": size, "by_race": out}


def main(argv: list[str] | None = None) -> None:
    import rehearsal

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a rehearsal run folder (its outputs/prepare)")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--every", type=int, default=270, help="training steps between checkpoints")
    ap.add_argument("--per-race", type=int, default=140, help="sampled prompt rows per race")
    ap.add_argument("--steps", type=int, default=rehearsal.STEPS, help="sampling steps")
    ap.add_argument("--work", type=Path, default=None, help="folder for the LoRA and checkpoints")
    ap.add_argument("--detector", action="store_true", help="only the detector check (detector.json)")
    args = ap.parse_args(argv)
    if args.detector:
        from geneava.core.io import write_json

        (rehearsal.RESULTS / "qc-drift").mkdir(parents=True, exist_ok=True)
        write_json(rehearsal.RESULTS / "qc-drift" / "detector.json", detector_check(args.per_race, 64))
        return

    import pandas as pd
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    from geneava.core import config, prompts
    from geneava.core.io import sha256_file, write_json
    from geneava.networks.faces import face_detector
    from geneava.stages import finetune, generate

    if args.run is None:
        raise SystemExit("--run: the rehearsal run folder whose fine-tuning split to train on")
    prepare_dir = args.run / "outputs" / "prepare"
    if not (prepare_dir / "data" / "manifest.csv").is_file():
        raise SystemExit(f"{prepare_dir} holds no prepared split: pass a rehearsal run folder (--run)")
    work = args.work or Path(tempfile.gettempdir()) / f"qc-drift-alpha{args.alpha:g}"
    with tempfile.TemporaryDirectory() as tmp:
        stamp = params_file(args.alpha, args.every, args.steps, Path(tmp)).read_text()
    stamp += sha256_file(prepare_dir / "data" / "manifest.csv")
    if (work / "stamp.txt").is_file() and (work / "stamp.txt").read_text() != stamp:
        shutil.rmtree(work)  # checkpoints of other settings or data: this benchmark's own folder
    work.mkdir(parents=True, exist_ok=True)
    (work / "stamp.txt").write_text(stamp)
    pf = params_file(args.alpha, args.every, args.steps, work)
    sp = finetune.stage_params("default", pf)
    lora_file = work / "lora" / "pytorch_lora_weights.safetensors"
    # resumes from the newest checkpoint of these settings (the stage's own rule)
    finetune.finetune(**sp, prepare_dir=prepare_dir, out_dir=work)

    b = config.blocks("models", "prompts", "generate", profile="default", path=pf)
    gen = b["generate"]
    table = prompts.prompt_table(b["prompts"], None, gen["seed"])
    frame = pd.concat(
        [g.sample(args.per_race, random_state=0) for _, g in table.groupby("race", sort=True)]
    ).reset_index(drop=True)
    detector = face_detector(gen["detector"], gen["detector_root"], gen["detector_pack"])
    trainer, _ = finetune.training_models(b["models"], b["prompts"], sp["params"], torch.device("cpu"))
    checkpoints = sorted((work / "checkpoints").glob("step-*"))
    points = [(0, None)] + [(int(c.name[5:]), c) for c in checkpoints]
    total = int(pd.read_csv(work / "loss.csv")["step"].max())
    if points[-1][0] != total:
        points.append((total, None))
    rows = []
    for step, ckpt in tqdm(points, desc="qc drift", unit="checkpoint"):
        lora = None
        if ckpt is not None:
            set_peft_model_state_dict(trainer.unet, load_file(ckpt / "lora.safetensors"))
            lora = finetune.save_lora(trainer.unet, work / f"lora-{step:06d}").parent
        elif step:
            lora = lora_file.parent
        pipe = generate.build_pipeline(b["models"], b["prompts"], gen, lora, torch.device("cpu"))
        pipe.set_progress_bar_config(disable=True)
        rows.append({"step": step, **summary(frame, measure(frame, pipe, detector, gen))})
        print(step, {k: rows[-1][k] for k in ("rate", "face_height", "margin")}, flush=True)

    run_lora = args.run / "outputs" / "finetune" / "lora" / "pytorch_lora_weights.safetensors"
    record = {
        "date": date.today().isoformat(),
        "commit": provenance.commit(),
        "alpha": args.alpha,
        "lr": sp["params"]["lr"],
        "train_steps": total,
        "sampling_steps": args.steps,
        "rows": len(frame),
        "per_race": args.per_race,
        "lora_sha256": sha256_file(lora_file),
        "same_lora_as_run": run_lora.is_file() and sha256_file(run_lora) == sha256_file(lora_file),
        "points": rows,
    }
    out = rehearsal.RESULTS / "qc-drift" / f"alpha{args.alpha:g}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, record)
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
