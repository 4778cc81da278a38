"""Notebooks are committed clean, parameterised, and each one is a stage of the DAG."""

import json
import os
import shutil

import pytest
import yaml

from .conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


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


def test_every_notebook_is_a_stage():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    commands = " ".join(
        " ".join(s["cmd"]) if isinstance(s["cmd"], list) else s["cmd"] for s in stages.values()
    )
    for nb in NOTEBOOKS:
        assert f"notebooks/{nb.name}" in commands, f"{nb.name} is run by no stage"
    for name, stage in stages.items():
        deps = stage["deps"]
        notebooks = [d for d in deps if str(d).startswith("notebooks/")]
        assert notebooks, f"stage {name} must depend on its notebook's source"
        assert not any(str(o).startswith("notebooks/") for o in stage.get("outs", [])), (
            f"stage {name} writes into notebooks/: executed copies go to the output folder"
        )


def _geneava_imports(source: str) -> set[str]:
    """geneava modules a piece of code imports (anywhere, lazy imports inside functions included)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module == "geneava":
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("geneava."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("geneava.")}
    return found


def test_every_stage_depends_on_every_module_it_runs():
    """DVC reruns a stage when a dependency changes: each module the notebook reaches must be a dep."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        deps = {str(d) for d in stage["deps"]}
        notebook = next(d for d in deps if d.startswith("notebooks/"))
        cells = json.loads((ROOT / notebook).read_text())["cells"]
        todo = set().union(
            *(_geneava_imports("".join(c["source"])) for c in cells if c["cell_type"] == "code")
        )
        reached = set()
        while todo:
            module = todo.pop()
            if module in reached or not (ROOT / "geneava" / f"{module}.py").exists():
                continue
            reached.add(module)
            todo |= _geneava_imports((ROOT / "geneava" / f"{module}.py").read_text())
        needed = {f"geneava/{m}.py" for m in reached} | (
            {"geneava/emo135_classes.csv"} if "emo135" in reached else set()
        )
        missing = sorted(needed - deps)
        assert not missing, f"stage {name} runs {missing} but does not depend on them"


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
