"""One resume mechanism for every resumable stage (generate, refill, stylize): items, keys and rounds.

A stage's work is a list of items (a prompt row, a face to stylize). Each item has a JSON record beside
its outputs, written atomically *after* them, so a record means its files are complete. A record is
reused only when its key matches what would be made now; anything else is made again. The key covers:

- the stage's settings: every value of the parameter blocks it reads (`settings`), except the keys a
  stage lists as not affecting an item, each with its reason (`IGNORED` in the stage module; a test
  checks every other key changes the key), plus the content fingerprint of every local file or folder a
  value names (weights retrained in place are new weights);
- the item's own inputs (prompt, negative prompt, seed, the sha256 of the face to stylize);
- its batch: on a CPU (and on GPUs) an image depends on its batch-mates at the level of rounding, so a
  try is keyed by the inputs of the whole batch it was made in.

Work runs in rounds: round k holds try k of every item whose try k-1 failed (round 0: all items), cut
into batches in item order. The plan is rebuilt from the records at each round, so a resumed run makes
exactly the batches an uninterrupted run makes, and its outputs are bit-identical (same machine, same
threads). Batches are dealt round-robin to `accelerate` processes, with a barrier between rounds.

The maximum number of tries is not in any key (a stage names its parameter in `settings(tries=...)`): try
k is the same whatever the maximum, so raising it continues the items that gave up where they stopped,
and lowering it ends items at the new last try, as a run with that maximum from the start would.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geneava.core import config
from geneava.core.io import atomic_write_text, source_fingerprint, sweep_temp

log = logging.getLogger(__name__)


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (sorted keys; other objects by str)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _names_local_path(value: Any) -> bool:
    if not isinstance(value, str) or not value.strip() or "\n" in value or len(value) > 4096:
        return False
    try:
        return config.path(value).exists()
    except (OSError, ValueError):
        return False


def settings(
    blocks: dict[str, dict],
    ignore: dict[str, dict[str, str]] | None = None,
    tries: tuple[str, str] | None = None,
) -> dict:
    """Every value of the parameter `blocks` ({"generate": {...}, "models": {...}}) except those `ignore`
    lists (block -> key -> why it cannot change an item) and the (block, key) `tries` names: the maximum
    number of tries, which `run_rounds` handles itself (see the module docstring). With
    `<block>.<key>#content`: the content fingerprint of each value that names a local file or folder
    (relative to the project root)."""
    out: dict[str, Any] = {}
    for name, block in sorted(blocks.items()):
        skip = {**(ignore or {}).get(name, {}), **({tries[1]: "tries"} if tries and tries[0] == name else {})}
        for key, value in sorted(block.items()):
            if key in skip:
                continue
            out[f"{name}.{key}"] = value
            if _names_local_path(value):
                out[f"{name}.{key}#content"] = source_fingerprint(value)
    return out


@dataclass(frozen=True)
class Item:
    """One unit of resumable work: `id` unique in the stage, `inputs` what determines it beside the
    settings (JSON-able), `record` the path of its JSON record, `base` the folder its files are under."""

    id: Any
    inputs: dict
    record: Path
    base: Path


@dataclass
class Outcome:
    """What one try of an item gave: `why` is "" when it passed, else the reason it failed; `finish(final)`
    writes the item's files (when `final`) and returns the record's fields, with `files`: the paths it
    wrote, relative to the item's `base`."""

    why: str
    finish: Callable[[bool], dict]


