"""User-study kit (paper: "Stylization user study" and the memorization check): HIT pages, an Amazon
Mechanical Turk batch file, and the analysis of returned answers.

Two studies, one machinery:
- `stylization`: realistic face and avatar side by side; (a) does the avatar represent the identity of the
  face? (b) does it preserve the facial expression? Paper: 945 pairs (7 per class), 15 pairs per HIT, one
  of them an attention check with obviously different identities; 93% / 96% answered yes.
- `memorization`: a generated face and its nearest neighbour; "the same person?" (the paper's 50 + 50).

Every HIT page is static HTML that works offline in a browser: the worker answers, presses Submit, and the
page shows the answers as a CSV row (with AMT's column names, `Answer.q<k>_<question>`) that can be
downloaded; inside AMT (`?assignmentId=...&turkSubmitTo=...`) the same form posts to AMT. `amt_batch.csv`
carries one row per HIT with the image URLs for AMT's batch upload of `amt_template.html`.
The analysis drops assignments that fail their attention check and reports the share of "yes" per question
with a Wilson 95% interval, overall and per expression class.
"""

from __future__ import annotations

import html
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from geneava.core import cli, config
from geneava.core.io import atomic_write_text, write_csv, write_json

QUESTIONS = {
    "stylization": {
        "identity": "Does the avatar (right) represent the identity of the person in the photo (left)?",
        "expression": "Does the avatar (right) preserve the facial expression of the photo (left)?",
    },
    "memorization": {"same": "Do the two images show the same person?"},
}
# what an attentive worker answers on a check pair (obviously different people)
CHECK_ANSWER = {"identity": "no", "same": "no"}


def build_hits(pairs: pd.DataFrame, per_hit: int = 15, seed: int = 0) -> pd.DataFrame:
    """Items of HITs: `pairs` (columns left, right, and optionally expression, identity_group) shuffled
    into HITs of `per_hit - 1` pairs plus one attention check at a random position. The check pairs the
    left image with the right image of the pair whose `identity_group` (e.g. gender) differs, else of the
    pair farthest away in the list, so the two show different people."""
    if len(pairs) < 2:
        raise ValueError("a user study needs at least two pairs (one of them lends the attention check)")
    rng = np.random.default_rng(seed)
    pairs = pairs.reset_index(drop=True)
    order = rng.permutation(len(pairs))
    n_real = per_hit - 1
    items = []
    for h, start in enumerate(range(0, len(order), n_real)):
        chunk = list(order[start : start + n_real])
        check_pos = int(rng.integers(0, len(chunk) + 1))
        src = pairs.loc[chunk[0]]
        others = pairs.index[pairs.index != chunk[0]]
        if "identity_group" in pairs:
            differing = others[pairs.loc[others, "identity_group"] != src["identity_group"]]
            others = differing if len(differing) else others
        donor = pairs.loc[others[int(rng.integers(0, len(others)))]]
        check = {
            "left": src["left"],
            "right": donor["right"],
            "expression": src.get("expression", ""),
            "is_check": True,
        }
        rows = [{**pairs.loc[i].to_dict(), "is_check": False} for i in chunk]
        rows.insert(check_pos, check)
        for k, r in enumerate(rows, start=1):
            items.append(
                {
                    "hit": h,
                    "q": k,
                    **{c: r.get(c, "") for c in ("left", "right", "expression", "row_id")},
                    "is_check": r["is_check"],
                }
            )
    return pd.DataFrame(items)


