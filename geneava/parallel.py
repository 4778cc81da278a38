"""Running a stage's entry point under `accelerate launch`, for several GPUs (or CPU processes)."""

from __future__ import annotations

import subprocess
import sys


def launch(module: str, args: list[str], num_processes: int, mixed_precision: str = "no") -> None:
    """`accelerate launch` a `python -m module args...` on `num_processes` processes.

    torchrun-style launch; on a machine without CUDA the processes form a CPU (gloo) group, which
    is how the tests exercise multi-process code paths.
    """
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
    subprocess.run(cmd, check=True)
