"""The paper's counts through the whole DAG, with the world's small models: a rehearsal of the paper
profile's run (issue 20) on a CPU.

Every count of the paper: 8 fine-tuning + 50 evaluation images per class (from a procedural stand-in
with 64 per class), 8 epochs, 135 x 98 = 13,230 prompts rendered by the fine-tuned model, the baseline
and the ablation, QC and refill keeping 98 per expression, Table 1 over all of them, the memorization
audit against 10,177 procedural reference identities (CelebA's count, in CelebA's layout), and a strictly
balanced release of 13,230 avatar/face pairs. What keeps it to CPU-hours: the default profile's world
models at 64 px and fewer sampling steps. `--fraction 0.1` runs the same with every tenth of the work
(14 of the 135 expressions: their 98 rows each, 1,018 reference identities).

It runs as a DVC experiment (`dvc exp run -S key=value ...`, the overrides below) in a clone of this
repository, so the workspace's own outputs are left alone; the clone imports its own code (PYTHONPATH).
Per stage it records the wall time (papermill's duration of the executed notebook) and the peak RSS of
the stage's process tree (sampled every second); the run's counts come from the stages' metrics files.
Each run writes benchmarks/rehearsal/<percent>.json (a run that stops,
<percent>-<steps>steps-<commit>-failed.json: a finding too); --page renders docs/rehearsal.md from all
of them.

Run: .venv/bin/python benchmarks/rehearsal.py --fraction 0.1 [--dir NEW_FOLDER] [--page]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks/rehearsal"
IDENTITIES = 10_177  # CelebA's identities (the paper's reference set)
PER_CLASS = 64  # stand-in images per class: 8 + 50, with room for the hard cases prepare drops
# sampling steps (the default profile renders at 10). At 4, prompts that the world's
# model draws too close at every seed left the strict release short (rehearsal/10-4steps-6f9a069-failed.json)
STEPS = 8
STAGES = ["prepare", "finetune", "generate", "evaluate", "memorization", "stylize", "ablation",
          "refill", "release", "userstudy"]  # fmt: skip
# what a run executes: two commits that agree on these ran the same pipeline (benchmarks and docs aside)
PIPELINE = ("geneava", "notebooks", "dvc.yaml", "params.yaml", "models/world")


def write_reference(root: Path, identities: int, size: int = 64, seed: int = 0) -> Path:
    """A procedural reference set in CelebA's layout: img_align_celeba/<6 digits>.png and
    identity_CelebA.txt (`name identity` per line), one face per identity with a random expression.
    Written into a temporary folder and moved into place, so an interrupted run leaves nothing half-made."""
    import numpy as np

    from geneava.core import emo135
    from geneava.world import standin

    final = Path(root)
    if (final / "identity_CelebA.txt").is_file():
        return final
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "img_align_celeba").mkdir(parents=True)
    classes = emo135.classes()
    lines = []
    for i in range(identities):
        rng = np.random.default_rng([seed, 977, i])
        expression = classes[int(rng.integers(len(classes)))]
        attrs = {**standin.sample_attributes(expression, 100_000 + i), **standin.sample_identity(rng)}
        name = f"{i + 1:06d}.png"
        standin.render_face(attrs, size).save(tmp / "img_align_celeba" / name)
        lines.append(f"{name} {i + 1}")
    (tmp / "identity_CelebA.txt").write_text("\n".join(lines) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def chosen_expressions(data: Path, fraction: float) -> list[str] | None:
    """The expressions a fraction of the work renders: the first classes prepare takes (its
    `classes: N` keeps the first N class folders in sorted order); None = all."""
    if fraction >= 1:
        return None
    folders = sorted(p.name for p in (data / "emo135").iterdir() if p.is_dir() and not p.name.startswith("."))
    return folders[: max(1, round(len(folders) * fraction))]


def training_steps(per_class: int, classes: int, epochs: int, batch_size: int) -> int:
    return epochs * math.ceil(per_class * classes / batch_size)


def world_lr(classes: int, params: dict) -> float:
    """The LoRA lr for the rehearsal's training length. The world's lr (finetune.default.lr) was set for
    the default profile's steps; at the paper's counts the LoRA trains four times as many, and at that
    lr it drew some cells degenerate at every seed (elderly White women with anger-family expressions:
    benchmarks/rehearsal/100-8steps-219e755-failed.json). So the rehearsal keeps the default's lr x steps
    (how far Adam can move the LoRA) and never raises the lr. The paper's own lr is set for SDXL."""
    f, p = params["finetune"]["default"], params["prepare"]["default"]
    default = training_steps(p["finetune_per_class"], p["classes"] or 135, f["epochs"], f["batch_size"])
    rehearsed = training_steps(8, classes, 8, f["batch_size"])
    return min(f["lr"], f["lr"] * default / rehearsed)


