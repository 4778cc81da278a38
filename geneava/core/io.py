"""Small I/O helpers every stage uses: atomic writes, hashes, deterministic JSON."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from PIL import Image

log = logging.getLogger(__name__)


TMP_SUFFIX = ".tmp"  # every temporary file or folder the writers below leave while working: `.<name>.*.tmp`


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_mode(path: Path) -> None:
    """Give a file (0666) or folder (0777) the permissions the umask allows, as open() and mkdir() would:
    mkstemp and mkdtemp make them private (0600, 0700), which would hide outputs from other users."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~_umask())


def normal_tree(path: Path) -> None:
    """`normal_mode` for a folder and everything in it (what a library wrote with private modes:
    safetensors, and diffusers' `save_pretrained` through it, create files 0600)."""
    path = Path(path)
    normal_mode(path)
    if path.is_dir():
        for child in path.rglob("*"):
            if not child.is_symlink():
                normal_mode(child)


def temp_dir(parent: Path, name: str) -> Path:
    """A fresh temporary folder `.<name>.*.tmp` in `parent` with normal permissions, to build an output
    aside and move it into place (os.replace); `sweep_temp` removes one a killed run left behind."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=TMP_SUFFIX, dir=parent))
    normal_mode(tmp)
    return tmp


def sweep_temp(folder: Path) -> int:
    """Remove the temporary files and folders (`.*.tmp`) that a killed writer left under `folder`.
    Call it when a stage starts, before any writer of its own runs; returns how many were removed."""
    import shutil

    folder = Path(folder)
    if not folder.is_dir():
        return 0
    found = [p for p in folder.rglob(f".*{TMP_SUFFIX}") if p.name.startswith(".")]
    for p in sorted(found, key=lambda p: len(p.parts), reverse=True):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if found:
        log.info("%s: removed %d temporary file(s) a killed run left behind", folder, len(found))
    return len(found)


def _drop_stale_temps(path: Path) -> None:
    """Remove the temporary files a killed writer of `path` left beside it (`.<name>.*.tmp`)."""
    for old in path.parent.glob(f".{glob.escape(path.name)}.*{TMP_SUFFIX}"):
        old.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers see all or nothing. The file gets
    the permissions the umask allows (0644 under umask 022), like any file open() creates. Temporary
    files an earlier, killed writer of the same path left are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _drop_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    """Sorted keys and a trailing newline, so equal content hashes equal (DVC metrics files)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_csv(path: Path, df: pd.DataFrame) -> None:
    atomic_write_text(path, df.to_csv(index=False, lineterminator="\n"))


def save_png(path: Path, img: Image.Image) -> bytes:
    """Save a PNG atomically (no timestamps, fixed compression) and return its bytes."""
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return data


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_FINGERPRINTS: dict[tuple, str] = {}


def source_fingerprint(source: str | Path | None) -> str | None:
    """What a model source holds, for resume and cache keys: for a local file or folder, a sha256 over
    its files' relative names and contents (so weights retrained in place are never mistaken for the
    old ones); for anything else (a hub id, "tiny", a built-in name) the source itself. Hashes are
    remembered per process by path, size and modification time."""
    if source is None:
        return None
    from geneava.core import config

    path = Path(config.source(source))
    if not path.exists():
        return str(source)
    files = sorted(f for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file())
    stamp = (str(path), *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if stamp not in _FINGERPRINTS:
        h = hashlib.sha256()
        for f in files:
            h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
            h.update(sha256_file(f).encode())
        _FINGERPRINTS[stamp] = h.hexdigest()[:16]
    return _FINGERPRINTS[stamp]


class _Inert:
    """Stands in for any class a checkpoint pickles besides tensors: it records, it never runs code."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


def _inert(name: str) -> type:
    return type(f"Inert[{name}]", (_Inert,), {})


def load_tensors(path: Path):
    """A weights file's content without executing anything it contains.

    safetensors loads directly. A torch pickle loads with weights_only=True; the globals it names
    beyond tensors (POSTER++ pickles helper objects next to its state dict) are listed first and
    mapped to inert stand-ins, so they are rebuilt as plain records and their code never runs.
    """
    path = Path(path).expanduser()
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    import pickle

    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    try:
        with torch.serialization.safe_globals([(_inert(n), n) for n in names]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # e.g. a call of os.system: torch refuses such globals outright
        raise ValueError(f"{path} was refused: it asks the unpickler to call a blocked function ({e})") from e


# what a pickle of plain numpy arrays names, and nothing else (numpy 2 renamed numpy.core to numpy._core)
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
}


def load_numpy_pickle(path: Path):
    """A pickle of (nested dicts, lists of) numpy arrays, read by an unpickler that admits numpy's
    array and dtype constructors only: any other global (a function to call, a class) is refused."""
    import importlib
    import pickle

    class _NumpyOnly(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in _NUMPY_GLOBALS:
                raise pickle.UnpicklingError(f"{module}.{name} is not a numpy array constructor")
            mod, attr = _NUMPY_GLOBALS[(module, name)]
            return getattr(importlib.import_module(mod), attr)

    path = Path(path).expanduser()
    with open(path, "rb") as f:
        try:
            return _NumpyOnly(f).load()
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path} was refused: it is not a plain pickle of numpy arrays ({e})") from e


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    """safetensors' `save_file`, atomically (temporary file, then rename) and with the permissions the
    umask allows (safetensors itself creates 0600 files). Every tensor file the project writes goes here."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _drop_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        normal_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def cached_tensors(
    path: Path, key: dict, compute: Callable[[], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """`compute()`, or its result saved at `path` (safetensors) by an earlier call with the same `key`.

    The key (JSON: file hashes, model, settings) is stored as a fingerprint in the file's metadata; a
    stale file is recomputed and replaced atomically, so a killed run never leaves half a cache."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    path = Path(path)
    if path.is_file():
        with safe_open(path, "pt") as f:
            if (f.metadata() or {}).get("fingerprint") == fingerprint:
                log.info("%s: from the cache", path.name)
                return load_file(path)
    out = compute()
    save_tensors(path, out, metadata={"fingerprint": fingerprint})
    return out
