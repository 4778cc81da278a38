"""Balanced prompts: expression x race x gender x age, in the paper's template."""

from __future__ import annotations

import hashlib
import itertools
import re

import pandas as pd

from geneava.core import emo135


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def row_seed(base_seed: int, row_id: str) -> int:
    """A seed derived from the row's identity, stable across runs, machines and table order."""
    digest = hashlib.sha256(f"{base_seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def prompt_table(params: dict, expressions: list[str] | None = None, seed: int = 0) -> pd.DataFrame:
    """One row per (expression, race, gender, age): 98 rows per expression with the paper's lists."""
    expressions = expressions or emo135.names()
    rows = []
    for expression, race, (gender, person), age in itertools.product(
        expressions, params["races"], params["genders"].items(), params["ages"]
    ):
        row_id = "|".join((expression, race, gender, age))
        rows.append(
            {
                "row_id": row_id,
                "expression": expression,
                "race": race,
                "gender": gender,
                "age": age,
                "prompt": params["template"].format(
                    article=_article(age), age=age, race=race, person=person, expression=expression
                ),
                "negative_prompt": params["negative"],
                "seed": row_seed(seed, row_id),
            }
        )
    return pd.DataFrame(rows)


def caption(params: dict, expression: str) -> str:
    """The training caption of a real (Emo135) image of `expression`."""
    return params["caption"].format(expression=expression)


def vocabulary(params: dict) -> list[str]:
    """Every word our prompts and captions can contain: the corpus of the tiny offline tokenizer."""
    texts = [params["template"], params["negative"], params["caption"], *params["races"], *params["ages"]]
    texts += list(params["genders"].values()) + emo135.names() + ["a", "an"]
    return sorted({w for t in texts for w in re.findall(r"[A-Za-z'-]+", re.sub(r"\{\w+\}", " ", t))})
