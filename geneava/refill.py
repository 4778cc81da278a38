"""Refill the release (paper, "GenEAva 1.0": 98 images per expression, balanced over race, gender and age).

The generate stage retries a row until it passes QC; the stylization and memorization checks come later
and put some rows on removal lists. A released dataset with holes would be off balance, so this stage
renders every excluded row again with the fine-tuned model and its next derived seeds
(`generate.retry_seed`, after the attempts the generate stage used) until a candidate passes *every*
check - QC, stylization preservation and the memorization audit's removal rule - or `max_attempts`
further attempts are spent (reported; the release's balance check then says so).

Table 1, the audits and the figures describe the first generation, as in the paper; only the release
takes the replacements. Each accepted candidate's face and avatar are written atomically, then a JSON
record of the row; a killed run resumes with the rows that have no record, and a row is never refilled
twice. Settings that differ from the previous run's clear the folder first.
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

from geneava import config, generate, identity, memorization, models, qc, stylize
from geneava.data import read_split
from geneava.faces import face_detector
from geneava.io import (
    atomic_write_bytes,
    atomic_write_text,
    save_png,
    sha256_bytes,
    sha256_file,
    source_fingerprint,
    write_csv,
    write_json,
)

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


def _settings(p: dict, lora_sha: str, rule: str, derived: float | None) -> dict:
    g, s, m = p["gen_params"], p["sty_params"], p["mem_params"]
    return {
        "model": p["model_params"]["sdxl"],
        "model_weights": source_fingerprint(p["model_params"]["sdxl"]),
        "model_seed": p["model_params"]["seed"],
        "expression_model": p["model_params"]["expression"],
        "expression_weights": source_fingerprint(p["model_params"]["expression"]),
        "lora_sha256": lora_sha,
        "generate": {k: g[k] for k in ("steps", "guidance_scale", "resolution", "qc_border", "detector")},
        "stylize": {
            k: s[k]
            for k in (
                "stylizer",
                "colors",
                "quantize",
                "levels",
                "dctnet",
                "lora",
                "prompt",
                "strength",
                "steps",
                "identity",
                "identity_threshold",
                "expression_level",
            )
        },
        "memorization": {
            "identity": m["identity"],
            "threshold": m["threshold"],
            "rule": rule,
            "derived": derived,
        },
        "stylizer_revision": stylize.REVISION.get(s["stylizer"], 1),
        "record_version": RECORD_VERSION,
        "max_attempts": p["params"]["max_attempts"],
    }


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
    sty_id = identity.identity_model(
        sty_params["identity"], sty_params["identity_root"], sty_params["identity_pack"]
    )
    rule, derived = memorization_rule(outputs, mem_params, id_model.own_rule)
    expr_t = expression_threshold(outputs, sty_params)
    settings = _settings(p, sha256_file(lora_file), rule, derived) | {"expression_threshold": expr_t}
    records = out_dir / "records"
    run_file = out_dir / "run.json"
    if out_dir.exists() and (not run_file.exists() or json.loads(run_file.read_text()) != settings):
        log.warning("%s holds replacements made with other settings; clearing it", out_dir)
        for sub in ("records", "images", "avatars"):
            shutil.rmtree(out_dir / sub, ignore_errors=True)
    # DVC outputs, present even when nothing needs a refill
    for sub in ("records", "images", "avatars", "embeddings"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    write_json(run_file, settings)

    rows = to_refill(outputs)
    record = {f: records / Path(f).with_suffix(".json") for f in rows["file"]}
    todo = rows[[not record[f].exists() for f in rows["file"]]]
    if len(todo) < len(rows):
        log.info("resuming: %d of %d rows already refilled or given up", len(rows) - len(todo), len(rows))
    if len(todo):
        ctx = dict(p, prompt_params=prompt_params, lora_file=lora_file, id_model=id_model, sty_id=sty_id)
        ctx |= dict(rule=rule, derived=derived, expr_t=expr_t, outputs=outputs, out_dir=out_dir, root=root)
        _refill_rows(ctx, todo, record, detector)

    done = pd.DataFrame([json.loads(record[f].read_text()) for f in rows["file"]]) if len(rows) else None
    keep = [*_read_columns(outputs / "generate" / "prompts.csv"), "file", "reason"]
    manifest = rows[keep] if done is None else rows[keep].merge(done, on="row_id", validate="one_to_one")
    if done is None:  # nothing to refill: the same columns, no rows (the notebook and release read them)
        manifest = manifest.assign(**{c: pd.Series(dtype=t) for c, t in RECORD_COLUMNS.items()})
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


def _refill_rows(ctx: dict, todo: pd.DataFrame, record: dict[str, Path], detector) -> None:
    """Render, check and write the rows in `todo` (ctx: the stage's parameter blocks, models and rule)."""
    p, prompt_params, lora_file = ctx, ctx["prompt_params"], ctx["lora_file"]
    id_model, sty_id, rule, derived, expr_t = (
        ctx[k] for k in ("id_model", "sty_id", "rule", "derived", "expr_t")
    )
    outputs, out_dir, root = ctx["outputs"], ctx["out_dir"], ctx["root"]
    g, s, m = p["gen_params"], p["sty_params"], p["mem_params"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = generate.build_pipeline(p["model_params"], prompt_params, g, lora_file.parent, device)
    detector = detector or face_detector(g["detector"], g["detector_root"], g["detector_pack"])
    styler = stylize.stylizer(s, p["model_params"], prompt_params, device)
    encoder = models.expression_encoder(p["model_params"]["expression"], p["model_params"]["seed"])
    # the audit's sets, embedded into this stage's own cache (a few seconds; no writes into other stages)
    prepare_dir = outputs / "prepare"
    ft = read_split(prepare_dir, "finetune")
    ref, _ = memorization.reference_set(m, prepare_dir, root)
    sets = {"finetune": ft.assign(name=ft["file"]), "reference": ref}
    emb = {
        k: memorization.embeddings(id_model, k, rows, out_dir / "embeddings")["embedding"]
        for k, rows in sets.items()
    }

    first = {r.row_id: int(r.attempt) + 1 for r in todo.itertuples()}
    last = {r: a + p["params"]["max_attempts"] - 1 for r, a in first.items()}
    pending = [(r, first[r.row_id]) for r in todo.itertuples()]
    tries = {r.row_id: [] for r in todo.itertuples()}
    bs = g["batch_size"]
    tmp = out_dir / "candidates"
    bar = tqdm(total=len(todo), desc="refill", unit="row")
    while pending:
        batch, pending = pending[:bs], pending[bs:]
        frame = pd.DataFrame([r._asdict() for r, _ in batch])
        seeds = [generate.retry_seed(r.seed, a) for r, a in batch]
        images = generate.render(pipe, frame, seeds, g)
        verdict = {}
        passing = []
        for (r, a), img in zip(batch, images, strict=True):
            why, _ = qc.image_check(detector, np.asarray(img), g["qc_border"])
            if why:
                verdict[r.row_id] = f"QC: {why}"
            else:
                passing.append((r, a, img))
        if passing:
            meta = pd.DataFrame(
                {
                    "expression": [r.expression for r, _, _ in passing],
                    "seed_used": [generate.retry_seed(r.seed, a) for r, a, _ in passing],
                }
            )
            avatars = styler.stylize([img for _, _, img in passing], meta)
            faces, cartoons, encoded = [], [], []
            for (r, _, img), av in zip(passing, avatars, strict=True):
                if av.size != img.size:
                    raise RuntimeError(f"stylizer {styler.name} changed the size of {r.file}")
                faces.append(tmp / "images" / r.file)
                cartoons.append(tmp / "avatars" / r.file)
                encoded.append((save_png(faces[-1], img), save_png(cartoons[-1], av)))
            kept = stylize.preservation(
                faces,
                cartoons,
                sty_id,
                encoder,
                s["identity_threshold"],
                expression_level=s["expression_level"],
                expression_threshold=expr_t,
            )
            found = identity.embed_files(id_model, [str(f) for f in faces], "refill")["embedding"]
            same = torch.zeros(len(passing), dtype=torch.bool)
            nn_sim = {}
            for name, ref_emb in emb.items():
                sim, _, _, calls = memorization.same_calls(
                    found, ref_emb, m["threshold"], id_model.own_rule, derived, m
                )
                if rule not in calls:
                    raise ValueError(f"memorization rule '{rule}' does not apply to {id_model.name}")
                same |= calls[rule]
                nn_sim[name] = sim.numpy()
            for i, (r, a, _) in enumerate(passing):
                k = kept.iloc[i]
                if not k["identity_kept"] or not k["expression_agrees"]:
                    verdict[r.row_id] = "stylization"
                elif bool(same[i]):
                    verdict[r.row_id] = "memorization"
                else:
                    verdict[r.row_id] = ""
                    # the face and avatar first, then the record that makes the row done
                    face, avatar = encoded[i]  # the checked bytes, not a second encoding
                    atomic_write_bytes(out_dir / "images" / r.file, face)
                    atomic_write_bytes(out_dir / "avatars" / r.file, avatar)
                    _finish(
                        record[r.file],
                        r,
                        a,
                        tries[r.row_id] + [""],
                        {
                            "accepted": True,
                            "stylizer": styler.name,
                            "refill_file": str(Path("images") / r.file),
                            "refill_avatar": str(Path("avatars") / r.file),
                            "sha256": sha256_bytes(face),
                            "avatar_sha256": sha256_bytes(avatar),
                            "identity_similarity": float(k["identity_similarity"]),
                            "identity_kept": bool(k["identity_kept"]),
                            "expression_distance": float(k["expression_distance"]),
                            "expression_agrees": bool(k["expression_agrees"]),
                            **{f"{n}_similarity": float(v[i]) for n, v in nn_sim.items()},
                        },
                    )
                    bar.update(1)
        for r, a in batch:
            why = verdict[r.row_id]
            if why == "":
                continue
            tries[r.row_id].append(why)
            if a < last[r.row_id]:
                pending.append((r, a + 1))
            else:
                _finish(record[r.file], r, a, tries[r.row_id], {"accepted": False})
                bar.update(1)
    bar.close()
    shutil.rmtree(tmp, ignore_errors=True)


# every row's record (`_finish`); an accepted row's adds its files and scores
RECORD_COLUMNS = {
    "attempt": int,
    "seed_used": int,
    "candidates": int,
    "failures": str,
    "accepted": bool,
}


def _finish(path: Path, row, attempt: int, tries: list[str], fields: dict) -> None:
    atomic_write_text(
        path,
        json.dumps(
            {
                "row_id": row.row_id,
                "attempt": attempt,
                "seed_used": generate.retry_seed(row.seed, attempt),
                "candidates": len(tries),
                "failures": "; ".join(t for t in tries if t),
                **fields,
            },
            sort_keys=True,
        ),
    )


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

    from geneava.data import load_rgb

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