def overrides(fraction: float, expressions: list[str] | None, steps: int = STEPS) -> dict:
    """params.yaml keys (default profile) set for the rehearsal: the paper's counts."""
    from geneava.core import config

    lr = world_lr(len(expressions) if expressions else 135, config.read_yaml(ROOT / "params.yaml"))
    return {
        "prepare.default.source": "rehearsal-data/emo135",
        "prepare.default.finetune_per_class": 8,
        "prepare.default.eval_per_class": 50,
        "prepare.default.classes": len(expressions) if expressions else None,
        "finetune.default.epochs": 8,
        "finetune.default.lr": float(f"{lr:.3g}"),
        "generate.default.limit": None,
        "generate.default.expressions": expressions,
        "generate.default.steps": steps,
        "memorization.default.reference": "rehearsal-data/celeba/img_align_celeba",
        "memorization.default.reference_identities": "rehearsal-data/celeba/identity_CelebA.txt",
        "memorization.default.reference_limit": round(IDENTITIES * fraction) if fraction < 1 else None,
    }


def apply(params: dict, over: dict) -> dict:
    """`params` with the dotted keys of `over` set (what `dvc exp run -S` does to params.yaml)."""
    import copy

    out = copy.deepcopy(params)
    for dotted, value in over.items():
        *path, key = dotted.split(".")
        block = out
        for part in path:
            block = block[part]
        if key not in block:
            raise KeyError(f"{dotted}: no such key in params.yaml")
        block[key] = value
    return out


def check(params_file: Path, over: dict) -> dict:
    """params.yaml with the overrides applied, validated as every stage validates it."""
    from geneava.core import config

    return config.validate(apply(config.read_yaml(params_file), over))


def stage_of(cmdline: str) -> str | None:
    """The stage a process runs, from its command line (`papermill notebooks/NN_<stage>.ipynb ...`)."""
    if "papermill" not in cmdline:
        return None
    return next((s for s in STAGES if f"_{s}.ipynb" in cmdline), None)


