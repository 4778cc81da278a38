"""Your run against the reference run: what reproduces bit for bit, and what within the confidence intervals.

The reference run's metrics files (every stage's DVC metrics, as `make repro` wrote them) are committed in
`reference/metrics/`, with the machine they were made on in `reference/metrics/machine.json`.

    python -m geneava.tools.reference compare  # (make compare) after make repro: exit 1 when a number is off
    python -m geneava.tools.reference update   # maintainers: copy this run's metrics in as the new reference
                                               # (and regenerate docs/results.md from them)

How closely a run reproduces the reference:
- on the same machine with the same number of threads, every number is identical (the code seeds every
  draw and the resume mechanism rebuilds the same batches);
- on another machine, floating point differs (other CPUs pick other kernels and summation orders), so
  LoRA weights, images and counts can differ a little; every estimate that carries a confidence interval
  (Table 1's differences, recognition, the ablation) must then fall inside the reference's interval.
A number outside its reference interval fails the comparison; a number without an interval that differs
is listed, not failed (counts of a filter, hashes of weights).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path

import yaml

from geneava.core import config
from geneava.core.io import write_json

REFERENCE = Path("reference") / "metrics"
CI_KEYS = {"mean", "lo", "hi"}


def metrics_files(root: Path) -> list[Path]:
    """The DVC metrics files of the pipeline's stages (dvc.yaml), relative to the root; the frozen world
    stage's are committed already and left out."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    out = []
    for stage in stages.values():
        if stage.get("frozen"):
            continue
        for entry in stage.get("metrics", []):
            out.append(Path(next(iter(entry)) if isinstance(entry, dict) else entry))
    return out


def _flatten(node, prefix: str = "") -> dict[str, object]:
    """Leaves by dotted path; a {mean, lo, hi} node is one leaf (an estimate with its interval)."""
    if isinstance(node, dict):
        if CI_KEYS <= set(node):
            return {prefix: {k: node[k] for k in CI_KEYS}}
        out = {}
        for key, value in node.items():
            out |= _flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    return {prefix: node}


def compare_values(mine, ref) -> str:
    """identical, within CI, outside CI, differs (no CI), or missing."""
    if mine is None and ref is not None:
        return "missing"
    if mine == ref:
        return "identical"
    if isinstance(ref, dict) and isinstance(mine, dict):
        if None in (ref["lo"], ref["hi"], mine["mean"]):
            return "differs (no CI)"
        return "within CI" if ref["lo"] <= mine["mean"] <= ref["hi"] else "outside CI"
    return "differs (no CI)"


def compare(root: Path) -> list[dict]:
    """One row per number of every metrics file: reference value, this run's, and the verdict."""
    rows = []
    for rel in metrics_files(root):
        ref_file, mine_file = root / REFERENCE / rel, root / rel
        if not ref_file.is_file():
            raise FileNotFoundError(f"{ref_file} is missing: the reference has no {rel}")
        if not mine_file.is_file():
            raise FileNotFoundError(f"{mine_file} not found: run `make repro` first")
        ref = _flatten(json.loads(ref_file.read_text()))
        mine = _flatten(json.loads(mine_file.read_text()))
        for key in sorted(set(ref) | set(mine)):
            verdict = compare_values(mine.get(key), ref.get(key))
            if key not in ref:
                verdict = "new (no reference)"
            rows.append(
                {
                    "file": str(rel),
                    "metric": key,
                    "reference": ref.get(key),
                    "yours": mine.get(key),
                    "verdict": verdict,
                }
            )
    return rows


def _show(value) -> str:
    if isinstance(value, dict):
        return (
            f"{value['mean']:.4g} [{value['lo']:.4g}, {value['hi']:.4g}]"
            if value.get("lo") is not None
            else str(value)
        )
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def report(rows: list[dict], everything: bool = False) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    machine = _machine_file()
    lines = [
        f"Your run against the reference run ({machine.get('machine', '?')}, "
        f"{machine.get('threads', '?')} threads, {machine.get('date', '?')}):",
        "  " + ", ".join(f"{n} {v}" for v, n in sorted(counts.items())),
    ]
    shown = [r for r in rows if everything or r["verdict"] not in ("identical", "new (no reference)")]
    for r in shown:
        lines.append(
            f"  [{r['verdict']}] {r['file']}: {r['metric']}: "
            f"reference {_show(r['reference'])}, yours {_show(r['yours'])}"
        )
    if counts.get("outside CI") or counts.get("missing"):
        lines.append("FAILED: a number is outside the reference's confidence interval (or missing).")
    elif set(counts) <= {"identical"}:
        lines.append("Bit for bit: every number is the reference's.")
    else:
        lines.append("Reproduced within the reference's confidence intervals (other numbers listed above).")
    return "\n".join(lines)


def _machine_file(root: Path | None = None) -> dict:
    path = (root or config.project_root()) / REFERENCE / "machine.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def stale_stages(root: Path) -> list[str]:
    """The stages `dvc status` says are out of date (changed code, params, data or weights): their
    metrics are not the current configuration's, so comparing them would say nothing."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"`dvc status` failed in {root}: {done.stderr.strip()[-500:]}")
    return sorted(json.loads(done.stdout or "{}"))


def _check_current(root: Path) -> None:
    stale = stale_stages(root)
    if stale:
        raise StaleRun(
            f"these stages are out of date: {', '.join(stale)}. Their metrics are not those of the current "
            "code and params.yaml: run `make repro` first (`dvc status` lists what changed)."
        )
    profile = _profile(root)
    ref_profile = _machine_file(root).get("profile", "default")
    if profile != ref_profile:
        raise StaleRun(f"the active profile is {profile!r}; the reference run's is {ref_profile!r}")


def _profile(root: Path) -> str | None:
    return (config.read_yaml(root / "params.yaml") or {}).get("profile")


class StaleRun(RuntimeError):
    """The outputs in the workspace are not the current configuration's."""


def update(root: Path, repro_seconds: float | None = None) -> list[Path]:
    """Copy this run's metrics files into reference/metrics (with the machine they were made on)."""
    import datetime

    import torch

    _check_current(root)
    copied = []
    for rel in metrics_files(root):
        src = root / rel
        if not src.is_file():
            raise FileNotFoundError(f"{src} not found: run `make repro` first")
        dest = root / REFERENCE / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        copied.append(dest)
    write_json(
        root / REFERENCE / "machine.json",
        {
            "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "date": datetime.date.today().isoformat(),
            "profile": _profile(root),
            # `make repro` from a fresh clone with empty package caches, venv included, when timed
            **({"repro_seconds": round(repro_seconds)} if repro_seconds else {}),
        },
    )
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare this run's metrics with the reference run's.")
    parser.add_argument("command", choices=("compare", "update"))
    parser.add_argument("--all", action="store_true", help="list identical numbers too")
    parser.add_argument(
        "--repro-seconds", type=float, help="update: how long `make repro` took from a fresh clone"
    )
    args = parser.parse_args(argv)
    root = config.project_root()
    try:
        if args.command == "update":
            for path in update(root, args.repro_seconds):
                print(f"reference: {path.relative_to(root)}")
            from geneava.tools import results

            return results.main([])  # docs/results.md follows the new reference
        _check_current(root)
        rows = compare(root)
    except (FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(rows, args.all))
    return 1 if any(r["verdict"] in ("outside CI", "missing") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
