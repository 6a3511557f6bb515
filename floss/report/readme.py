"""Embed generated tables in the README between markers, so the README shows exactly what the pipeline made.

    <!-- generated:tables/tab1_main_results.md -->
    ...replaced by the file's content...
    <!-- /generated -->

``python -m floss.report.readme`` refreshes every marked block (atomic write); ``check`` mode lists stale ones.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from floss.util import paths
from floss.report.tables import atomic_write_text

_BLOCK = re.compile(r"(<!-- generated:(?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- /generated -->)", re.S)


def blocks(text: str) -> list[tuple[str, str]]:
    """(relative path, current body) of every generated block."""
    return [(m.group("path"), m.group("body")) for m in _BLOCK.finditer(text)]


def refresh(readme: Path | None = None, root: Path | None = None) -> list[str]:
    """Replace each block's body with its file; returns the paths whose content changed."""
    root = root or paths.ROOT
    readme = readme or root / "README.md"
    text = readme.read_text()
    changed: list[str] = []

    def fill(m: re.Match) -> str:
        source = root / m.group("path")
        if not source.is_file():
            raise FileNotFoundError(f"{readme}: generated block names {m.group('path')}, which does not exist "
                                    "(run `dvc repro` first)")
        body = source.read_text().rstrip("\n") + "\n"
        if body != m.group("body"):
            changed.append(m.group("path"))
        return m.group(1) + body + m.group(4)

    new = _BLOCK.sub(fill, text)
    if new != text:
        atomic_write_text(readme, new)
    return changed


if __name__ == "__main__":  # pragma: no cover
    print("\n".join(refresh()) or "README.md: generated blocks up to date", file=sys.stderr)