class StagePeaks(threading.Thread):
    """Peak RSS per stage: the papermill process running the stage's notebook and its children (the
    kernel), sampled every second; DVC's own process is left out."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peaks, self.stop = pid, {}, threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                for p in psutil.Process(self.pid).children(recursive=True):
                    try:
                        stage = stage_of(" ".join(p.cmdline()))
                        if stage is None:
                            continue
                        tree = [p, *p.children(recursive=True)]
                        rss = sum(q.memory_info().rss for q in tree)
                    except psutil.Error:
                        continue
                    self.peaks[stage] = max(self.peaks.get(stage, 0), rss)
            except psutil.Error:
                pass
            self.stop.wait(1.0)


def prepare_clone(where: Path) -> None:
    """A new clone of this repository's HEAD with the untracked inputs a run needs (data/, the fetched
    pretrained files) copied in. A folder that exists is refused: its outputs, DVC cache and run-cache
    would be resumed or restored, and the record would time work that was not done."""
    code = ["geneava", "notebooks", "dvc.yaml", "params.yaml", "benchmarks/rehearsal.py"]
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", *code], cwd=ROOT, capture_output=True, text=True
    )
    if dirty.stdout.strip():
        raise SystemExit(f"uncommitted changes the clone would not have; commit them first:\n{dirty.stdout}")
    if where.exists():
        raise SystemExit(f"{where} exists: give a new --dir (a rehearsal times a run from scratch)")
    subprocess.run(["git", "clone", "-q", str(ROOT), str(where)], check=True)
    for sub in ("data", "models/pretrained"):  # the clone may hold a tracked README there: add, not replace
        if (ROOT / sub).exists():
            shutil.copytree(ROOT / sub, where / sub, dirs_exist_ok=True)


def run(fraction: float, where: Path, steps: int = STEPS) -> dict:
    from geneava.world import dataset

    prepare_clone(where)
    data = where / "rehearsal-data"
    if not (data / "emo135").is_dir():
        dataset.write_standin(data, per_class=PER_CLASS)
    write_reference(data / "celeba", IDENTITIES)
    expressions = chosen_expressions(data, fraction)
    over = overrides(fraction, expressions, steps)
    check(where / "params.yaml", over)  # a bad key or value fails here, not after an hour
    name = f"rehearsal-{round(100 * fraction)}-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [str(ROOT / ".venv/bin/dvc"), "exp", "run", "-n", name]
    cmd += [a for k, v in over.items() for a in ("-S", f"{k}={json.dumps(v)}")]
    env = {
        **os.environ,
        "PYTHONPATH": str(where),  # the clone's code before the editable install's
        "GENEAVA_ROOT": str(where),  # every path resolves in the clone, never in this workspace
        "PATH": f"{ROOT / '.venv/bin'}:{os.environ['PATH']}",
    }
    t0 = time.time()
    with open(where / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=where, env=env, stdout=log, stderr=subprocess.STDOUT)
        peaks = StagePeaks(proc.pid)
        peaks.start()
        rc = proc.wait()
        peaks.stop.set()
    if rc != 0:
        from geneava.core.io import write_json

        record = failure(where, fraction, over, peaks.peaks, time.time() - t0, t0, where / f"{name}.log")
        write_json(RESULTS / failed_name(fraction, steps, record["commit"]), record)
        raise SystemExit(f"dvc exp run failed ({rc}) in {record['failed_stage']}: {record['error']}")
    return collect(where, fraction, over, peaks.peaks, time.time() - t0, t0)


def failure(where: Path, fraction: float, over: dict, peaks: dict, wall: float, since: float, log: Path):
    """The record of a run that stopped: a finding too. The stage that failed and its last error line
    (DVC's log), the times of the stages this run executed, and the refill report if refill ran."""
    import re

    text = log.read_text(errors="replace")
    stage = re.findall(r"failed to reproduce '(\w+)'", text)
    errors = [line for line in text.splitlines() if re.match(r"^[\w.]+(Error|Exception): ", line)]
    done = {}
    for s in STAGES:
        nb = next((where / "outputs" / s).glob("[0-9][0-9]_*.ipynb"), None)
        meta = json.loads(nb.read_text())["metadata"]["papermill"] if nb else {}
        started = meta.get("start_time")
        if started and _stamp(started) >= since and not meta.get("exception"):
            peak = round(peaks[s] / 2**30, 2) if s in peaks else None
            done[s] = {"seconds": meta["duration"], "peak_rss_gib": peak}
    refill = where / "outputs" / "refill" / "report.json"
    generated = where / "outputs" / "generate" / "metrics.json"
    return {
        **_run_facts(where, fraction, over, wall),
        "failed_stage": stage[-1] if stage else None,
        "error": errors[-1].split(" (first:")[0][:400] if errors else None,
        "stages": done,
        "refill": json.loads(refill.read_text()) if "refill" in done else None,
        "generate": json.loads(generated.read_text()) if "generate" in done else None,
        "qc_failures": qc_failures(where / "outputs") if "generate" in done else None,
        "given_up": given_up(where / "outputs") if "refill" in done else None,
        "memorization": audit(where / "outputs") if "memorization" in done else None,
    }


def given_up(out: Path) -> dict:
    """The rows refill gave up on: why their last attempt failed, and their races."""
    import pandas as pd

    m = pd.read_csv(out / "refill" / "manifest.csv", keep_default_na=False)
    gone = m[~m["accepted"].astype(str).isin(["True", "true", "1"])]
    last = gone["failures"].str.split("; ").str[-1]
    return {
        "rows": len(gone),
        "last_failure": {k: int(v) for k, v in last.value_counts().items()},
        "by_race": {k: int(v) for k, v in gone["race"].value_counts().sort_index().items()},
    }


def audit(out: Path) -> dict:
    """The memorization audit at this run's counts: each set's mean nearest-neighbour similarity and how
    many generated faces the derived threshold (and the paper's 0.68) called the same person; where the
    threshold was checked at the reference's scale, the pairs' threshold and the share of reference
    people it called the same as another."""
    m = json.loads((out / "memorization" / "metrics.json").read_text())
    found = {"derived_threshold": round(m["derived"]["threshold"], 4), "generated": m["generated_images"]}
    d = m["derived"]
    if "pairs_threshold" in d:  # checked at the reference's scale (memorization.at_scale)
        found["pairs_threshold"] = round(d["pairs_threshold"], 4)
        found["strangers_same_at_pairs_threshold"] = round(d["strangers_same_at_pairs_threshold"], 3)
        if "same_pairs_called_same" in d:
            found["same_pairs_called_same"] = round(d["same_pairs_called_same"], 3)
    for name in ("finetune", "reference"):
        found[name] = {k: m[name][k] for k in ("images", "same_derived", "same_paper")}
        found[name]["mean_nn_similarity"] = round(m[name]["mean_nn_similarity"], 3)
    return found


def qc_failures(out: Path) -> dict:
    """Where QC's first pass failed, per variant: rows that failed by race (each race holds 1/7 of the
    rows) and the five expressions with most failures. Uneven shares are what refill has to make up."""
    import pandas as pd

    found = {}
    for variant in ("finetuned", "baseline"):
        m = pd.read_csv(out / "generate" / variant / "manifest.csv", keep_default_na=False)
        failed = m[m["qc"] != "pass"]
        found[variant] = {
            "by_race": {k: int(v) for k, v in failed["race"].value_counts().sort_index().items()},
            "top_expressions": [[k, int(v)] for k, v in failed["expression"].value_counts().head(5).items()],
        }
    return found


def _git(root: Path, *args: str) -> str | None:
    """git's stdout, or None where git is missing or fails (an unknown commit: exit 128; a diff: exit 1)."""
    try:
        p = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    except FileNotFoundError:
        return None
    return p.stdout if p.returncode == 0 else None


def world_of(commit: str, root: Path = ROOT) -> str:
    """The commit that last changed models/world as of `commit`: which world a run used ('?' where this
    repository does not know the commit, or git is missing)."""
    at = commit.removesuffix("-dirty")  # benchmarks' git describe marks uncommitted changes
    found = _git(root, "log", "-1", "--format=%h", at, "--", "models/world") if at else None
    return found.strip() if found and found.strip() else "?"


def same_pipeline(a: str, b: str, root: Path = ROOT) -> bool:
    """Whether two commits hold the same PIPELINE (code, notebooks, params, world). An unknown commit
    (git's exit 128), a missing one and one with uncommitted changes (-dirty) are never the same."""
    if not a or not b or a.endswith("-dirty") or b.endswith("-dirty"):
        return False
    return a == b or _git(root, "diff", "--quiet", a, b, "--", *PIPELINE) is not None


def failed_name(fraction: float, steps: int, commit: str) -> str:
    """The record of a stopped run: one file per run (a commit's, or the time's where git gave none)."""
    return f"{round(100 * fraction)}-{steps}steps-{commit or time.strftime('%Y%m%d-%H%M%S')}-failed.json"


def _stamp(iso: str) -> float:
    """papermill's start_time (UTC; older papermill wrote it without the offset)."""
    from datetime import UTC, datetime

    when = datetime.fromisoformat(iso)
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _run_facts(where: Path, fraction: float, over: dict, wall: float) -> dict:
    return {
        "fraction": fraction,
        "date": time.strftime("%Y-%m-%d"),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=where, capture_output=True, text=True
        ).stdout.strip(),  # fmt: skip
        "cpus": os.cpu_count(),
        "wall_seconds": round(wall),
        "overrides": over,
    }


