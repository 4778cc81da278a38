"""Refill the release (paper, "GenEAva 1.0": 98 images per expression, balanced over race, gender and age).

The generate stage retries a row until it passes QC; the stylization and memorization checks come later
and put some rows on removal lists. A released dataset with holes would be off balance, so this stage
renders every excluded row again with the fine-tuned model and its next derived seeds
(`generate.retry_seed`, after the attempts the generate stage used) until a candidate passes *every*
check - QC, stylization preservation and the memorization audit's removal rule - or `max_attempts`
further attempts are spent (reported; the release's balance check then says so; raising it later
renders only the new attempts). Table 1, the audits and the figures describe the first generation, as in
the paper; only the release takes the replacements. Each accepted candidate's face and avatar are written
atomically, then a JSON record of the row; a killed run resumes try by try, and a try made with other
settings is made again (geneava.core.resume: the key covers every parameter, the LoRA, the audit's rule
and sets). report.json's `attempts_rendered`: the attempts the records hold, over every run that made them.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from geneava.core import cli, config, resume
from geneava.core.images import read_split
from geneava.core.io import (
    atomic_write_bytes,
    save_png,
    sha256_bytes,
    sha256_file,
    write_csv,
    write_json,
)
from geneava.networks import identity, models, stylizers
from geneava.networks.faces import face_detector
from geneava.stages import generate, memorization, qc, stylize

log = logging.getLogger(__name__)
REASONS = ("failed QC", "stylization", "memorization")
RECORD_VERSION = 2  # bumped when a record gains fields: older records are redone, not half-read


def stage_params(profile: str | None, params_file: Path | None = None) -> dict:
    b = config.blocks(
        "models",
        "prompts",
        "generate",
        "stylize",
        "memorization",
        "refill",
        profile=profile,
        path=params_file,
    )
    return {
        "model_params": b["models"],
        "prompt_params": b["prompts"],
        "gen_params": b["generate"],
        "sty_params": b["stylize"],
        "mem_params": b["memorization"],
        "params": b["refill"],
    }


def to_refill(outputs: Path) -> pd.DataFrame:
    """The fine-tuned rows the release would leave out, with why: failed QC, or on the stylization or
    memorization removal list."""
    gen = qc.generated(outputs / "generate", "finetuned", "all")
    reasons = {r: [] for r in gen["row_id"]}
    for r in gen.loc[~gen["kept"], "row_id"]:
        reasons[r].append("failed QC")
    for stage, what in (("stylize", "stylization"), ("memorization", "memorization")):
        path = outputs / stage / "removal.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the {stage} stage first (dvc repro {stage})")
        for r in pd.read_csv(path, keep_default_na=False)["row_id"]:
            reasons[r].append(what)
    gen["reason"] = [", ".join(dict.fromkeys(reasons[r])) for r in gen["row_id"]]
    return gen[gen["reason"] != ""].reset_index(drop=True)


def memorization_rule(outputs: Path, mem_params: dict, own: tuple | None) -> tuple[str, float | None]:
    """The removal rule the audit applied, and its derived threshold (read from the audit's metrics)."""
    path = outputs / "memorization" / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the memorization stage first")
    metrics = json.loads(path.read_text())
    rule = metrics.get("removal_rule") or memorization.removal_rule(mem_params, own)
    derived = (metrics.get("derived") or {}).get("threshold")
    if rule == "derived" and derived is None:
        raise ValueError(f"{path}: the audit removed by a derived threshold but records none")
    return rule, derived


def _read_columns(path: Path) -> list[str]:
    """The prompt table's columns (what generate wrote), so the manifest carries each row's prompt."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the generate stage first (dvc repro generate)")
    return list(pd.read_csv(path, nrows=0).columns)


def expression_threshold(outputs: Path, sty_params: dict) -> float | None:
    """The stylize stage's derived expression threshold (expression_level: derived), else None."""
    if sty_params["expression_level"] != "derived":
        return None
    path = outputs / "stylize" / "report.json"
    derived = json.loads(path.read_text()).get("expression_derived") if path.is_file() else None
    if not derived:
        raise FileNotFoundError(f"{path} holds no derived expression threshold: run the stylize stage first")
    return float(derived["threshold"])


# Parameters that cannot change a refilled row, with why; every other value of the blocks read enters
# each row's key (geneava.core.resume), with its prompt, seed, first attempt and batch.
IGNORED = {
    "generate": {
        "limit": "chooses rows upstream (generate); a row is keyed by its own prompt, seed and batch",
        "expressions": "chooses rows upstream (generate); a row is keyed by its own prompt, seed and batch",
        "num_processes": "refill runs in one process",
        "max_retries": "enters each row's first attempt, one of its inputs",
    },
}


TRIES = ("refill", "max_attempts")  # not in the key: raising it continues rows given up (resume.run_rounds)


def settings_key(p: dict, lora_sha: str, rule: str, derived: float | None, expr_t, sets: dict) -> str:
    """The key every refilled row of these settings is made under: every parameter the checks read, the
    LoRA, the audit's rule and thresholds, and the images the memorization check compares with."""
    blocks = {
        "models": p["model_params"],
        "prompts": p["prompt_params"],
        "generate": p["gen_params"],
        "stylize": p["sty_params"],
        "memorization": p["mem_params"],
        "refill": p["params"],
    }
    return resume.digest(
        resume.settings(blocks, IGNORED, TRIES),
        lora_sha,
        {"rule": rule, "derived": derived, "expression_threshold": expr_t},
        {name: list(rows["sha256"]) for name, rows in sets.items()},
        stylizers.REVISION.get(p["sty_params"]["stylizer"], 1),
    )


def refill(
    model_params: dict,
    prompt_params: dict,
    gen_params: dict,
    sty_params: dict,
    mem_params: dict,
    params: dict,
    outputs: Path,
    out_dir: Path,
    root: Path,
    detector=None,
) -> pd.DataFrame:
    """Refill every excluded row (see the module docstring); writes `manifest.csv` and `report.json`."""
    outputs, out_dir = Path(outputs), Path(out_dir)
    p = {
        "model_params": model_params,
        "prompt_params": prompt_params,
        "gen_params": gen_params,
        "sty_params": sty_params,
        "mem_params": mem_params,
        "params": params,
    }
    lora_file = outputs / "finetune" / "lora" / "pytorch_lora_weights.safetensors"
    if not lora_file.is_file():
        raise FileNotFoundError(f"{lora_file} not found: run the finetune stage first (dvc repro finetune)")
    id_model = identity.identity_model(
        mem_params["identity"], mem_params["identity_root"], mem_params["identity_pack"]
    )
    rule, derived = memorization_rule(outputs, mem_params, id_model.own_rule)
    expr_t = expression_threshold(outputs, sty_params)
    # the audit's sets (the fine-tuning split and the reference set), which a candidate must not copy
    prepare_dir = outputs / "prepare"
    ft = read_split(prepare_dir, "finetune")
    ref, _ = memorization.reference_set(mem_params, prepare_dir, root)
    sets = {"finetune": ft.assign(name=ft["file"]), "reference": ref}
    key = settings_key(p, sha256_file(lora_file), rule, derived, expr_t, sets)

    rows = to_refill(outputs)
    records = out_dir / "records"
    items = [
        resume.Item(
            id=r.row_id,
            inputs={
                "prompt": r.prompt,
                "negative": r.negative_prompt,
                "seed": int(r.seed),
                "first": int(r.attempt) + 1,
            },
            record=records / Path(r.file).with_suffix(".json"),
            base=out_dir,
        )
        for r in rows.itertuples()
    ]
    resume.start(out_dir)
    shutil.rmtree(out_dir / "candidates", ignore_errors=True)  # checks' scratch space of a killed run
    keep = [it.record for it in items]
    keep += [out_dir / sub / r.file for r in rows.itertuples() for sub in ("images", "avatars")]
    for sub in ("records", "images", "avatars"):
        resume.prune(out_dir / sub, keep)
    # DVC outputs, present even when nothing needs a refill
    for sub in ("records", "images", "avatars", "embeddings"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "run.json", {"key": key, "memorization_rule": rule, "derived": derived})

    checks = Checks(p, lora_file, id_model, rule, derived, expr_t, sets, out_dir, rows, detector)
    with tqdm(total=len(items), desc="refill", unit="row") as bar:
        done = resume.run_rounds(
            items,
            key,
            rounds=params["max_attempts"],
            batch_size=gen_params["batch_size"],
            process=checks,
            progress=bar.update,
        )
    shutil.rmtree(out_dir / "candidates", ignore_errors=True)

    keep_cols = [*_read_columns(outputs / "generate" / "prompts.csv"), "file", "reason"]
    if len(rows):
        found = pd.DataFrame([_record_row(done[r]) for r in rows["row_id"]])
        manifest = rows[keep_cols].merge(found, on="row_id", validate="one_to_one")
    else:  # nothing to refill: the same columns, no rows (the notebook and release read them)
        manifest = rows[keep_cols].assign(**{c: pd.Series(dtype=t) for c, t in RECORD_COLUMNS.items()})
    write_csv(out_dir / "manifest.csv", manifest)
    report = {
        "rows_excluded": len(rows),
        "refilled": int(manifest["accepted"].sum()) if len(manifest) else 0,
        "given_up": int((~manifest["accepted"].astype(bool)).sum()) if len(manifest) else 0,
        "by_reason": {r: int(rows["reason"].str.contains(r).sum()) for r in REASONS},
        "attempts_rendered": int(manifest["candidates"].sum()) if len(manifest) else 0,
        "max_attempts": params["max_attempts"],
        "memorization_rule": rule,
    }
    write_json(out_dir / "report.json", report)
    return manifest


# every row's record; an accepted row's adds its files and scores
RECORD_COLUMNS = {
    "attempt": int,
    "seed_used": int,
    "candidates": int,
    "failures": str,
    "accepted": bool,
}


def _record_row(rec: dict) -> dict:
    """A finished row's record as a manifest row: how many candidates it took and why each failed."""
    tries = rec["tries"]
    row = {k: v for k, v in rec.items() if k not in ("tries", "key", "done", "files")}
    return row | {"candidates": len(tries), "failures": "; ".join(t["why"] for t in tries if t["why"])}


class Checks:
    """Renders a batch of candidates and puts each through QC, the stylization checks and the
    memorization rule (models built on the first batch that needs them); `resume.run_rounds` calls it."""

    def __init__(self, p, lora_file, id_model, rule, derived, expr_t, sets, out_dir, rows, detector=None):
        self.p, self.lora_file, self.id_model = p, lora_file, id_model
        self.rule, self.derived, self.expr_t, self.sets = rule, derived, expr_t, sets
        self.out_dir, self.detector = out_dir, detector
        self.rows = rows.set_index("row_id", drop=False)
        self.first = {r.row_id: int(r.attempt) + 1 for r in rows.itertuples()}
        self.ready = False

    def _build(self) -> None:
        p, g, s = self.p, self.p["gen_params"], self.p["sty_params"]
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.pipe = generate.build_pipeline(
            p["model_params"], p["prompt_params"], g, self.lora_file.parent, device
        )
        self.detector = self.detector or face_detector(g["detector"], g["detector_root"], g["detector_pack"])
        self.styler = stylizers.stylizer(s, p["model_params"], p["prompt_params"], device)
        self.sty_id = identity.identity_model(s["identity"], s["identity_root"], s["identity_pack"])
        self.encoder = models.expression_encoder(
            p["model_params"]["expression"],
            p["model_params"]["seed"],
            p["model_params"]["expression_channels"],
        )
        # embedded into this stage's own cache (a few seconds; no writes into other stages)
        self.emb = {
            k: identity.cached_embeddings(self.id_model, k, rows, self.out_dir / "embeddings")["embedding"]
            for k, rows in self.sets.items()
        }
        self.ready = True

    def __call__(self, batch: list[tuple[resume.Item, int]]) -> list[resume.Outcome]:
        if not self.ready:
            self._build()
        frame = self.rows.loc[[it.id for it, _ in batch]]
        attempts = [self.first[it.id] + k for it, k in batch]
        seeds = [generate.retry_seed(s, a) for s, a in zip(frame["seed"], attempts, strict=True)]
        images = generate.render(self.pipe, frame, seeds, self.p["gen_params"])
        why = {}
        passing = []
        for r, img, seed in zip(frame.itertuples(), images, seeds, strict=True):
            failed, _ = qc.image_check(self.detector, np.asarray(img), self.p["gen_params"]["qc_border"])
            if failed:
                why[r.row_id] = f"QC: {failed}"
            else:
                passing.append((r, img, seed))
        scores = self._check(passing, why) if passing else {}
        outcomes = []
        for r, a, seed, img in zip(frame.itertuples(), attempts, seeds, images, strict=True):

            def finish(final, r=r, a=a, seed=seed, img=img):
                fields = {"row_id": r.row_id, "attempt": a, "seed_used": seed}
                if why[r.row_id]:
                    return fields | {"accepted": False}
                face, avatar = scores[r.row_id].pop("bytes")  # the checked bytes, not a second encoding
                atomic_write_bytes(self.out_dir / "images" / r.file, face)
                atomic_write_bytes(self.out_dir / "avatars" / r.file, avatar)
                return fields | {
                    "accepted": True,
                    "stylizer": self.styler.name,
                    "refill_file": str(Path("images") / r.file),
                    "refill_avatar": str(Path("avatars") / r.file),
                    "sha256": sha256_bytes(face),
                    "avatar_sha256": sha256_bytes(avatar),
                    "files": [str(Path("images") / r.file), str(Path("avatars") / r.file)],
                    **scores[r.row_id],
                }

            outcomes.append(resume.Outcome(why[r.row_id], finish))
        return outcomes

    def _check(self, passing: list, why: dict) -> dict:
        """Stylize the QC-passing candidates and check them; fills `why` and returns each one's scores."""
        s, m = self.p["sty_params"], self.p["mem_params"]
        meta = pd.DataFrame(
            {"expression": [r.expression for r, _, _ in passing], "seed_used": [sd for _, _, sd in passing]}
        )
        avatars = self.styler.stylize([img for _, img, _ in passing], meta)
        tmp = self.out_dir / "candidates"
        faces, cartoons, encoded = [], [], []
        for (r, img, _), av in zip(passing, avatars, strict=True):
            if av.size != img.size:
                raise RuntimeError(f"stylizer {self.styler.name} changed the size of {r.file}")
            faces.append(tmp / "images" / r.file)
            cartoons.append(tmp / "avatars" / r.file)
            encoded.append((save_png(faces[-1], img), save_png(cartoons[-1], av)))
        kept = stylize.preservation(
            faces,
            cartoons,
            self.sty_id,
            self.encoder,
            s["identity_threshold"],
            expression_level=s["expression_level"],
            expression_threshold=self.expr_t,
        )
        found = identity.embed_files(self.id_model, [str(f) for f in faces], "refill")["embedding"]
        same = torch.zeros(len(passing), dtype=torch.bool)
        nn_sim = {}
        for name, ref_emb in self.emb.items():
            sim, _, _, calls = identity.same_calls(
                found, ref_emb, m["threshold"], self.id_model.own_rule, self.derived, m
            )
            if self.rule not in calls:
                raise ValueError(f"memorization rule '{self.rule}' does not apply to {self.id_model.name}")
            same |= calls[self.rule]
            nn_sim[name] = sim.numpy()
        scores = {}
        for i, (r, _, _) in enumerate(passing):
            k = kept.iloc[i]
            if not k["identity_kept"] or not k["expression_agrees"]:
                why[r.row_id] = "stylization"
            elif bool(same[i]):
                why[r.row_id] = "memorization"
            else:
                why[r.row_id] = ""
            scores[r.row_id] = {
                "bytes": encoded[i],
                "identity_similarity": float(k["identity_similarity"]),
                "identity_kept": bool(k["identity_kept"]),
                "expression_distance": float(k["expression_distance"]),
                "expression_agrees": bool(k["expression_agrees"]),
                **{f"{n}_similarity": float(v[i]) for n, v in nn_sim.items()},
            }
        return scores


def run(profile: str | None, outputs: Path, out_dir: Path, params_file: Path | None = None) -> pd.DataFrame:
    return refill(
        **stage_params(profile, params_file),
        outputs=Path(outputs),
        out_dir=Path(out_dir),
        root=config.project_root(),
    )


def replacement_sheet(
    manifest: pd.DataFrame, outputs: Path, out_dir: Path, n: int = 8, save_to: Path | None = None
):
    """Excluded faces (top) and the replacements the release takes (face, avatar), with why."""
    import matplotlib.pyplot as plt

    from geneava.core.images import load_rgb

    done = manifest[manifest["accepted"].astype(str).str.lower() == "true"].head(n)
    if done.empty:  # still a figure: it is a DVC output, and saying so beats a missing file
        fig, ax = plt.subplots(figsize=(4, 1.2))
        ax.text(0.5, 0.5, "no replacements: no row was refilled", ha="center", va="center")
        ax.axis("off")
        if save_to is not None:
            fig.savefig(save_to, dpi=120)
        return fig
    fig, axes = plt.subplots(3, len(done), figsize=(1.6 * len(done), 5.2), squeeze=False)
    for j, r in enumerate(done.itertuples()):
        panels = (
            (outputs / "generate" / "finetuned" / r.file, f"{r.expression}\nexcluded: {r.reason}"),
            (Path(out_dir) / r.refill_file, f"attempt {r.attempt}"),
            (Path(out_dir) / r.refill_avatar, "its avatar"),
        )
        for i, (path, title) in enumerate(panels):
            axes[i, j].imshow(load_rgb(path))
            axes[i, j].set_title(title, fontsize=7)
            axes[i, j].axis("off")
    fig.tight_layout()
    if save_to is not None:
        fig.savefig(save_to, dpi=120)
    return fig


def main(argv: list[str] | None = None) -> int:
    return cli.stage_main(run, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
