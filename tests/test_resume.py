"""The one resume mechanism (geneava.core.resume): keys that cover every input, rounds rebuilt identically
after a kill, temp files swept, items no longer asked for pruned; and, per stage, that every parameter changes
the keys of what it affects or is listed (with its reason) as not affecting it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from geneava.core import io, resume
from geneava.stages import generate, refill, stylize

# ----------------------------------------------------------------- the engine, with a fake renderer


class Killed(Exception):
    """Stands in for SIGKILL inside one process: nothing after it runs (no cleanup is attempted)."""


class Renderer:
    """A fake batch renderer whose output depends on the whole batch (as a real one does at the level of
    rounding), and whose check fails each item's first `fails[id]` tries."""

    def __init__(self, fails: dict, kill_after: int | None = None):
        self.fails, self.kill_after, self.batches = fails, kill_after, []

    def __call__(self, batch):
        if self.kill_after is not None and len(self.batches) >= self.kill_after:
            raise Killed
        self.batches.append([(it.id, k) for it, k in batch])
        mates = ",".join(f"{it.id}:{k}" for it, k in batch)
        outcomes = []
        for it, k in batch:
            data = hashlib.sha256(f"{it.inputs}|{k}|{mates}".encode()).hexdigest().encode()
            why = "too close" if k < self.fails.get(it.id, 0) else ""

            def finish(final, it=it, k=k, data=data):
                if final:
                    io.atomic_write_bytes(it.base / f"{it.id}.out", data)
                    return {"try": k, "files": [f"{it.id}.out"]}
                return {"try": k}

            outcomes.append(resume.Outcome(why, finish))
        return outcomes


def _items(folder: Path, n: int = 7, seed: int = 0) -> list[resume.Item]:
    return [resume.Item(f"r{i}", {"seed": seed + i}, folder / f"r{i}.json", folder) for i in range(n)]


def _outputs(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".out"}


FAILS = {"r1": 2, "r3": 1, "r4": 3, "r6": 1}  # r4 never passes in 3 rounds


def _run(folder, renderer, rounds=3, batch_size=3, **kw):
    return resume.run_rounds(_items(folder), "settings", rounds, batch_size, renderer, **kw)


def test_rounds_retry_failing_items_and_give_up_after_the_last(tmp_path):
    records = _run(tmp_path, Renderer(FAILS))
    assert {i: r["try"] for i, r in records.items()} == {
        "r0": 0,
        "r1": 2,
        "r2": 0,
        "r3": 1,
        "r4": 2,
        "r5": 0,
        "r6": 1,
    }
    assert [t["why"] for t in records["r4"]["tries"]] == ["too close"] * 3 and records["r4"]["done"]
    assert len(_outputs(tmp_path)) == 7


@pytest.mark.parametrize("kill_after", [1, 2, 3, 4, 5])
def test_a_killed_run_resumes_to_the_bytes_of_an_uninterrupted_one(tmp_path, kill_after):
    whole = tmp_path / "whole"
    whole.mkdir()
    full = Renderer(FAILS)
    _run(whole, full)
    killed = tmp_path / "killed"
    killed.mkdir()
    with pytest.raises(Killed):
        _run(killed, Renderer(FAILS, kill_after=kill_after))
    again = Renderer(FAILS)
    _run(killed, again)
    assert _outputs(killed) == _outputs(whole)  # the retry batches were rebuilt as they were
    assert again.batches == full.batches[kill_after:]  # and exactly what was missing was made


def test_a_kill_between_an_items_file_and_its_record_is_made_again(tmp_path):
    whole = tmp_path / "whole"
    whole.mkdir()
    _run(whole, Renderer({}))
    killed = tmp_path / "killed"
    killed.mkdir()
    _run(killed, Renderer({}))
    (killed / "r4.json").unlink()  # killed after r4's file, before its record
    (killed / "r5.out").write_bytes(b"half a fi")  # killed inside the write of r5's file...
    (killed / "r5.json").unlink()
    (killed / ".r6.out.k2j3.tmp").write_bytes(b"half")  # ...or before the rename of r6's
    (killed / "r6.json").unlink()
    resume.start(killed)
    again = Renderer({})
    _run(killed, again)
    assert _outputs(killed) == _outputs(whole)
    assert again.batches == [[("r3", 0), ("r4", 0), ("r5", 0)], [("r6", 0)]]  # whole batches, as first
    assert not list(killed.glob(".*.tmp"))


def _records(folder: Path) -> dict:
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


MORE_FAILS = {"r1": 2, "r3": 1, "r4": 5, "r6": 3}  # r4 never passes in 5 rounds