def collect(where: Path, fraction: float, over: dict, peaks: dict, wall: float, since: float) -> dict:
    """The run's record. Every stage's notebook must have been executed by this run (started after
    `since`): a stage DVC skipped or restored would carry another run's time."""
    out = where / "outputs"

    def read(name: str) -> dict:
        return json.loads((out / name).read_text())

    stages = {}
    for stage in STAGES:
        nb = next((out / stage).glob("[0-9][0-9]_*.ipynb"))
        meta = json.loads(nb.read_text())["metadata"]["papermill"]
        if _stamp(meta["start_time"]) < since:
            raise SystemExit(f"{nb} was not executed by this run (DVC skipped or restored {stage})")
        stages[stage] = {
            "seconds": meta["duration"],
            "peak_rss_gib": round(peaks[stage] / 2**30, 2) if stage in peaks else None,  # None: not run now
        }
    return {
        **_run_facts(where, fraction, over, wall),
        "stages": stages,
        "counts": {
            "prepare": read("prepare/metrics.json"),
            "generate": read("generate/metrics.json"),
            "refill": read("refill/report.json"),
            "release": read("release/metrics.json"),
            "memorization_reference": read("memorization/report.json")["reference"],
        },
        "qc_failures": qc_failures(out),
        "memorization": audit(out),
    }


