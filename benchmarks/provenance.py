"""What a benchmark record says about where it ran: the commit (with -dirty for uncommitted changes)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """`git describe --always --dirty --abbrev=7` of this checkout."""
    out = subprocess.run(
        ["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=ROOT, capture_output=True, text=True
    )
    return out.stdout.strip()