@pytest.mark.parametrize("before, after", [(2, 4), (1, 6), (4, 2), (6, 1), (3, 3)])
def test_a_changed_maximum_of_tries_gives_what_that_maximum_gives_from_the_start(tmp_path, before, after):
    """The maximum is not in the keys: raising it continues the items that gave up (only the new tries
    are made), lowering it ends items at the new last try (only that round is made again)."""
    fresh, changed = tmp_path / "fresh", tmp_path / "changed"
    fresh.mkdir(), changed.mkdir()
    direct = Renderer(MORE_FAILS)
    _run(fresh, direct, rounds=after)
    _run(changed, Renderer(MORE_FAILS), rounds=before)
    again, counted = Renderer(MORE_FAILS), []
    _run(changed, again, rounds=after, progress=counted.append)
    assert _outputs(changed) == _outputs(fresh)
    assert _records(changed) == _records(fresh)
    assert sum(counted) == 7  # every item counted once, made or reused
    if after > before:
        assert again.batches == [b for b in direct.batches if b[0][1] >= before]
    elif after < before:  # the last round's batches that held an item which had gone on
        last = [b for b in direct.batches if b[0][1] == after - 1]
        assert again.batches == [b for b in last if any(MORE_FAILS.get(i, 0) > after - 1 for i, _ in b)]
        assert again.batches
    else:
        assert again.batches == []


class Accepts(Renderer):
    """Writes an item's file only for a passing try (as refill does: a row given up has no files)."""

    def __call__(self, batch):
        outcomes = super().__call__(batch)
        for (_it, k), o in zip(batch, outcomes, strict=True):
            if o.why:  # never writes: the record of a failed try lists no file
                o.finish = lambda final, k=k: {"try": k}
        return outcomes


@pytest.mark.parametrize("before, after", [(4, 2), (5, 1), (2, 4)])
def test_files_of_a_try_past_a_lowered_maximum_go(tmp_path, before, after):
    """An item accepted at a try the new maximum does not reach is given up: its file goes with its
    record, as a run with that maximum from the start never writes it."""
    fresh, changed = tmp_path / "fresh", tmp_path / "changed"
    fresh.mkdir(), changed.mkdir()
    _run(fresh, Accepts(MORE_FAILS), rounds=after)
    _run(changed, Accepts(MORE_FAILS), rounds=before)
    _run(changed, Accepts(MORE_FAILS), rounds=after)
    assert _outputs(changed) == _outputs(fresh)
    assert _records(changed) == _records(fresh)


@pytest.mark.parametrize("kill_after", [2, 3, 4, 5, 6])
def test_a_run_killed_under_a_larger_maximum_ends_at_a_lower_one(tmp_path, kill_after):
    """Killed mid-way with a larger maximum (records of tries that were not final), then run with a
    lower one: the records and files of a run with the lower maximum from the start, and of its batches
    only those the killed run had not made as that run would (round 1's, whose tries were not final)."""
    fresh, killed = tmp_path / "fresh", tmp_path / "killed"
    fresh.mkdir(), killed.mkdir()
    direct = Renderer(MORE_FAILS)
    _run(fresh, direct, rounds=2)
    with pytest.raises(Killed):
        _run(killed, Renderer(MORE_FAILS, kill_after=kill_after), rounds=5)
    again = Renderer(MORE_FAILS)
    _run(killed, again, rounds=2)
    assert _outputs(killed) == _outputs(fresh)
    assert _records(killed) == _records(fresh)
    # round 0 (3 batches) is the same under either maximum; round 1's tries were not final: made again
    assert again.batches == direct.batches[min(kill_after, 3) :]


def test_records_of_other_settings_or_inputs_are_never_reused(tmp_path):
    _run(tmp_path, Renderer({}))
    renderer = Renderer({})
    records = resume.run_rounds(_items(tmp_path), "other settings", 3, 3, renderer)
    assert len(renderer.batches) == 3  # every item made again
    assert records["r0"]["key"] == resume.digest("other settings", {"seed": 0})
    renderer = Renderer({})
    resume.run_rounds(_items(tmp_path, seed=100), "other settings", 3, 3, renderer)
    assert len(renderer.batches) == 3


def test_a_deleted_output_is_made_again(tmp_path):
    _run(tmp_path, Renderer({}))
    (tmp_path / "r2.out").unlink()
    renderer = Renderer({})
    _run(tmp_path, renderer)
    assert renderer.batches == [[("r0", 0), ("r1", 0), ("r2", 0)]] and (tmp_path / "r2.out").is_file()