# ------------------------------------------------------------------ pages

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 1em auto; }}
.item {{ border-top: 1px solid #ccc; padding: 0.8em 0; }}
.item img {{ width: 180px; height: 180px; object-fit: contain; margin-right: 1em; }}
fieldset {{ border: none; padding: 0.2em 0; }}
#results {{ width: 100%; height: 8em; }}
</style></head>
<body>
<h1>{title}</h1>
<p>{instructions}</p>
<form id="hit" method="post" action="{action}">
<input type="hidden" name="assignmentId" id="assignmentId" value="">
<input type="hidden" name="hit_id" value="{hit_id}">
{items}
<p><button type="submit" id="submit">Submit</button></p>
</form>
<textarea id="results" readonly></textarea>
<p><a id="download" download="answers_{hit_id}.csv" href="#">Download answers (CSV)</a></p>
<script>
const questions = {questions_json};
const n = {n_items};
const params = new URLSearchParams(window.location.search);
const assignment = params.get("assignmentId");
if (assignment) {{
  document.getElementById("assignmentId").value = assignment;
  const submitTo = params.get("turkSubmitTo");
  if (submitTo) document.getElementById("hit").action = submitTo + "/mturk/externalSubmit";
}}
function csvCell(v) {{ return '"' + String(v).replace(/"/g, '""') + '"'; }}
document.getElementById("hit").addEventListener("submit", function (ev) {{
  const header = ["Input.hit_id", "WorkerId", "AssignmentId"];
  const row = ["{hit_id}", params.get("workerId") || "offline", assignment || "offline"];
  for (let k = 1; k <= n; k++) {{
    for (const q of questions) {{
      const picked = document.querySelector('input[name="q' + k + '_' + q + '"]:checked');
      if (!picked) {{ ev.preventDefault(); alert("Please answer every question (item " + k + ")."); return; }}
      header.push("Answer.q" + k + "_" + q);
      row.push(picked.value);
    }}
  }}
  const text = header.map(csvCell).join(",") + "\\n" + row.map(csvCell).join(",") + "\\n";
  document.getElementById("results").value = text;
  document.getElementById("download").href = "data:text/csv;charset=utf-8," + encodeURIComponent(text);
  if (!assignment) ev.preventDefault();  // offline: keep the page, show the answers
}});
</script>
</body></html>
"""

ITEM = """<div class="item" id="item{k}">
<img src="{left}" alt="image A {k}"><img src="{right}" alt="image B {k}">
{fieldsets}
</div>"""

FIELDSET = """<fieldset><legend>{text}</legend>
<label><input type="radio" name="q{k}_{q}" value="yes" required> yes</label>
<label><input type="radio" name="q{k}_{q}" value="no"> no</label></fieldset>"""


def hit_html(study: str, hit_id: str, images: list[tuple[str, str]], action: str = "#") -> str:
    """One HIT page: for each (left, right) image pair, the study's yes/no questions."""
    qs = QUESTIONS[study]
    items = "\n".join(
        ITEM.format(
            k=k,
            left=html.escape(left, quote=True),
            right=html.escape(right, quote=True),
            fieldsets="\n".join(FIELDSET.format(k=k, q=q, text=html.escape(t)) for q, t in qs.items()),
        )
        for k, (left, right) in enumerate(images, start=1)
    )
    title = "Cartoon avatars" if study == "stylization" else "Same person?"
    instructions = (
        "Look at each pair and answer both questions."
        if study == "stylization"
        else ("Look at each pair of faces and say whether they show the same person.")
    )
    return PAGE.format(
        title=title,
        instructions=instructions,
        action=html.escape(action, quote=True),
        hit_id=html.escape(hit_id),
        items=items,
        questions_json=json.dumps(list(qs)),
        n_items=len(images),
    )


def write_kit(study: str, items: pd.DataFrame, out_dir: Path, image_base_url: str = "images/") -> dict:
    """Offline pages (`hit_<k>.html`, images copied beside them), `items.csv` (which item is which, the
    checks included), `amt_template.html` + `amt_batch.csv` for AMT's batch upload."""
    out_dir = Path(out_dir)
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    names = {}
    for p in sorted(set(items["left"]) | set(items["right"])):
        name = f"{len(names):05d}{Path(p).suffix}"
        shutil.copyfile(p, img_dir / name)
        names[p] = name
    items = items.assign(left_image=items["left"].map(names), right_image=items["right"].map(names))
    batch = []
    for h, group in items.groupby("hit"):
        pairs = [
            (f"images/{a}", f"images/{b}")
            for a, b in zip(group["left_image"], group["right_image"], strict=True)
        ]
        atomic_write_text(out_dir / f"hit_{h}.html", hit_html(study, str(h), pairs))
        row = {"hit_id": h}
        for r in group.itertuples():
            row[f"q{r.q}_left"] = image_base_url + r.left_image
            row[f"q{r.q}_right"] = image_base_url + r.right_image
        batch.append(row)
    per_hit = int(items.groupby("hit").size().max())
    template = hit_html(
        study, "${hit_id}", [(f"${{q{k}_left}}", f"${{q{k}_right}}") for k in range(1, per_hit + 1)]
    )
    atomic_write_text(out_dir / "amt_template.html", template)
    write_csv(out_dir / "amt_batch.csv", pd.DataFrame(batch))
    write_csv(out_dir / "items.csv", items.drop(columns=["left", "right"]))
    summary = {
        "study": study,
        "hits": int(items["hit"].nunique()),
        "items": len(items),
        "checks": int(items["is_check"].sum()),
    }
    write_json(out_dir / "kit.json", summary)
    return summary


# ------------------------------------------------------------------ analysis


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def analyse(study: str, results: pd.DataFrame, items: pd.DataFrame) -> dict:
    """Approval rates per question (share of "yes" on real pairs) with Wilson 95% CIs, overall and per
    expression, from AMT-style results (`Input.hit_id`, `Answer.q<k>_<question>`); assignments that fail
    their HIT's attention check are discarded and counted."""
    qs = list(QUESTIONS[study])
    long = []
    for a, row in results.reset_index(drop=True).iterrows():
        hit = int(row["Input.hit_id"])
        for it in items[items["hit"] == hit].itertuples():
            for q in qs:
                col = f"Answer.q{it.q}_{q}"
                if col not in row or pd.isna(row[col]):
                    raise ValueError(f"results row {a} (HIT {hit}) has no answer {col}")
                long.append(
                    {
                        "assignment": a,
                        "hit": hit,
                        "q": it.q,
                        "question": q,
                        "answer": str(row[col]).strip().lower(),
                        "is_check": bool(it.is_check),
                        "expression": it.expression,
                    }
                )
    long = pd.DataFrame(long)
    check_q = next(q for q in qs if q in CHECK_ANSWER)
    checks = long[long["is_check"] & (long["question"] == check_q)]
    failed = set(checks.loc[checks["answer"] != CHECK_ANSWER[check_q], "assignment"])
    valid = long[~long["assignment"].isin(failed) & ~long["is_check"]]
    out = {"assignments": int(long["assignment"].nunique()), "discarded": len(failed), "questions": {}}
    per_class = []
    for q in qs:
        ans = valid[valid["question"] == q]
        k, n = int((ans["answer"] == "yes").sum()), len(ans)
        lo, hi = wilson(k, n)
        out["questions"][q] = {"yes": k, "answers": n, "rate": k / n if n else math.nan, "lo": lo, "hi": hi}
        for e, g in ans.groupby("expression"):
            kk, nn = int((g["answer"] == "yes").sum()), len(g)
            per_class.append(
                {
                    "expression": e,
                    "question": q,
                    "yes": kk,
                    "answers": nn,
                    "rate": kk / nn,
                    "lo": wilson(kk, nn)[0],
                    "hi": wilson(kk, nn)[1],
                }
            )
    out["per_class"] = per_class
    return out


# ------------------------------------------------------------------ the stage


def study_pairs(study: str, params: dict, outputs: Path) -> pd.DataFrame:
    """The pairs a study shows: `per_class` seeded random face/avatar pairs per expression (paper: 7), or
    the memorization audit's closest pairs (`review.csv`, paper: 50 + 50)."""
    outputs = Path(outputs)
    if study == "stylization":
        pairs = pd.read_csv(outputs / "stylize" / "pairs.csv", keep_default_na=False)
        gen = pd.read_csv(outputs / "generate" / "finetuned" / "manifest.csv", keep_default_na=False)
        pairs = pairs.merge(gen[["row_id", "gender"]], on="row_id", how="left")
        # a seeded shuffle, then the first `per_class` of each expression
        pairs = (
            pairs.sample(frac=1.0, random_state=params["seed"])
            .groupby("expression")
            .head(params["per_class"])
        )
        return pd.DataFrame(
            {
                "left": [str(outputs / "generate" / r) for r in pairs["realistic"]],
                "right": [str(outputs / "stylize" / a) for a in pairs["avatar"]],
                "expression": pairs["expression"],
                "identity_group": pairs["gender"],
                "row_id": pairs["row_id"],
            }
        )
    review = pd.read_csv(outputs / "memorization" / "review.csv", keep_default_na=False)
    root = outputs.parent  # review.csv's match paths are relative to the project root
    return pd.DataFrame(
        {
            "left": [str(outputs / "generate" / "finetuned" / g) for g in review["generated"]],
            "right": [str(p if Path(p).is_absolute() else root / p) for p in review["match_path"]],
            "expression": review["reference_set"],  # reported per reference set
            "row_id": review["generated"] + " ~ " + review["match"],
        }
    )


def stage_params(profile: str | None, params_file: Path | None = None) -> dict:
    return config.stage_params("userstudy", profile, params_file)


def run(profile: str | None, outputs: Path, out_dir: Path, params_file: Path | None = None) -> dict:
    """Both kits into `out_dir/<study>/`, and the analysis of any results file the params name."""
    params = stage_params(profile, params_file)
    out = {}
    for study in ("stylization", "memorization"):
        pairs = study_pairs(study, params, outputs)
        items = build_hits(pairs, params["per_hit"], params["seed"])
        folder = Path(out_dir) / study
        if folder.exists():
            shutil.rmtree(folder)
        out[study] = {"kit": write_kit(study, items, folder, params["image_base_url"])}
        results = params[f"{study}_results"]
        if results:
            res = analyse(study, pd.read_csv(config.path(results)), items)
            write_json(folder / "analysis.json", res)
            out[study]["analysis"] = res
    return out


def main(argv: list[str] | None = None) -> int:
    return cli.stage_main(run, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
