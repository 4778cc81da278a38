"""Notebooks are committed clean, parameterised, and each one is a stage of the DAG."""

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# notebooks for people, not the DAG, each with where it is run in the tests
NOT_STAGES = {"explore.ipynb": "tests/test_pipeline.py::test_the_explore_notebook_runs_with_its_defaults"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean_and_parameterised(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), (
        f"{path.name} has outputs: clear them before committing (executed copies are DVC outputs)"
    )
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    spec = nb["metadata"]["kernelspec"]
    assert spec["name"] == "geneava" and spec["language"] == "python"
    assert nb["cells"][0]["cell_type"] == "markdown", "the first cell says what part of the paper this is"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_parameter_is_typed_for_papermill_help(path):
    """`papermill --help-notebook` shows each parameter's type, not "Unknown type": papermill parses the
    parameters cell line by line (a line with two '=' is skipped, a `str | None` annotation not read)."""
    import papermill

    nb = json.loads(path.read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    names = [line.split(":")[0] for line in "".join(cell["source"]).splitlines() if line[:1].isalpha()]
    inferred = papermill.inspect_notebook(str(path))
    assert list(inferred) == names, f"{path.name}: papermill reads {list(inferred)}, the cell sets {names}"
    untyped = [n for n, p in inferred.items() if p["inferred_type_name"] in ("None", "")]
    assert not untyped, f'{path.name}: annotate {untyped} (e.g. `steps: "Optional[int]" = None`)'


def test_every_notebook_is_a_stage():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    commands = " ".join(
        " ".join(s["cmd"]) if isinstance(s["cmd"], list) else s["cmd"] for s in stages.values()
    )
    for nb in NOTEBOOKS:
        if nb.name in NOT_STAGES:
            assert f"{nb.name}" not in commands, f"{nb.name} explores a finished run: it is no stage"
            continue
        assert f"notebooks/{nb.name}" in commands, f"{nb.name} is run by no stage"
    for name, stage in stages.items():
        deps = stage["deps"]
        notebooks = [d for d in deps if str(d).startswith("notebooks/")]
        assert notebooks, f"stage {name} must depend on its notebook's source"
        assert not any(str(o).startswith("notebooks/") for o in stage.get("outs", [])), (
            f"stage {name} writes into notebooks/: executed copies go to the output folder"
        )


def _geneava_imports(source: str) -> set[str]:
    """geneava modules (dotted, e.g. geneava.core.config) a piece of code imports, anywhere (lazy imports
    inside functions included)."""
    import ast

    def is_module(name: str) -> bool:
        return _module_file(name).exists()

    found = set()
    for node in ast.walk(ast.parse(source)):
        assert not (isinstance(node, ast.ImportFrom) and node.level), "use absolute geneava imports"
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("geneava"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if is_module(sub) else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("geneava.")}
    return {m for m in found if m != "geneava" and is_module(m)}


def _module_file(name: str) -> Path:
    """A dotted module's file: a module, or a package's __init__.py (`from geneava import world`)."""
    path = ROOT / Path(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _reached(source: str) -> set[str]:
    todo, reached = _geneava_imports(source), set()
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo |= _geneava_imports(_module_file(module).read_text())
    return reached


def test_every_stage_depends_on_every_module_it_runs():
    """DVC reruns a stage when a dependency changes: each module the notebook reaches must be a dep,
    itself or through its package folder (core/ and networks/, most of which every stage runs)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        deps = [Path(str(d)) for d in stage["deps"]]
        notebook = next(str(d) for d in deps if str(d).startswith("notebooks/"))
        cells = json.loads((ROOT / notebook).read_text())["cells"]
        reached = _reached("\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code"))
        needed = {_module_file(m).relative_to(ROOT) for m in reached}
        if "geneava.core.emo135" in reached:
            needed.add(Path("geneava/core/emo135_classes.csv"))
        missing = sorted(str(f) for f in needed if not any(f == d or d in f.parents for d in deps))
        assert not missing, f"stage {name} runs {missing} but does not depend on them"
        assert reached, f"stage {name}: its notebook imports nothing from geneava"


# which packages each package may import (docs/decisions.md: the layout)
LAYERS = {
    "core": {"core"},
    "networks": {"core", "networks"},
    "stages": {"core", "networks", "stages"},
    "world": {"core", "networks", "world"},
    "tools": {"core", "networks", "stages", "tools"},
}


def test_imports_point_one_way():
    """core imports nothing else; networks only core; stages never the world (the world reaches a stage
    only as files); only the world's own notebook and tests import the world."""
    seen = 0
    for package, allowed in LAYERS.items():
        for f in sorted((ROOT / "geneava" / package).glob("*.py")):
            text = f.read_text()
            used = {m.split(".")[1] for m in _geneava_imports(text)}
            # a stage that runs the world's command line reaches it as surely as an import
            if '"geneava.world' in text and package != "world":
                used.add("world")
            assert used <= allowed, f"{f.relative_to(ROOT)} imports {sorted(used - allowed)}"
            seen += 1
    assert seen == len(list((ROOT / "geneava").rglob("*.py"))) - 1  # every module but geneava/__init__
    for nb in NOTEBOOKS:
        if nb.name != "00_world.ipynb":
            cells = json.loads(nb.read_text())["cells"]
            code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
            assert not any(m.startswith("geneava.world") for m in _reached(code)), nb.name


def test_every_stage_module_has_the_same_three_entry_points(capsys):
    """stage_params(profile), run(profile, <input folders>..., out_dir) and main(argv), for each stage
    of dvc.yaml; `python -m geneava.stages.<stage> --help` lists the run's folders."""
    import importlib
    import inspect
    import subprocess
    import sys

    stages = [s for s in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"] if s != "world"]
    assert len(stages) == 10
    for name in stages:
        module = importlib.import_module(f"geneava.stages.{name}")
        for entry in ("stage_params", "run", "main"):
            assert callable(getattr(module, entry, None)), f"geneava.stages.{name} has no {entry}()"
        params = list(inspect.signature(module.run).parameters)
        assert params[0] == "profile" and params[-2:] == ["out_dir", "params_file"], (name, params)
        assert list(inspect.signature(module.stage_params).parameters)[0] == "profile", name
        assert 'if __name__ == "__main__":' in inspect.getsource(module), f"{name}: python -m runs nothing"
        with pytest.raises(SystemExit) as done:
            module.main(["--help"])
        assert done.value.code == 0
        shown = capsys.readouterr().out
        for folder in params[1:-1]:
            assert f"--{folder.replace('_', '-')}" in shown, (name, folder)
    out = subprocess.run(
        [sys.executable, "-m", "geneava.stages.memorization", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--prepare-dir" in out.stdout and "--generate-dir" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "geneava.stages.release"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--outputs" in bad.stderr  # a missing folder is named


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_make_lab_starts_jupyterlab_as_this_user():
    """`make lab` as the user running the tests (root in CI and in many containers): the server comes up."""
    import os
    import signal
    import subprocess
    import time

    port = _free_port()
    args = f"LAB_ARGS=--no-browser --port={port} --ServerApp.port_retries=0 --ServerApp.token=geneava-test"
    proc = subprocess.Popen(
        ["make", "-s", "-o", ".venv/.installed", "lab", args],  # -o: never reinstall the environment here
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    import queue
    import threading

    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    seen, deadline = [], time.monotonic() + 120
    try:
        while time.monotonic() < deadline and not any(f":{port}/lab" in x for x in seen):
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                if proc.poll() is not None:
                    break
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert any(f":{port}/lab" in line for line in seen), "".join(seen[-20:])


def test_make_lab_allows_root_only_for_root():
    import subprocess

    as_me = subprocess.run(["make", "-n", "lab"], cwd=ROOT, capture_output=True, text=True).stdout
    assert ("--allow-root" in as_me) == (os.geteuid() == 0)
    if os.geteuid() == 0 and shutil.which("runuser"):  # the same Makefile for an ordinary user
        other = subprocess.run(
            ["runuser", "-u", "nobody", "--", "make", "-n", "lab"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert "jupyter lab notebooks" in other.stdout and "--allow-root" not in other.stdout, other.stderr


# functions over ~80 lines, each with its reason in docs/decisions.md ("A few functions stay long")
LONG_FUNCTIONS = {
    "geneava/stages/finetune.py:finetune",
    "geneava/world/standin.py:render_face",
    "geneava/stages/refill.py:refill",
    "geneava/core/resume.py:run_rounds",
    "geneava/stages/evaluate.py:evaluate",
    "geneava/tools/results.py:render",
}


def test_modules_and_functions_stay_short_enough_to_read():
    """No module over ~400 lines (440 allowed) and no function over 80 lines but those the docs explain."""
    import ast

    decisions = (ROOT / "docs/decisions.md").read_text()
    long_ones = set()
    for f in sorted((ROOT / "geneava").rglob("*.py")):
        text = f.read_text()
        rel = str(f.relative_to(ROOT))
        assert text.count("\n") <= 440, f"{rel} has {text.count(chr(10))} lines: split it by role"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if node.end_lineno - node.lineno + 1 > 80:
                    long_ones.add(f"{rel}:{node.name}")
    assert long_ones <= LONG_FUNCTIONS, (
        f"long functions without a reason: {sorted(long_ones - LONG_FUNCTIONS)}"
    )
    for entry in LONG_FUNCTIONS:
        path, name = entry.split(":")
        assert f"`{path}: {name}`" in decisions, f"docs/decisions.md does not say why {entry} stays long"
