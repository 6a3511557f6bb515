"""Every path of the artifact, resolved from the repository root (never from the current directory)."""
from __future__ import annotations

import os
from pathlib import Path

#: the repository root (the folder holding ``pyproject.toml``); override with ``FLOSS_ROOT``.
ROOT = Path(os.environ.get("FLOSS_ROOT", Path(__file__).resolve().parents[2])).resolve()

TABLES = ROOT / "tables"
FIGURES = ROOT / "figures"
METRICS = ROOT / "metrics"
REPORTS = ROOT / "reports"
DATA = ROOT / "data"
NOTEBOOKS = ROOT / "notebooks"
#: the shared reference folder beside the repository (read-only; may be absent)
SHARED = ROOT.parent / "shared"


def from_root(path: str | os.PathLike) -> Path:
    """Resolve ``path`` against :data:`ROOT` unless it is already absolute."""
    p = Path(path)
    return p if p.is_absolute() else ROOT / p
