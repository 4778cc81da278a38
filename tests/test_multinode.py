"""Beyond one machine: a stage run as two "machines" on localhost (accelerate launch --num_machines 2, one
process each, a CPU gloo group) makes what one machine makes, image for image and weight for weight.

The commands are the ones docs/multinode.md gives for SLURM (`accelerate launch ... -m geneava.stages.X`
on every node), with the main process's address 127.0.0.1."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from geneava.stages import finetune

from .conftest import ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _params_file(path, **blocks) -> str:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for stage, over in blocks.items():
        raw[stage]["default"].update(over)
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def two_machines(module: str, args: list[str], logs, timeout: int = 900, script: bool = False) -> list[str]:
    """`accelerate launch --num_machines 2 --machine_rank r` for r = 0, 1, each one process, started
    together (rank 0 hosts the rendezvous); both must exit 0. Returns each machine's output (written to
    files in `logs`, so neither can block on a full pipe)."""
    port = str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # as parallel.launch gives
    procs, files = [], []
    logs.mkdir(parents=True, exist_ok=True)
    for rank in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_machines",
            "2",
            "--num_processes",
            "2",  # in all: one per machine
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            port,
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            *([] if script else ["-m"]),
            module,
            *args,
        ]
        files.append(open(logs / f"machine{rank}.log", "w"))  # noqa: SIM115 (closed below)
        procs.append(subprocess.Popen(cmd, env=env, stdout=files[-1], stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p, f in zip(procs, files, strict=True):
            p.kill()
            f.close()
    outputs = [(logs / f"machine{rank}.log").read_text(errors="replace") for rank in (0, 1)]
    for rank, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"machine {rank} failed:\n{out[-3000:]}"
    return outputs


PROBE = """
import sys
from pathlib import Path
from accelerate import PartialState
s = PartialState(cpu=True)
Path(sys.argv[1], f"rank{s.process_index}").write_text(f"{s.num_processes} {s.local_process_index}")
"""


@pytest.mark.e2e
def test_two_machines_form_one_group_of_two(tmp_path):
    """What the stages see under two_machines: one process group of 2, ranks 0 and 1, each its machine's
    only (local rank 0), so generate shards its rows and finetune all-reduces across the machines."""
    (tmp_path / "probe.py").write_text(PROBE)
    two_machines(str(tmp_path / "probe.py"), [str(tmp_path)], tmp_path / "logs", script=True)
    assert (tmp_path / "rank0").read_text() == "2 0"
    assert (tmp_path / "rank1").read_text() == "2 0"


@pytest.mark.e2e
def test_generate_on_two_machines_equals_one_process(trained, tmp_path):
    p = _params_file(tmp_path / "params.yaml", generate={"limit": 8, "batch_size": 2, "qc": False})
    lora = ["--lora-dir", str(trained / "lora"), "--params", p]
    subprocess.run(
        [sys.executable, "-m", "geneava.stages.generate", "--out-dir", str(tmp_path / "one"), *lora],
        check=True,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    logs = two_machines(
        "geneava.stages.generate", ["--out-dir", str(tmp_path / "two"), *lora], tmp_path / "logs"
    )
    for out in logs:  # each machine rendered its half of the 8 rows (its progress bar's final count)
        assert re.search(r"generate two: 4img", out) and not re.search(r"generate two: [5-8]img", out), out[
            -2000:
        ]
    one = pd.read_csv(tmp_path / "one" / "manifest.csv", keep_default_na=False)
    two = pd.read_csv(tmp_path / "two" / "manifest.csv", keep_default_na=False)
    assert len(one) == 8 and two["row_id"].tolist() == one["row_id"].tolist()
    assert two["sha256"].tolist() == one["sha256"].tolist()  # image for image
    for f in one["file"]:  # and the files themselves
        assert (tmp_path / "two" / f).read_bytes() == (tmp_path / "one" / f).read_bytes()


@pytest.mark.e2e
def test_finetune_on_two_machines_equals_two_processes_on_one(prepared, tmp_path):
    """Data-parallel training on two machines is the same computation as on two local processes (same
    ranks, shards and all-reduce): the LoRA weights and the loss log are equal."""
    p = _params_file(tmp_path / "params.yaml", finetune={"num_processes": 2, "max_train_steps": 3})
    finetune.run(None, prepared, tmp_path / "local", p)  # one machine, parallel.launch's two processes
    args = ["--prepare-dir", str(prepared), "--out-dir", str(tmp_path / "nodes"), "--params", p]
    two_machines("geneava.stages.finetune", args, tmp_path / "logs")
    local = load_file(tmp_path / "local" / "lora" / finetune.LORA_FILE)
    nodes = load_file(tmp_path / "nodes" / "lora" / finetune.LORA_FILE)
    assert local.keys() == nodes.keys() and local
    assert all(torch.equal(local[k], nodes[k]) for k in local)  # weight for weight
    # trained, not two copies of the initial state (LoRA's B matrices start at zero)
    assert any(v.abs().sum() > 0 for k, v in local.items() if "lora_B" in k or "lora.up" in k)
    a = pd.read_csv(tmp_path / "local" / "loss.csv")
    b = pd.read_csv(tmp_path / "nodes" / "loss.csv")
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.e2e
def test_baseline_with_two_processes_equals_one(tmp_path, capfd):
    """The baseline has no LoRA: the launched processes get no --lora-dir (parallel.launch_stage leaves
    None out) and the stage's command line accepts that."""
    from geneava.stages import generate

    one = generate.run(None, None, tmp_path / "one", _params_file(tmp_path / "p1.yaml", generate=GEN))
    two = generate.run(
        None, None, tmp_path / "two", _params_file(tmp_path / "p2.yaml", generate={**GEN, "num_processes": 2})
    )
    assert len(one) == 4 and two["sha256"].tolist() == one["sha256"].tolist()
    err = capfd.readouterr().err  # each process rendered 2 of the 4 rows
    assert len(re.findall(r"generate two: 2img \[", err)) == 2 and not re.search(
        r"generate two: [34]img", err
    )


