"""The default DAG end to end, as a fresh clone runs it: papermill notebooks under `dvc repro`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from .conftest import ROOT

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
# stages reading generated images; they rerun when the images change (their caches and avatars are
# `persist: true`, outside DVC's run cache), and their caches keep reruns cheap
AFTER_GENERATE = {"evaluate", "memorization", "stylize", "ablation", "refill"}
CACHEABLE = {"release", "userstudy"}
SMALL = {
    ("prepare", "default", "finetune_per_class"): 1,
    ("prepare", "default", "eval_per_class"): 2,
    ("finetune", "default", "epochs"): 1,
    ("finetune", "default", "batch_size"): 4,
    ("finetune", "default", "checkpoint_every"): 20,
    ("generate", "default", "limit"): 8,
    ("generate", "default", "steps"): 4,
    ("generate", "default", "batch_size"): 4,
    ("evaluate", "default", "include"): "all",
    ("memorization", "default", "include"): "all",
    ("stylize", "default", "include"): "all",
    ("release", "default", "include"): "all",
    ("refill", "default", "max_attempts"): 10,  # as the default: at 4 steps a row can fail twice (one did)
}


def _run(args, cwd, check=True):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(cwd))
    env.pop("GENEAVA_ROOT", None)
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and done.returncode:
        raise AssertionError(
            f"{' '.join(map(str, args))} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    return done


def _status(cwd) -> set[str]:
    out = _run([BIN / "dvc", "status", "--json"], cwd).stdout
    return set(json.loads(out or "{}"))


def _pinned(cwd: Path) -> dict:
    """dvc.lock's output hashes, executed notebooks aside (papermill stamps times into them)."""
    lock = yaml.safe_load((cwd / "dvc.lock").read_text())["stages"]
    return {
        (name, o["path"]): o.get("md5") or o.get("hash")
        for name, stage in lock.items()
        for o in stage.get("outs", [])
        if not o["path"].endswith(".ipynb")
    }


