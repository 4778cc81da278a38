"""Shared fixtures: the repo's own params, a stand-in dataset, a prepared split, a trained LoRA."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path

import pytest

from geneava.core import config
from geneava.networks.faces import Face
from geneava.stages import finetune
from geneava.stages import prepare as data
from geneava.world import dataset

ROOT = Path(__file__).resolve().parents[1]


class WholeImage:
    """Test double for a face detector: one face filling the image. For tests of the logic around
    detection (splits, crops, training); real detection has its own tests on real photos."""

    name = "whole-image (test double)"

    def detect(self, rgb):
        h, w = rgb.shape[:2]
        return [Face((0.0, 0.0, float(w), float(h)), 1.0)]


class CentreFace:
    """Test double for a face detector: one face, the middle half of the image (so a crop differs
    from the whole image)."""

    name = "centre (test double)"

    def detect(self, rgb):
        h, w = rgb.shape[:2]
        return [Face((w / 4, h / 4, 3 * w / 4, 3 * h / 4), 0.99)]


@pytest.fixture(scope="session")
def params() -> dict:
    return config.load_params(ROOT / "params.yaml")


@pytest.fixture(scope="session")
def default(params) -> dict:
    """Each section's `default` profile block."""
    return {stage: params[stage]["default"] for stage in config.SCHEMA}


@pytest.fixture(scope="session")
def standin_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("standin")
    dataset.write_standin(root, per_class=3)  # the tests use a detector double: no detection misses
    return root


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, standin_root, default) -> Path:
    """A prepared split (1 fine-tuning + 2 evaluation per class) of the first 12 classes."""
    out = tmp_path_factory.mktemp("prepare")
    p = dict(
        default["prepare"],
        source=str(standin_root / "emo135"),
        classes=12,
        finetune_per_class=1,
        eval_per_class=2,
        # face crops (the paper profile's framing), whatever the default profile keeps: with the whole
        # stand-in images the seeded random CLIP twin tells the 12 classes apart too weakly for
        # test_evaluate's known-answer checks (its paired CI reached -0.0008)
        crop_margin=0.25,
    )
    data.prepare(p, out, standin_root, detector=WholeImage())
    return out


@pytest.fixture(scope="session")
def trained(tmp_path_factory, prepared, default) -> Path:
    """A LoRA trained for a few steps on the prepared split."""
    out = tmp_path_factory.mktemp("finetune")
    p = dict(default["finetune"], max_train_steps=4)
    finetune.finetune(
        default["models"], default["prompts"], p, prepared, out, default["prepare"]["resolution"]
    )
    return out


@pytest.fixture(scope="session")
def people() -> list:
    """Faces of different people: the insightface group photo's faces, plus two single portraits."""
    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    from geneava.networks.faces import DlibDetector, square_crop

    photos = Path(importlib.util.find_spec("insightface").origin).parent / "data" / "images"
    rgb = np.asarray(Image.open(photos / "t1.jpg").convert("RGB"))
    faces = sorted(DlibDetector().detect(rgb), key=lambda f: f.box[0])
    crops = [square_crop(rgb, f.box, 0.35, 160) for f in faces]
    assert len(crops) >= 5, "the group photo should show several people"
    astronaut = np.asarray(skdata.astronaut())
    crops.append(square_crop(astronaut, DlibDetector().detect(astronaut)[0].box, 0.35, 160))
    return crops


def write_generated(gen_dir: Path, images: list, expression: str = "x", qc: list[str] | None = None) -> Path:
    """A generate-stage folder holding `images` as the fine-tuned variant, manifest included."""
    import pandas as pd

    from geneava.core.io import save_png, sha256_file, write_csv

    rows = []
    for i, img in enumerate(images):
        file = f"images/{expression}/{i}.png"
        save_png(gen_dir / "finetuned" / file, img)
        rows.append(
            {
                "row_id": f"{expression}|{i}",
                "expression": expression,
                "file": file,
                "qc": qc[i] if qc else "pass",
                "seed_used": i,
                "sha256": sha256_file(gen_dir / "finetuned" / file),
            }
        )
    write_csv(gen_dir / "finetuned" / "manifest.csv", pd.DataFrame(rows))
    return gen_dir


def kill_when(cmd: list[str], ready, timeout: float = 180, cwd=None, env=None) -> bool:
    """Start `cmd`, SIGKILL its process group as soon as `ready()` holds; False if it ended first."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, cwd=cwd, env=env
    )
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not ready():
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"kill_when: the condition never held within {timeout} s")
        time.sleep(0.005)
    if proc.poll() is not None:
        return False
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def tree_files(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its sha256 (to compare two runs' outputs byte for byte)."""
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


class Reads(Mapping):
    """A parameter block that records the keys the code under test reads, so a test can check that a
    key listed as not affecting a stage's items (its IGNORED list) is never read on the path that makes
    them. Reads inside `geneava.core.resume.settings` (which reads every key to build the key) are not
    recorded: use `reads_outside_settings`."""

    paused = False

    def __init__(self, name: str, block: dict, log: set):
        self._block, self.name, self.log = dict(block), name, log

    def __getitem__(self, key):
        if not Reads.paused:
            self.log.add((self.name, key))
        return self._block[key]

    def __iter__(self):
        return iter(self._block)

    def __len__(self):
        return len(self._block)


@pytest.fixture
def reads_outside_settings(monkeypatch):
    """(log, wrap): wrap(name, block) gives a recording block; `log` collects (block, key) reads."""
    from geneava.core import resume

    log: set = set()
    real = resume.settings

    def settings(*args, **kwargs):
        Reads.paused = True
        try:
            return real(*args, **kwargs)
        finally:
            Reads.paused = False

    monkeypatch.setattr(resume, "settings", settings)
    return log, lambda name, block: Reads(name, block, log)


def assert_ignored_never_read(log: set, ignored: dict) -> int:
    """No key `ignored` lists as unable to change an item (selectors aside) was read; returns how many
    listed keys were checked."""
    checked = 0
    for block, keys in ignored.items():
        for key, why in keys.items():
            if why.startswith(("selects", "chooses")):
                continue
            assert (block, key) not in log, f"{block}.{key} is listed as not affecting items but is read"
            checked += 1
    return checked
