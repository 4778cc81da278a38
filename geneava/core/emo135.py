"""The 135 Emo135 expression classes: the one place their names live.

geneava/core/emo135_classes.csv is a documented reconstruction (the 135 emotion words of Shaver et al.
(1987) as reproduced in Parrott's tree, which the Emo135 paper drew on), with each word's primary
category. When a real Emo135 folder is used, its folder names win; `reconcile` reports mismatches.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

log = logging.getLogger(__name__)

PRIMARY = ("love", "joy", "surprise", "anger", "sadness", "fear")


@dataclass(frozen=True)
class Expression:
    index: int
    name: str
    primary: str


@cache
def classes() -> tuple[Expression, ...]:
    """The 135 classes in file order (the order fixes class indices)."""
    with files("geneava.core").joinpath("emo135_classes.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    out = tuple(Expression(i, r["expression"], r["primary"]) for i, r in enumerate(rows))
    names = [c.name for c in out]
    assert len(out) == 135 and len(set(names)) == 135, "emo135_classes.csv must list 135 unique names"
    assert all(c.primary in PRIMARY for c in out), "unknown primary category in emo135_classes.csv"
    return out


def names() -> list[str]:
    return [c.name for c in classes()]


def reconcile(folder_names: list[str]) -> dict[str, list[str]]:
    """Compare a dataset's class folders with our list; the folders win, differences are reported."""
    ours, theirs = set(names()), set(folder_names)
    report = {"missing_from_data": sorted(ours - theirs), "unknown_to_list": sorted(theirs - ours)}
    if report["missing_from_data"] or report["unknown_to_list"]:
        log.warning(
            "class folders differ from geneava's Emo135 list: %d of ours absent, %d extra; "
            "the folder names are used",
            len(report["missing_from_data"]),
            len(report["unknown_to_list"]),
        )
    return report