def read_record(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _valid_tries(rec: dict | None, item_key: str, plan: list[str], item: Item) -> list[dict]:
    """The record's tries that the current plan would make again (same keys, in order)."""
    if not rec or rec.get("key") != item_key:
        return []
    tries = rec.get("tries") or []
    valid = []
    for t, batch_key in zip(tries, plan, strict=False):
        if t.get("batch") != batch_key:
            break
        valid.append(t)
    if valid and len(valid) == len(tries) and rec.get("done"):
        # a finished item's files must still be there (a file deleted by hand is made again)
        if not all((item.base / f).is_file() for f in rec.get("files", [])):
            valid = valid[:-1]
    return valid


def run_rounds(
    items: list[Item],
    settings_key: str,
    rounds: int,
    batch_size: int,
    process: Callable[[list[tuple[Item, int]]], list[Outcome]],
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    progress: Callable[[int], None] = lambda n: None,
    independent: bool = False,
) -> dict[Any, dict]:
    """Make every item (see the module docstring); returns each item's record by id.

    `process(batch)` renders and checks one batch of (item, try) pairs and returns an Outcome per pair.
    An item is finished by a passing try or by its last try (`rounds` tries at most; records of another
    maximum are continued or ended, see the module docstring); its record then has `done: true` and the
    fields its Outcome's `finish(final=True)` returned. `independent=True` says an output does not depend
    on its batch-mates (a per-image filter): a try is then keyed by its item alone, and only the items
    that need it are batched, so one changed face does not redo its neighbours."""
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError("resume.run_rounds: item ids must be unique")
    item_key = {it.id: digest(settings_key, it.inputs) for it in items}
    plan: dict[Any, list[str]] = {it.id: [] for it in items}  # the batch key of each try, as planned

    last = rounds - 1

    def valid(it: Item, rec: dict | None) -> list[dict]:
        tries = _valid_tries(rec, item_key[it.id], plan[it.id], it)
        if len(tries) > last and tries[last]["why"] and not (rec.get("done") and len(rec["tries"]) == rounds):
            # a failed try made under a larger maximum, since lowered: made again as the item's last
            tries = tries[:last]
        return tries

    members = list(items)
    for k in range(rounds):
        if not members:
            break
        records = {it.id: read_record(it.record) for it in members}
        if independent:
            for it in members:
                plan[it.id].append(digest(k, [(item_key[it.id], k)]))
            ready = [it for it in members if len(valid(it, records[it.id])) > k]
            progress(sum(valid(it, records[it.id])[k]["why"] == "" or k == rounds - 1 for it in ready))
            ready_ids = {it.id for it in ready}
            todo = [it for it in members if it.id not in ready_ids]
        else:
            todo = members
        for b, batch in enumerate(todo[i : i + batch_size] for i in range(0, len(todo), batch_size)):
            if not independent:  # every try of the batch is keyed by the whole batch
                shared = digest(k, [(item_key[it.id], k) for it in batch])
                for it in batch:
                    plan[it.id].append(shared)
            mine = b % world == rank
            tries = [valid(it, records[it.id]) for it in batch]
            if all(len(t) > k for t in tries):  # made before with this very batch: reuse
                if mine:
                    progress(sum(t[k]["why"] == "" or k == rounds - 1 for t in tries))
                continue
            if not mine:
                continue
            outcomes = process([(it, k) for it in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"process returned {len(outcomes)} outcomes for a batch of {len(batch)}")
            for it, prior, outcome in zip(batch, tries, outcomes, strict=True):
                final = outcome.why == "" or k == rounds - 1
                rec = {
                    **outcome.finish(final),  # the item's files first, then the record that vouches for them
                    "key": item_key[it.id],
                    "tries": [*prior[:k], {"batch": plan[it.id][k], "why": outcome.why}],
                    "done": final,
                }
                # files the record it replaces vouched for and this one does not (e.g. a row accepted at a
                # try past a maximum since lowered): removed before the new record, so none outlives it
                old = set((records[it.id] or {}).get("files", [])) - set(rec.get("files", []))
                for name in sorted(old):
                    (it.base / name).unlink(missing_ok=True)
                atomic_write_text(it.record, json.dumps(rec, sort_keys=True))
                progress(int(final))
        barrier()
        records = {it.id: read_record(it.record) for it in members}
        following = []
        for it in members:
            tries = valid(it, records[it.id])
            if len(tries) <= k:
                raise RuntimeError(f"{it.record}: try {k} of {it.id!r} was not recorded; rerun the stage")
            if tries[k]["why"] != "" and k + 1 < rounds:
                following.append(it)
        members = following
    out = {}
    for it in items:
        rec = read_record(it.record)
        if not rec or not rec.get("done") or rec.get("key") != item_key[it.id]:
            raise RuntimeError(f"{it.record}: item {it.id!r} was not finished; rerun the stage")
        out[it.id] = rec
    return out


def first_round_keys(
    items: list[Item], settings_key: str, batch_size: int, independent: bool = False
) -> dict[Any, str]:
    """The key each item's first try is made under, as `run_rounds` plans it from scratch (for tests and
    for asking which items a parameter change would redo, without rendering anything)."""
    item_key = {it.id: digest(settings_key, it.inputs) for it in items}
    if independent:
        return {it.id: digest(0, [(item_key[it.id], 0)]) for it in items}
    out = {}
    for i in range(0, len(items), batch_size):
        batch = items[i : i + batch_size]
        shared = digest(0, [(item_key[it.id], 0) for it in batch])
        out |= {it.id: shared for it in batch}
    return out


def prune(folder: Path, keep: Iterable[Path]) -> int:
    """Remove every file under `folder` that is not in `keep` (outputs of items no longer asked for, e.g.
    after `limit` or `expressions` changed), then empty sub-folders; returns how many files went."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    keep = {Path(p).resolve() for p in keep}
    gone = 0
    for f in sorted(folder.rglob("*")):
        if (f.is_file() or f.is_symlink()) and f.resolve() not in keep:
            f.unlink()
            gone += 1
    for d in sorted((d for d in folder.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()
    if gone:
        log.info("%s: removed %d file(s) of items no longer asked for", folder, gone)
    return gone


def start(folder: Path) -> None:
    """What every resumable stage does first: sweep the temporary files a killed run left."""
    sweep_temp(folder)
