"""The command line every stage module has: `python -m geneava.stages.<stage> --out-dir ... [--profile P]`.

Built from the stage's `run(profile, <inputs>..., out_dir, params_file=None)` signature, so the options are
the run's own folders, named as in dvc.yaml: `--prepare-dir`, `--generate-dir`, `--out-dir`, ...
"""

from __future__ import annotations

import argparse
import inspect
import logging
import typing
from collections.abc import Callable
from pathlib import Path

OWN = ("profile", "params_file")


def stage_main(
    run: Callable, argv: list[str] | None, description: str, worker: Callable | None = None
) -> int:
    """Parse the run's folders (required unless the parameter has a default or is typed `Path | None`,
    e.g. generate's `--lora-dir`) and call `run(profile, ..., params_file=...)`. A stage that
    re-launches itself under `accelerate launch` passes `worker(profile, params_file, **folders)`, the
    body of one process, so a launched process never launches again."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    folders = [p for name, p in inspect.signature(run).parameters.items() if name not in OWN]
    hints = typing.get_type_hints(run)
    for p in folders:
        # a folder typed `Path | None` may be left out (generate's --lora-dir: the baseline has none)
        optional = type(None) in typing.get_args(hints.get(p.name))
        required = p.default is inspect.Parameter.empty and not optional
        parser.add_argument(f"--{p.name.replace('_', '-')}", type=Path, required=required, default=None)
    parser.add_argument("--profile", default=None, help="default: the profile params.yaml names")
    parser.add_argument("--params", type=Path, default=None, help="another params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    paths = {p.name: getattr(args, p.name) for p in folders}
    (worker or run)(args.profile, **paths, params_file=args.params)
    return 0


def notebook(out_dir: str | Path, create: bool = True) -> tuple[Path, Path]:
    """A stage notebook's first cell: log INFO lines, resolve `out_dir` against the project root (the
    kernel may start anywhere inside the project), create it unless the stage builds it itself.
    Returns (project root, output folder)."""
    from geneava.core import config

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    root = config.project_root()
    out = config.path(out_dir, root)
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return root, out