def _edit(cwd: Path, path: tuple, value):
    text = (cwd / "params.yaml").read_text()
    raw = yaml.safe_load(text)
    node = raw
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    (cwd / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return text


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A copy of the working tree (tracked and not-ignored files), as a fresh clone has it."""
    dest = tmp_path_factory.mktemp("clone")
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    _run(["git", "init", "-q"], dest)
    # what setup fetched (git-ignored, as in a fresh clone after `make setup`)
    shutil.copytree(ROOT / "models/pretrained", dest / "models/pretrained", dirs_exist_ok=True)
    # the DAG's machinery at a smaller size than the default run (which `make repro` shows in ~10 min):
    # fewer images and steps, and every image used whatever QC says
    for path, value in SMALL.items():
        _edit(dest, path, value)
    _run([sys.executable, "-m", "geneava.world.dataset", "--ensure", "data"], dest)
    _run([BIN / "dvc", "repro"], dest)
    return dest


def test_repro_runs_every_stage_through_papermill(clone):
    stages = yaml.safe_load((clone / "dvc.yaml").read_text())["stages"]
    assert stages["world"].get("frozen") and (clone / "models/world/00_world.ipynb").is_file()  # committed
    for name in set(stages) - {"world"}:
        executed = list((clone / "outputs" / name).glob("*.ipynb"))
        assert len(executed) == 1, f"stage {name} left no executed notebook"
        nb = json.loads(executed[0].read_text())
        assert nb["metadata"]["papermill"]["parameters"]["profile"] == "default"
        assert any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")
    # prepare ran the detector the params name (the world's trained RetinaFace) and filled every class
    report = json.loads((clone / "outputs/prepare/report.json").read_text())
    params = yaml.safe_load((clone / "params.yaml").read_text())
    prep, det = params["prepare"]["default"], params["detector"]["default"]
    assert report["detector"] == f"retinaface-torch ({Path(det['detector']).name})"
    assert not report["short_classes"]
    assert report["finetune_images"] == 135 * prep["finetune_per_class"]
    assert report["eval_images"] == 135 * prep["eval_per_class"]
    # the planted unusable files (dataset.HARD_CASES) were reached and filtered
    assert report["status"]["no face"] > 0 and report["status"]["several faces"] > 0
    assert report["status"]["duplicate across classes"] > 0
    assert (clone / "outputs/finetune/lora/pytorch_lora_weights.safetensors").is_file()
    for variant in ("finetuned", "baseline"):  # same rows, QC'd
        m = pd.read_csv(clone / f"outputs/generate/{variant}/manifest.csv", keep_default_na=False)
        assert (
            len(m) == 8
            and m["row_id"].is_unique
            and m["qc"].isin(["pass", "no face", "several faces", "face too close"]).all()
        )
        assert len(list((clone / f"outputs/generate/{variant}/images").rglob("*.png"))) == 8
    # Table 1 with CIs, readable by `dvc metrics show`
    shown = _run([BIN / "dvc", "metrics", "show", "--json"], clone).stdout
    table = json.loads(shown)
    table = next(iter(table.values()))["data"]["outputs/evaluate/metrics.json"]["data"]["per_class_pairs"]
    for variant in ("finetuned", "baseline", "difference"):
        for m in ("clip", "dino", "lpips", "exp"):
            s = table[variant][m]
            assert s["lo"] <= s["mean"] <= s["hi"], (variant, m, s)
    assert "GenEAva (fine-tuned)" in (clone / "outputs/evaluate/table1.md").read_text()
    # the identity audit ran a real identity model and derived a threshold from labelled pairs
    memo = json.loads((clone / "outputs/memorization/metrics.json").read_text())
    assert memo["identity_model"] == "world-arcface (identity.safetensors)"
    assert memo["generated_images"] == 8 and memo["finetune"]["images"] == 135 * prep["finetune_per_class"]
    assert memo["derived"]["pairs"] == len(pd.read_csv(clone / "data/pairs/identity.csv")) > 0
    removal = pd.read_csv(clone / "outputs/memorization/removal.csv")
    assert set(removal.columns) >= {"row_id", "file", "reference_set", "rule"}
    # every generated face has exactly one avatar, of its size
    pairs = pd.read_csv(clone / "outputs/stylize/pairs.csv")
    gen = pd.read_csv(clone / "outputs/generate/finetuned/manifest.csv")
    assert sorted(pairs["row_id"]) == sorted(gen["row_id"]) and pairs["avatar"].is_unique
    for r in pairs.itertuples():
        real, avatar = clone / "outputs/generate" / r.realistic, clone / "outputs/stylize" / r.avatar
        assert Image.open(real).size == Image.open(avatar).size
    assert json.loads((clone / "outputs/stylize/metrics.json").read_text())["pairs"] == len(gen)
    # the release accounts for every generated row: released or excluded with a reason
    rel = json.loads((clone / "outputs/release/report.json").read_text())
    assert rel["images"] + rel["excluded"] == len(gen) and rel["cells"] == len(gen)
    # the user-study kits: every stylization pair once per HIT set, one attention check per HIT
    items = pd.read_csv(clone / "outputs/userstudy/stylization/items.csv")
    assert sorted(items.loc[~items["is_check"], "row_id"]) == sorted(gen["row_id"])
    assert items.groupby("hit")["is_check"].sum().eq(1).all()
    assert (clone / "outputs/userstudy/memorization/hit_0.html").is_file()


def test_everything_up_to_date_and_second_repro_is_a_no_op(clone):
    # data.dvc's pinned hash matches the stand-in regenerated from code
    assert _status(clone) == set()
    start = time.monotonic()
    out = _run([BIN / "dvc", "repro"], clone).stdout
    assert "didn't change" in out or "up to date" in out
    assert "Running stage" not in out
    assert time.monotonic() - start < 60


@pytest.mark.parametrize(
    "path, value, changed",
    [
        (("generate", "default", "steps"), 3, {"generate", "ablation", "refill"}),
        (("finetune", "default", "lr"), 3.0e-4, {"finetune", "ablation"}),
        (("prepare", "default", "seed"), 1, {"prepare"}),
        # the one detector section: every stage that finds faces, and those reading their blocks
        (
            ("detector", "default", "detector_pack"),
            "antelopev2",
            {"prepare", "generate", "evaluate", "ablation", "refill"},
        ),
        (
            ("prompts", "default", "negative"),
            "blurry",
            {"finetune", "generate", "stylize", "ablation", "refill"},
        ),
        (("finetune", "paper", "lr"), 2.0e-6, set()),  # another profile's value touches nothing here
        (("world", "default", "lr"), 5.0e-4, set()),  # frozen: the committed world models stay
        (("evaluate", "default", "n_boot"), 500, {"evaluate", "ablation"}),
        (("ablation", "default", "alpha"), 0.5, {"ablation"}),
        (("memorization", "default", "threshold"), 0.7, {"memorization", "refill"}),
        (("stylize", "default", "colors"), 8, {"stylize", "refill"}),
        (("refill", "default", "max_attempts"), 3, {"refill"}),
        (("release", "default", "balance"), "report", {"release"}),
        (("userstudy", "default", "per_hit"), 10, {"userstudy"}),
        (("profile",), "paper", {"prepare", "finetune", "generate", *AFTER_GENERATE, *CACHEABLE}),
    ],
)
def test_a_param_change_marks_only_its_stages(clone, path, value, changed):
    """`dvc status` names the stages whose own params changed (downstream follows via their deps)."""
    node = yaml.safe_load((clone / "params.yaml").read_text())
    for part in path:
        node = node[part]
    assert node != value, f"{'.'.join(path)} is already {value!r}: pick another test value"
    original = _edit(clone, path, value)
    try:
        assert _status(clone) == changed
    finally:
        (clone / "params.yaml").write_text(original)
    assert _status(clone) == set()


def _ran(log: str) -> set[str]:
    """The stages a repro ran, less those without persistent outputs downstream of generation: DVC may
    restore them from its run cache instead of running them (which of the two is DVC's choice)."""
    ran = {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage '")}
    return ran - CACHEABLE


def test_repro_after_a_change_reruns_that_stage_and_what_follows(clone):
    """A changed threshold reruns memorization and refill (which reads its removal list) and nothing
    upstream; back to the original value, both run again (their resumable outputs are `persist: true`,
    which DVC keeps out of its run cache) and give the pinned results: `dvc status` is clean. (Which stages
    a change in any other parameter marks is test_a_param_change_marks_only_its_stages; rerunning
    finetune and generate is left to their own tests, as it takes most of a repro.)"""
    pinned = _pinned(clone)
    original = _edit(clone, ("memorization", "default", "threshold"), 0.7)
    try:
        assert _ran(_run([BIN / "dvc", "repro"], clone).stdout) == {"memorization", "refill"}
        assert _status(clone) == set()
    finally:
        (clone / "params.yaml").write_text(original)
    assert _ran(_run([BIN / "dvc", "repro"], clone).stdout) == {"memorization", "refill"}
    assert _status(clone) == set()
    assert _pinned(clone) == pinned  # the same outputs, byte for byte


def test_bad_param_fails_before_any_model_is_built(clone):
    pinned = _pinned(clone)
    original = _edit(clone, ("finetune", "default", "lr"), -1.0)
    try:
        done = _run([BIN / "dvc", "repro"], clone, check=False)
        assert done.returncode != 0
        log = done.stdout + done.stderr
        assert "finetune.default.lr" in log
        # the executed notebook stops at the cell that reads the parameters: training never started
        cells = json.loads((clone / "outputs/finetune/02_finetune.ipynb").read_text())["cells"]
        code = [c for c in cells if c["cell_type"] == "code"]
        failed = [i for i, c in enumerate(code) if any(o["output_type"] == "error" for o in c["outputs"])]
        training = next(i for i, c in enumerate(code) if "finetune.run(" in "".join(c["source"]))
        assert failed and failed[0] < training and code[training]["execution_count"] is None
    finally:
        (clone / "params.yaml").write_text(original)
    # DVC removed finetune's outputs before running it (its uncached metrics among them): a repro makes
    # them again from the last checkpoint, the LoRA is the same bytes, and nothing downstream reruns
    ran = _ran(_run([BIN / "dvc", "repro"], clone).stdout)
    assert ran == {"finetune"}
    assert _status(clone) == set() and _pinned(clone) == pinned


@pytest.mark.parametrize(
    ("weights", "users"),
    [
        ("models/world/poster.safetensors", {"finetune", "evaluate", "stylize", "ablation", "refill"}),
        ("models/world/identity.safetensors", {"memorization", "stylize", "refill"}),
    ],
)
def test_weights_replaced_in_place_mark_the_stages_that_use_them(clone, weights, users):
    """The stages that read the file, and `world`, whose committed output it is (frozen: DVC reports its
    changed outputs, never reruns it)."""
    users = users | {"world"}
    path = clone / weights
    original = path.read_bytes()
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    first = sorted(state)[0]
    state[first] = state[first] + 1  # retrained in place: same path, other weights
    save_file(state, path)
    try:
        assert _status(clone) == users
    finally:
        path.write_bytes(original)
    assert _status(clone) == set()


@pytest.mark.parametrize(
    ("notebook", "stage", "params"),
    [
        ("01_prepare.ipynb", "prepare", ["-p", "profile", "default"]),
        ("04_evaluate.ipynb", "evaluate", ["-p", "profile", "default"]),
        ("05_memorization.ipynb", "memorization", ["-p", "profile", "default"]),
    ],
)
def test_a_notebook_run_from_the_root_gives_what_the_stage_gave_in_notebooks(
    clone, tmp_path, notebook, stage, params
):
    """DVC ran each stage's kernel in notebooks/ (papermill --cwd notebooks, as JupyterLab starts it);
    the same notebook with its kernel in the project root writes the same results."""
    out = tmp_path / stage
    out.mkdir()
    _run(
        [
            BIN / "papermill",
            f"notebooks/{notebook}",
            str(out / notebook),
            "-k",
            "geneava",
            *params,
            "-p",
            "out_dir",
            str(out),
        ],
        clone,
    )
    mine, dvc = out, clone / "outputs" / stage
    for name in ("metrics.json", "report.json"):
        assert (dvc / name).is_file() and (mine / name).is_file(), name
        assert json.loads((mine / name).read_text()) == json.loads((dvc / name).read_text()), name
    if stage == "prepare":
        assert (mine / "data/manifest.csv").read_bytes() == (dvc / "data/manifest.csv").read_bytes()
    if stage == "evaluate":
        assert (mine / "table1.md").read_text() == (dvc / "table1.md").read_text()
    if stage == "memorization":
        assert (mine / "removal.csv").read_bytes() == (dvc / "removal.csv").read_bytes()


def test_every_local_weight_of_either_profile_is_a_dependency_of_the_stages_that_read_it(params):
    """So replacing a weight file in place (a retrained world model, the paper's POSTER) reruns exactly
    the stages that read it, whichever profile is active. A stage module's IGNORED lists say which keys
    of a block it reads cannot change its outputs."""
    from geneava.core import config
    from geneava.stages import evaluate, generate

    not_read = {"generate": generate.IGNORED, "evaluate": evaluate.CACHE_IGNORED}
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    checked = 0
    for name, stage in stages.items():
        read: dict[str, set | None] = {}  # section -> keys read (None: the whole block)
        for entry in stage.get("params", []):
            parts = entry.split(".")
            if len(parts) == 2:
                read[parts[0]] = None
            elif len(parts) == 3:
                read.setdefault(parts[0], set()).add(parts[2])
        deps = [Path(d) for d in stage["deps"]]
        for section, key, names, hub, used in config.WEIGHT_KEYS:
            if section not in read or (read[section] is not None and key not in read[section]):
                continue
            if key in not_read.get(name, {}).get(section, {}):
                continue
            for profile in config.PROFILES:
                block = params[section][profile]
                value = block[key]
                if value is None or value in names or not used(block) or (hub and value.count("/") == 1):
                    continue
                path = Path(value)
                assert any(path == d or d in path.parents for d in deps), (
                    f"stage {name} reads {section}.{profile}.{key} = {value} but does not depend on it"
                )
                checked += 1
    assert checked > 20


def test_every_data_path_a_stage_reads_is_one_of_its_dependencies(params):
    """A file or folder under data/ named in a params block a stage reads (Emo135, the labelled pairs,
    a local CelebA and its identity file) is covered by one of the stage's DVC deps, whichever profile is
    active: editing it reruns the stage (a reference folder once was not a dependency, and the audit
    stayed stale). Paths elsewhere are read but not tracked, as the docs say."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    checked = []
    for name, stage in stages.items():
        deps = [Path(d) for d in stage["deps"]]
        for entry in stage.get("params", []):
            section, *rest = entry.split(".")
            if not rest or section not in params or not isinstance(params[section], dict):
                continue
            for profile, block in params[section].items():
                if not isinstance(block, dict) or profile.startswith("_"):
                    continue
                keys = block if len(rest) == 1 else [rest[1]]
                for key in keys:
                    value = block.get(key)
                    if not isinstance(value, str) or not value.startswith("data/"):
                        continue
                    path = Path(value)
                    assert any(path == d or d in path.parents for d in deps), (
                        f"stage {name} reads {section}.{profile}.{key} = {value} but does not depend on it"
                    )
                    checked.append((name, key))
    assert ("memorization", "reference") in checked and ("refill", "reference_identities") in checked


def test_outputs_are_readable_by_other_users(clone):
    """Files 0666 and folders 0777 less the umask (0644/0755 under 022): a web server or a colleague can
    read the release and the HIT pages; nothing is left private by mkstemp/mkdtemp."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    private = [
        str(p.relative_to(clone))
        for p in (clone / "outputs").rglob("*")
        if not p.is_symlink() and p.stat().st_mode & 0o777 != (0o777 if p.is_dir() else 0o666) & ~mask
    ]
    assert not private, private[:10]


def test_the_explore_notebook_runs_with_its_defaults(clone, tmp_path):
    """notebooks/explore.ipynb (not a stage) under papermill in the finished clone: the widgets are built,
    the side-by-side and the new faces and avatars are drawn, and nothing is written into outputs/."""
    before = {p: p.stat().st_mtime_ns for p in (clone / "outputs").rglob("*") if p.is_file()}
    pairs = pd.read_json(clone / "outputs/release/GenEAva-1.0/train/metadata.jsonl", lines=True)
    first = pairs.sort_values(["expression", "race", "gender", "age"]).iloc[0]
    cell = [a for c in ("expression", "race", "gender", "age") for a in ("-p", c, str(first[c]))]
    _run([BIN / "papermill", "notebooks/explore.ipynb", str(tmp_path / "explore.ipynb"), "-k", "geneava",
          "--cwd", "notebooks", *cell, "-p", "n", "2"], clone)  # fmt: skip
    cells = json.loads((tmp_path / "explore.ipynb").read_text())["cells"]
    outputs = [o for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])]
    kinds = [k for o in outputs for k in o.get("data", {})]
    assert "application/vnd.jupyter.widget-view+json" in kinds  # the browser
    for call in ("side_by_side(", "drawn_grid("):  # each figure drawn in its own cell
        cell = next(c for c in cells if call in "".join(c["source"]))
        assert any("image/png" in o.get("data", {}) for o in cell["outputs"]), call
    assert not [o for o in outputs if o.get("output_type") == "error"]
    after = {p: p.stat().st_mtime_ns for p in (clone / "outputs").rglob("*") if p.is_file()}
    assert after == before


def test_notebook_parameters_override_params_yaml_for_that_run(clone, tmp_path):
    """`-p steps 2 -p limit 3` on the generate notebook: those values, the rest from params.yaml."""
    out = tmp_path / "generate"
    _run([BIN / "papermill", "notebooks/03_generate.ipynb", str(tmp_path / "03.ipynb"), "-k", "geneava",
          "--cwd", "notebooks", "-p", "out_dir", str(out), "-p", "lora_dir", "outputs/finetune/lora",
          "-p", "steps", "2", "-p", "limit", "3"], clone)  # fmt: skip
    params = yaml.safe_load((clone / "params.yaml").read_text())["generate"]["default"]
    for variant in ("finetuned", "baseline"):
        m = pd.read_csv(out / variant / "manifest.csv", keep_default_na=False)
        assert len(m) == 3 and (m["steps"] == 2).all()
        assert (m["guidance_scale"] == params["guidance_scale"]).all() and params["steps"] != 2
    assert yaml.safe_load((out / "params.overrides.yaml").read_text())["generate"]["default"]["steps"] == 2
