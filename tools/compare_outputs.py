"""Show that a change is behaviour-neutral: compare the pipeline outputs of two checkouts, file by file.

    python tools/compare_outputs.py /path/to/other/checkout            # after `dvc repro` in both
    python tools/compare_outputs.py OTHER --lock                       # also: dvc.lock output hashes side by side

Every output file (data/features, results, metrics, tables, figures) is either byte-identical, or a JSON file
that differs *only* in the recorded code identity (``code.floss``: the digest of the package source, which any edit
of floss/ changes by design: caches and results record the code that produced them), or a difference that is
listed and makes the exit status 1. Files present on one side only are listed too (exit status 1).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("data/features", "results", "metrics", "tables", "figures")


def _without_code_digest(value):
    """The JSON value with every code identity's ``floss`` digest removed (library versions are kept)."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key == "code" and isinstance(item, dict) and "floss" in item:
                item = {k: v for k, v in item.items() if k != "floss"}
            out[key] = _without_code_digest(item)
        return out
    if isinstance(value, list):
        return [_without_code_digest(v) for v in value]
    return value


def classify(a: Path, b: Path) -> str:
    """``same`` | ``code digest only`` | ``different``."""
    da, db = a.read_bytes(), b.read_bytes()
    if da == db:
        return "same"
    if a.suffix == ".json":
        try:
            ja, jb = json.loads(da), json.loads(db)
        except ValueError:
            return "different"
        if _without_code_digest(ja) == _without_code_digest(jb):
            return "code digest only"
    return "different"


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for top in OUTPUTS if (root / top).exists()
            for p in (root / top).rglob("*") if p.is_file()}


def compare(this: Path, other: Path) -> dict[str, list[str]]:
    mine, theirs = _files(this), _files(other)
    out: dict[str, list[str]] = {"same": [], "code digest only": [], "different": [],
                                 f"only in {this}": sorted(mine - theirs), f"only in {other}": sorted(theirs - mine)}
    for rel in sorted(mine & theirs):
        out[classify(this / rel, other / rel)].append(rel)
    return out


def lock_outs(path: Path) -> dict[str, str]:
    """``{out path: md5}`` of every stage in a dvc.lock."""
    import yaml
    lock = yaml.safe_load(path.read_text())
    return {o["path"]: o.get("md5", "") for stage in lock.get("stages", {}).values() for o in stage.get("outs", [])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("other", type=Path, help="the other checkout (its outputs already produced)")
    parser.add_argument("--this", type=Path, default=ROOT, help="this checkout (default: the repository root)")
    parser.add_argument("--lock", action="store_true", help="also compare the dvc.lock output hashes")
    args = parser.parse_args(argv)
    result = compare(args.this.resolve(), args.other.resolve())
    for kind, files in result.items():
        print(f"{kind}: {len(files)} files")
        if kind not in ("same", "code digest only"):
            for rel in files:
                print(f"    {rel}")
    if args.lock:
        a, b = lock_outs(args.this / "dvc.lock"), lock_outs(args.other / "dvc.lock")
        same = sorted(p for p in a.keys() & b.keys() if a[p] == b[p])
        moved = sorted(p for p in a.keys() & b.keys() if a[p] != b[p])
        print(f"dvc.lock outs: {len(same)} identical hashes, {len(moved)} different, "
              f"{len(a.keys() ^ b.keys())} in one lock only")
        for p in moved:
            print(f"    {p}: {b[p]} -> {a[p]}")
    bad = sum(len(v) for k, v in result.items() if k not in ("same", "code digest only"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