def test_independent_items_are_redone_alone(tmp_path):
    items = _items(tmp_path)
    resume.run_rounds(items, "s", 1, 3, Renderer({}), independent=True)
    (tmp_path / "r4.json").unlink()
    renderer = Renderer({})
    resume.run_rounds(items, "s", 1, 3, renderer, independent=True)
    assert renderer.batches == [[("r4", 0)]]


def test_two_processes_make_the_batches_one_makes(tmp_path):
    import threading

    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    single = Renderer(FAILS)
    _run(one, single)
    # two "processes" at once, each its share of every round's batches, a barrier between rounds
    barrier = threading.Barrier(2, timeout=30)
    renderers, errors = [Renderer(FAILS), Renderer(FAILS)], []

    def rank(r):
        try:
            _run(two, renderers[r], rank=r, world=2, barrier=barrier.wait)
        except BaseException as e:  # surfaced below; the other rank then fails its barrier
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert _outputs(two) == _outputs(one)
    a, b = renderers[0].batches, renderers[1].batches
    assert a and b and not {tuple(x) for x in a} & {tuple(x) for x in b}  # each batch made once
    assert sorted(a + b) == sorted(single.batches)  # together: the single process's batches


def test_prune_removes_outputs_of_items_no_longer_asked_for(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    keep = tmp_path / "a" / "keep.png"
    keep.write_bytes(b"1")
    (tmp_path / "a" / "b" / "old.png").write_bytes(b"2")
    assert resume.prune(tmp_path / "a", [keep]) == 1
    assert keep.is_file() and not (tmp_path / "a" / "b").exists()


def test_atomic_writes_keep_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        io.atomic_write_text(tmp_path / "f.txt", "x")
        folder = io.temp_dir(tmp_path, "release")
        io.cached_tensors(tmp_path / "c.safetensors", {"k": 1}, lambda: {"t": __import__("torch").zeros(1)})
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "c.safetensors").stat().st_mode & 0o777 == 0o644
    assert folder.stat().st_mode & 0o777 == 0o755


# ----------------------------------------------------------------- every parameter reaches the keys


SPECIAL = {  # perturbations the generic rule below would make meaningless
    ("generate", "expressions"): ["delight", "rage"],
    ("generate", "limit"): 300,
}


def _perturb(block: str, key: str, value):
    if (block, key) in SPECIAL:
        return SPECIAL[(block, key)]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 + 0.01
    if isinstance(value, str):
        return value + " x"
    if isinstance(value, list):
        return value[:-1]
    if isinstance(value, dict):
        first = sorted(value)[0]
        return {**value, first: value[first] + "x"}
    if value is None:
        return "x"
    raise TypeError(f"no perturbation for {block}.{key} = {value!r}")


def _check_every_key(blocks: dict, keys_of, ignored: dict, tries: tuple[str, str]) -> None:
    """Changing any value changes some item's first-try key, or the value is listed in `ignored` with a
    reason: a row selector ("selects ...") must change which items there are (and so batches), anything
    else listed must leave every key unchanged; so must the maximum number of tries (`tries`)."""
    base = keys_of(blocks)
    assert len(set(base.values())) > 1 or len(base) == 1
    for block, values in blocks.items():
        for key, value in values.items():
            changed = {**blocks, block: {**values, key: _perturb(block, key, value)}}
            moved = keys_of(changed) != base
            why = ignored.get(block, {}).get(key)
            if (block, key) == tries:
                assert not moved, f"{block}.{key} is the maximum of tries, but moves the keys"
            elif why is None:
                assert moved, (
                    f"{block}.{key} changes no item's key: a changed value would leave stale outputs"
                )
            else:
                assert why.strip()
                if why.startswith("selects"):
                    assert set(keys_of(changed)) != set(base), f"{block}.{key} selects no other items"
                else:
                    assert not moved, f"{block}.{key} is listed as not affecting items, but moves their keys"


def test_every_generate_parameter_reaches_the_row_keys(default, tmp_path):
    def keys_of(b):
        params = {**b["generate"], "qc": b["generate"]["qc"]}
        rows, key = generate.plan(b["models"], b["prompts"], params, "lora-sha")
        items = generate.row_items(rows, tmp_path)
        return resume.first_round_keys(items, key, params["batch_size"])

    blocks = {k: dict(default[k]) for k in ("models", "prompts", "generate")}
    _check_every_key(blocks, keys_of, generate.IGNORED, ("generate", "max_retries"))