def _no_path(reference: str) -> str:
    """The memorization report's reference line without the run's own folder."""
    return reference.split(" ", 1)[1] if reference.startswith("/") else reference


def _lr(run: dict, root: Path = ROOT) -> str:
    """The run's LoRA lr: its override, or for records before world_lr the default profile's lr in the
    run's own params.yaml ("default's" where git does not know the commit)."""
    lr = run["overrides"].get("finetune.default.lr")
    if lr is None:
        import yaml

        text = _git(root, "show", f"{run['commit']}:params.yaml")
        try:
            lr = yaml.safe_load(text)["finetune"]["default"]["lr"] if text is not None else None
        except (KeyError, TypeError, yaml.YAMLError):
            lr = None
        if lr is None:
            return "default's"
    return f"{lr:g}"


def _peak(run: dict, stage: str) -> str:
    peak = run["stages"][stage]["peak_rss_gib"]
    return "" if peak is None else f", {peak:.1f} GiB"


def _grown(run: dict, base: dict | None, stage: str) -> str:
    """` (xN the P% run's)`: a stage's time against the same stage of a comparable finished run."""
    if base is None:
        return ""
    ratio = run["stages"][stage]["seconds"] / max(base["stages"][stage]["seconds"], 1e-9)
    return f" (x{ratio:.1f} the {round(100 * base['fraction'])}% run's)"


def comparable(a: dict, b: dict, root: Path = ROOT) -> str | None:
    """Why two runs' times cannot be compared (None: they can): growth means the same pipeline (code,
    params, world; commits may differ in benchmarks and docs) and the same settings."""
    if a["overrides"]["generate.default.steps"] != b["overrides"]["generate.default.steps"]:
        return "- (the runs used different steps)"
    if not same_pipeline(a["commit"], b["commit"], root):
        return f"- (the runs are of different code or world, {a['commit']} and {b['commit']})"
    return None


