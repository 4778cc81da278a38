"""Running a stage's entry point under `accelerate launch`, for several GPUs (or CPU processes)."""

from __future__ import annotations

import subprocess
import sys


def launch(module: str, args: list[str], num_processes: int, mixed_precision: str = "no") -> None:
    """`accelerate launch` a `python -m module args...` on `num_processes` processes.

    torchrun-style launch; on a machine without CUDA the processes form a CPU (gloo) group, which
    is how the tests exercise multi-process code paths.

    Each process gets the thread count this process has (OMP_NUM_THREADS, unless the user set it):
    accelerate would give each one thread, and float reductions, so images, differ with the number of
    threads; with the same count, N processes make exactly the bytes one process makes.
    """
    import os

    import torch

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        mixed_precision,
        "--dynamo_backend",
        "no",
        "-m",
        module,
        *args,
    ]
    subprocess.run(cmd, check=True, env=env)


def run_here(num_processes: int) -> bool:
    """Whether a stage runs in this process (one process asked for) or re-launches itself."""
    return num_processes == 1


def launch_stage(
    module: str,
    num_processes: int,
    profile: str | None,
    params_file,
    paths: dict,
    mixed_precision: str = "no",
) -> None:
    """Launch a stage's CLI (`--out-dir`, `--prepare-dir`, ... from `paths`; None paths left out)."""
    args = [
        a
        for key, value in paths.items()
        if value is not None
        for a in (f"--{key.replace('_', '-')}", str(value))
    ]
    args += ["--profile", profile] if profile else []
    args += ["--params", str(params_file)] if params_file else []
    launch(module, args, num_processes, mixed_precision)