GEN = {"limit": 4, "batch_size": 2, "qc": False, "steps": 4}


class _Stop(Exception):
    pass


def test_the_ablation_trains_and_renders_as_the_stages_do(tmp_path, monkeypatch):
    """The ablation's fine-tune runs through finetune.run with the finetune block unchanged but alpha (so
    with num_processes 4 it is the same DDP run, not a one-process run of another global batch), and its
    images through generate.run."""
    from geneava.core import config
    from geneava.stages import ablation, generate

    p = _params_file(tmp_path / "params.yaml", finetune={"num_processes": 4}, generate={"num_processes": 3})
    seen = {}

    def fake_finetune_run(profile, prepare_dir, out_dir, params_file):
        seen["finetune"] = config.blocks("finetune", "models", profile=profile, path=params_file)
        return pd.DataFrame()

    def fake_generate_run(profile, lora_dir, out_dir, params_file=None):
        seen["generate"] = (lora_dir, config.stage_params("generate", profile, params_file))
        raise _Stop

    monkeypatch.setattr(finetune, "run", fake_finetune_run)
    monkeypatch.setattr(generate, "run", fake_generate_run)
    with pytest.raises(_Stop):
        ablation.run(None, tmp_path / "prepare", tmp_path / "generate", tmp_path / "ablation", p)
    stage = config.blocks("finetune", "models", "ablation", path=p)
    assert seen["finetune"]["finetune"] == {**stage["finetune"], "alpha": stage["ablation"]["alpha"]}
    assert seen["finetune"]["finetune"]["num_processes"] == 4
    assert seen["finetune"]["models"] == stage["models"]
    lora_dir, gen = seen["generate"]
    assert lora_dir == tmp_path / "ablation" / "finetune" / "lora" and gen["num_processes"] == 3