def growth_verdict(runs: list[dict]) -> list[str]:
    """One line under the stage table: the stages whose time grew faster than the work between the
    smallest and the largest run (what a quadratic step would show), or the largest growth if none did.
    A stage under a second in the small run has no ratio worth reading; it is left out and named."""
    runs = sorted(runs, key=lambda r: r["fraction"])
    if len(runs) < 2 or comparable(runs[0], runs[-1]) is not None:
        return []
    a, b = runs[0], runs[-1]
    if (work := b["fraction"] / a["fraction"]) <= 1:
        return []
    short = [s for s in STAGES if a["stages"][s]["seconds"] < 1]
    growth = {s: b["stages"][s]["seconds"] / a["stages"][s]["seconds"] for s in STAGES if s not in short}
    if not growth:
        return []
    faster = [f"{s} (x{g:.1f})" for s, g in growth.items() if g > work]
    top = max(growth, key=growth.get)
    line = (
        f"Grew faster than the work (x{work:.0f}): {', '.join(faster)}."
        if faster
        else (f"No stage grew faster than the work (x{work:.0f}); the most, {top}: x{growth[top]:.1f}.")
    )
    return [
        "",
        line
        + (
            f" Under a second at {round(100 * a['fraction'])}%, not compared: {', '.join(short)}."
            if short
            else ""
        ),
    ]