def test_every_stylize_parameter_reaches_the_avatar_keys(default, tmp_path):
    faces = [f"{i:064x}" for i in range(20)]

    def keys_of(b):
        key = stylize.settings_key(b["models"], b["prompts"], b["stylize"])
        items = [
            resume.Item(i, {"face_sha256": f}, tmp_path / f"{i}.json", tmp_path) for i, f in enumerate(faces)
        ]
        independent = b["stylize"]["stylizer"] != "sdxl_img2img"  # as the stage plans them
        return resume.first_round_keys(items, key, b["stylize"]["batch_size"], independent)

    blocks = {k: dict(default[k]) for k in ("models", "prompts", "stylize")}
    _check_every_key(blocks, keys_of, stylize.IGNORED, None)


def test_every_refill_parameter_reaches_the_row_keys(default):
    sets = {"finetune": pd.DataFrame({"sha256": ["a", "b"]}), "reference": pd.DataFrame({"sha256": ["c"]})}
    names = {
        "models": "model_params",
        "prompts": "prompt_params",
        "generate": "gen_params",
        "stylize": "sty_params",
        "memorization": "mem_params",
        "refill": "params",
    }

    def keys_of(b):
        p = {names[k]: v for k, v in b.items()}
        return {"all rows": refill.settings_key(p, "lora", "derived", 0.5, 1.0, sets)}

    blocks = {k: dict(default[k]) for k in names}
    _check_every_key(blocks, keys_of, refill.IGNORED, ("refill", "max_attempts"))
    p = {names[k]: v for k, v in blocks.items()}
    # the audit's rule, thresholds and compared images are part of the key too
    base = refill.settings_key(p, "lora", "derived", 0.5, 1.0, sets)
    assert refill.settings_key(p, "lora", "paper", 0.5, 1.0, sets) != base
    assert refill.settings_key(p, "lora", "derived", 0.6, 1.0, sets) != base
    assert refill.settings_key(p, "other lora", "derived", 0.5, 1.0, sets) != base
    other = {**sets, "reference": pd.DataFrame({"sha256": ["d"]})}
    assert refill.settings_key(p, "lora", "derived", 0.5, 1.0, other) != base


def test_weights_replaced_in_place_change_the_settings(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"one")
    first = resume.settings({"models": {"expression": str(weights)}})
    weights.write_bytes(b"one")
    os.utime(weights, ns=(10**18, 10**18))  # the same bytes, touched: the same weights
    assert resume.settings({"models": {"expression": str(weights)}}) == first
    weights.write_bytes(b"two")
    os.utime(weights, ns=(1, 1))  # other bytes (the size is the same): other weights
    assert resume.settings({"models": {"expression": str(weights)}}) != first


def test_records_are_json_with_their_key(tmp_path):
    _run(tmp_path, Renderer({}))
    on_disk = json.loads((tmp_path / "r0.json").read_text())
    batch = resume.first_round_keys(_items(tmp_path), "settings", 3)["r0"]
    assert on_disk == {
        "key": resume.digest("settings", {"seed": 0}),
        "tries": [{"batch": batch, "why": ""}],
        "done": True,
        "try": 0,
        "files": ["r0.out"],
    }


def test_an_atomic_writer_removes_what_a_killed_writer_of_the_same_file_left(tmp_path):
    (tmp_path / ".a.png.x1y2.tmp").write_bytes(b"half")  # killed before its rename
    (tmp_path / ".b.png.x1y2.tmp").write_bytes(b"another file's: kept until b.png is written")
    io.atomic_write_bytes(tmp_path / "a.png", b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.png.x1y2.tmp", "a.png"]
    (tmp_path / ".c.safetensors.k.tmp").write_bytes(b"half")
    io.cached_tensors(tmp_path / "c.safetensors", {"k": 1}, lambda: {"t": __import__("torch").zeros(1)})
    assert not (tmp_path / ".c.safetensors.k.tmp").exists()


def test_tensor_files_get_the_modes_the_umask_allows(tmp_path):
    """safetensors creates 0600 files; every tensor file the project writes is readable like open()'s."""
    import os

    import torch

    old = os.umask(0o022)
    try:
        io.save_tensors(tmp_path / "t.safetensors", {"t": torch.zeros(2)})
        folder = tmp_path / "lora"
        folder.mkdir()
        from safetensors.torch import save_file

        save_file({"t": torch.zeros(1)}, folder / "w.safetensors")  # as diffusers' save_pretrained does
        assert (folder / "w.safetensors").stat().st_mode & 0o777 == 0o600
        folder.chmod(0o700)  # as mkdtemp leaves a folder
        io.normal_tree(folder)
    finally:
        os.umask(old)
    assert (tmp_path / "t.safetensors").stat().st_mode & 0o777 == 0o644
    assert (folder / "w.safetensors").stat().st_mode & 0o777 == 0o644
    assert folder.stat().st_mode & 0o777 == 0o755