def page(
    runs: list[dict], failed: list[dict] | None = None, drift: list[dict] | None = None, detector=None
) -> str:
    """docs/rehearsal.md from the recorded runs (smallest fraction first) and the runs that stopped."""
    runs = sorted(runs, key=lambda r: r["fraction"])
    head = " | ".join(f"{round(100 * r['fraction'])}%: s (peak RSS GiB)" for r in runs)
    lines = [
        "# The paper's counts, rehearsed on a CPU (generated)",
        "",
        "<!-- Generated: do not edit. Regenerate with .venv/bin/python benchmarks/rehearsal.py --page -->",
        "",
        "`benchmarks/rehearsal.py` runs the whole DAG as a DVC experiment with the paper's counts and",
        "the world's small models at 64 px (its docstring says what is and is not the paper's); each run's",
        "record is in [benchmarks/rehearsal/](../benchmarks/rehearsal/). Times are papermill's per stage;",
        "peak RSS is the stage's process tree, sampled every second. A run that stopped is a finding too:",
        "what it means for a paper-profile run, and what to do, is in [paper-profile.md](paper-profile.md).",
        "Terms: the world ([world.md](world.md)); variants, QC and refill ([stages/generate.md]"
        "(stages/generate.md)); cells, strict balance ([stages/release.md](stages/release.md)).",
        "In a run's memorization audit, `mean_nn_similarity` is the mean cosine similarity of a generated",
        "face to its nearest face in that set (the world's identity net), and `same_derived` / `same_paper`",
        "count generated faces called the same person by the derived threshold and by the paper's 0.68",
        "([decisions.md](decisions.md#the-papers-068-in-both-conventions)). Where the derived threshold",
        "was checked at the reference's scale, `pairs_threshold` is the labelled pairs' own and",
        "`strangers_same_at_pairs_threshold` the share of reference people it called the same as another",
        "(`same_pairs_called_same`: the world's labelled same-person pairs at or above the value in use)",
        "([decisions.md](decisions.md#the-derived-threshold-at-the-searchs-scale)).",
        "",
        "The world column names the commit that last changed models/world before the run: runs on",
        "different worlds draw different faces, so their QC and refill differ.",
        "",
        "| run | date | commit | world | CPUs | sampling steps | LoRA lr | wall (s) | expressions "
        "| rows per variant | released | strict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        g, rel = r["counts"]["generate"], r["counts"]["release"]
        n_expr = len(r["overrides"]["generate.default.expressions"] or []) or 135
        strict = rel["balance"] == "strict" and rel["cells_off"] == 0 and rel["images"] == rel["cells"]
        steps = r["overrides"]["generate.default.steps"]
        run_cells = [f"{round(100 * r['fraction'])}%", r["date"], r["commit"], world_of(r["commit"])]
        run_cells += [r["cpus"], steps, _lr(r)]
        run_cells.append(r["wall_seconds"])
        count_cells = [
            n_expr,
            f"{g['finetuned']['rows']:,}",
            f"{rel['images']:,}",
            "passed" if strict else "FAILED",
        ]
        lines.append("| " + " | ".join(str(c) for c in run_cells + count_cells) + " |")
    lines += [
        "",
        f"| stage | {head} |" + (" growth |" if len(runs) > 1 else ""),
        "|---|" + "---|" * (len(runs) + (len(runs) > 1)),
    ]
    for stage in STAGES:
        cells = []
        for r in runs:
            peak = r["stages"][stage]["peak_rss_gib"]  # None: not sampled
            cells.append(f"{r['stages'][stage]['seconds']:.0f} ({'-' if peak is None else f'{peak:.1f}'})")
        if len(runs) > 1:
            a, b = runs[0], runs[-1]
            if comparable(a, b) is not None:
                cells.append(comparable(a, b))
                lines.append(f"| {stage} | " + " | ".join(cells) + " |")
                continue
            if a["stages"][stage]["seconds"] < 1:  # no ratio worth reading (growth_verdict)
                cells.append(f"under 1 s at {round(100 * a['fraction'])}%")
            else:
                ratio = b["stages"][stage]["seconds"] / a["stages"][stage]["seconds"]
                cells.append(f"x{ratio:.1f} for x{b['fraction'] / a['fraction']:.0f} the work")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines += growth_verdict(runs)
    lines += ["", "QC, refill and the memorization audit:", ""]
    for r in runs:
        g = r["counts"]["generate"]
        qc = ", ".join(f"{v} {g[v]['kept']:,} of {g[v]['rows']:,} kept" for v in ("finetuned", "baseline"))
        lines.append(
            f"- {round(100 * r['fraction'])}%: QC {qc}; refill {json.dumps(r['counts']['refill'])}; "
            f"reference set: {_no_path(r['counts']['memorization_reference'])}"
        )
        if r.get("qc_failures"):
            lines.append(f"  QC's failures by race and top expressions: {json.dumps(r['qc_failures'])}")
        if r.get("memorization"):
            lines.append(f"  Memorization audit: {json.dumps(r['memorization'])}")
    for r in failed or []:
        steps = r["overrides"]["generate.default.steps"]
        # its finished stages beside a finished run of the same code and settings, where there is one
        base = next((b for b in runs if comparable(b, r) is None and b["fraction"] != r["fraction"]), None)

        times = ", ".join(
            f"{s} {r['stages'][s]['seconds']:.0f} s{_peak(r, s)}{_grown(r, base, s)}"
            for s in STAGES
            if s in r["stages"]
        )
        lines += [
            "",
            f"## A run that stopped: {round(100 * r['fraction'])}% at {steps} sampling steps "
            f"({r['date']}, {r['commit']}, world {world_of(r['commit'])}, LoRA lr {_lr(r)}, "
            f"{r['cpus']} CPUs, {r['wall_seconds']} s until it stopped)",
            "",
            f"Stopped in **{r['failed_stage']}**: `{r['error']}`",
            "",
            f"Stages it finished: {times or 'none'}.",
        ]
        if r.get("generate"):
            g = r["generate"]
            lines.append(
                "QC, final verdicts (after generate's retries): "
                + "; ".join(
                    f"{v} {json.dumps(g[v]['qc'])} of {g[v]['rows']:,}" for v in ("finetuned", "baseline")
                )
                + "."
            )
        if r.get("qc_failures"):
            lines.append(f"QC's failures by race and top expressions: {json.dumps(r['qc_failures'])}.")
        if r.get("refill"):
            lines.append(f"Refill: {json.dumps(r['refill'])}.")
        if r.get("given_up"):
            lines.append(f"The rows refill gave up on: {json.dumps(r['given_up'])}.")
        if r.get("memorization"):
            lines.append(f"Memorization audit: {json.dumps(r['memorization'])}.")
    lines += drift_section(drift or [], detector)
    return "\n".join(lines) + "\n"


def drift_section(records: list[dict], detector: dict | None = None) -> list[str]:
    """The page's section on the fine-tuned model's framing against training steps (qc_drift.py)."""
    if not records:
        return []
    lines = [
        "",
        "## Why faces come out too close: QC against training steps (benchmarks/qc_drift.py)",
        "",
        "The LoRA trained again on the 100% run's fine-tuning split, the same rows and seeds rendered at",
        "every checkpoint, first attempts only (no retries). Face height, centre and margin are the",
        "detected box's means in px on the 64 px frame; the failure rate's interval is a 95% Wilson one.",
    ]
    for r in sorted(records, key=lambda r: r["alpha"]):
        lines += [
            "",
            f"alpha {r['alpha']:g}, lr {r['lr']:g}, {r['train_steps']} training steps, {r['rows']:,} rows "
            f"({r['per_race']} per race), {r['sampling_steps']} sampling steps ({r['date']}, {r['commit']}, "
            f"world {world_of(r['commit'])}"
            f"; the final LoRA is {'the same file as' if r['same_lora_as_run'] else 'not'} the run's):",
            "",
            "| step | QC failed | 95% CI | face height | centre y | margin | failures by race |",
            "|---|---|---|---|---|---|---|",
        ]
        for q in r["points"]:
            lo, hi = q["ci95"]
            lines.append(
                f"| {q['step']} | {q['rate']:.1%} | {lo:.1%}-{hi:.1%} | {q['face_height']:.2f} | "
                f"{q['face_centre_y']:.2f} | {q['margin']:.2f} | {json.dumps(q['by_race'])} |"
            )
    if detector:
        cells = "; ".join(
            f"{race} {d['width_ratio']:.3f}, {d['too_close_when_inside']:.1%}"
            for race, d in detector["by_race"].items()
        )
        lines += [
            "",
            f"The QC detector on {detector['per_race']} procedural faces per race of known size ("
            f"`qc_drift.py --detector`): detected box width over the true one, and how often QC calls a "
            f"face too close whose true box lies inside the frame: {cells}.",
        ]
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Run: .venv/bin/python benchmarks/rehearsal.py --fraction 0.1 (then --fraction 1, then "
        "--page). How long the recorded runs took on which machine: docs/rehearsal.md.",
    )
    ap.add_argument("--fraction", type=float, help="share of the paper's work: 0.1 or 1")
    ap.add_argument("--steps", type=int, default=STEPS, help=f"sampling steps (default {STEPS})")
    ap.add_argument("--dir", type=Path, help="a new folder for the clone (default: a new one in /tmp)")
    ap.add_argument("--page", action="store_true", help="write docs/rehearsal.md from benchmarks/rehearsal/")
    args = ap.parse_args(argv)
    from geneava.core.io import atomic_write_text, write_json

    if args.fraction is not None:
        where = args.dir or Path(
            f"/tmp/geneava-rehearsal-{round(100 * args.fraction)}-{time.strftime('%H%M%S')}"
        )
        record = run(args.fraction, where, args.steps)
        write_json(RESULTS / f"{round(100 * args.fraction)}.json", record)
        print(json.dumps(record["stages"], indent=1))
    if args.page:
        records = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
        runs = [r for r in records if "failed_stage" not in r]
        drift = [json.loads(p.read_text()) for p in sorted((RESULTS / "qc-drift").glob("alpha*.json"))]
        det = RESULTS / "qc-drift" / "detector.json"
        text = page(
            runs,
            [r for r in records if r not in runs],
            drift,
            json.loads(det.read_text()) if det.is_file() else None,
        )
        atomic_write_text(ROOT / "docs/rehearsal.md", text)


if __name__ == "__main__":
    main()
