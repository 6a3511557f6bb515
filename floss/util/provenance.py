"""What produced a result: the keys under which every reusable artifact (feature cache, ranking checkpoint, text
embeddings, the pipeline's stages) is stored, so that a rerun equals a fresh run.

One rule, in one place: an artifact is reused only when *everything* that determined its bytes is equal —

* the code: :func:`code_identity` (a digest of the package source, and the versions of the libraries whose
  arithmetic or decoding the bytes depend on);
* the weights: :func:`weights_id` (a registry tag, or a weight file's sha256);
* the inputs: :func:`input_identities` (per image id, the size and modification time of its files);
* the settings and parameters (each artifact's own fingerprint keys).

The lowest layer: imports nothing of floss and no torch, so that ``python -m floss.util.provenance`` (the pipeline's
``code`` stage) starts in a fraction of a second.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["floss_version", "code_identity", "source_digest", "file_sha256", "weights_id", "weight_file_problem",
           "file_identity",
           "input_identities", "inputs_digest", "digest", "module_source_digest"]

PACKAGE_DIR = Path(__file__).resolve().parents[1]
#: sub-folders of the package that never feed a cached artifact (they only format finished results)
_NOT_UPSTREAM = ("report",)
#: distributions whose arithmetic, decoding or model code the cached bytes depend on
LIBRARIES = ("torch", "torchvision", "open_clip_torch", "numpy", "pillow", "opencv-python-headless", "safetensors")


def floss_version() -> str:
    try:
        return importlib.metadata.version("floss")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def digest(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys), 32 hex digits."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:32]


def source_digest(package_dir: str | os.PathLike = PACKAGE_DIR) -> str:
    """sha256 over the relative paths and bytes of the package's source and resource files (``report/`` left
    out: it formats finished results and feeds no cache). Byte code and editor files are ignored."""
    root = Path(package_dir)
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                   and p.relative_to(root).parts[0] not in _NOT_UPSTREAM
                   and p.suffix in (".py", ".yaml", ".json", ".txt"))
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return "sha256:" + h.hexdigest()


def module_source_digest(module: str) -> str:
    """sha256 of the source of an importable module, located without running it (``importlib.util.find_spec``;
    a dotted name imports its parent packages): the module's file, or for a package every ``.py`` file under its
    folder (relative paths and bytes). FileNotFoundError when it has no source file (a built-in or compiled
    module). Metric plug-ins are keyed by it (:func:`floss.core.metrics.metric_plugin_digest`)."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None:
        raise ModuleNotFoundError(f"no module named {module!r}")
    if spec.submodule_search_locations:        # a package: all its Python files
        h = hashlib.sha256()
        for folder in spec.submodule_search_locations:
            base = Path(folder)
            for p in sorted(q for q in base.rglob("*.py") if "__pycache__" not in q.parts):
                h.update(p.relative_to(base).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
        return "sha256:" + h.hexdigest()
    if not spec.origin or not os.path.isfile(spec.origin) or not spec.origin.endswith(".py"):
        raise FileNotFoundError(f"module {module!r} has no Python source file (origin {spec.origin!r})")
    return "sha256:" + file_sha256(spec.origin)


def _library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


@functools.lru_cache(maxsize=1)
def code_identity() -> dict[str, str]:
    """``{"floss": <source digest>, <library>: <version>, ...}``: the code part of every fingerprint. Differences
    are reported key by key (``floss`` = this package's source changed, else which library moved)."""
    return {"floss": source_digest(), **_library_versions()}


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def weights_id(pretrained: str | None, default: str | None) -> str:
    """What identifies the weights in a fingerprint: the registry tag, or a weight file's sha256."""
    tag = pretrained or default or "default"
    if tag == "none":
        return "none (random, seed 0)"
    if os.path.isfile(tag):
        return f"sha256:{file_sha256(tag)}"
    return f"tag:{tag}"


def weight_file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be a weight file, or None, from a few bytes (no loading): empty, truncated (a
    ``torch.save`` zip without its directory), or neither a ``torch.save`` file nor a safetensors file."""
    import struct
    import zipfile

    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return f"weight file {path} is empty (0 bytes); download it again"
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK"):
        return None if zipfile.is_zipfile(path) else \
            f"weight file {path} is a truncated torch.save archive ({size} bytes); download it again"
    if head[:1] == b"\x80":          # torch.save of a legacy (pickle) file
        return None
    if len(head) >= 9 and head[8:9] == b"{" and 8 + struct.unpack("<Q", head[:8])[0] <= size:
        return None                   # safetensors: u64 header length, then the JSON header
    return f"weight file {path} is neither a torch.save file nor a safetensors file (first bytes {head[:8]!r})"


def file_identity(paths: Iterable[str | os.PathLike | None]) -> str:
    """``size:mtime_ns`` of each existing file (``-`` for a missing one), joined by ``|``: a replaced, rewritten or
    removed file changes it. Cheap (one ``stat`` per file), so every run checks every input."""
    parts = []
    for p in paths:
        if p is None:
            continue
        try:
            st = os.stat(p)
        except OSError:
            parts.append("-")
            continue
        parts.append(f"{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def _input_files(ds, index: int) -> list:
    files = [ds.image_path(index)]
    label_path = getattr(ds, "label_path", None)
    if label_path is not None and getattr(ds, "labels", False):
        files.append(label_path(index))
    return files


def input_identities(ds, ids: Sequence[str]) -> list[list[str]]:
    """``[[id, identity], ...]`` for ``ids`` of dataset ``ds`` (order kept); datasets without files on disk (the
    synthetic source) identify an image by its id alone."""
    if not hasattr(ds, "image_path"):
        return [[i, ""] for i in ids]
    position = {image_id: k for k, image_id in enumerate(ds.ids)}
    return [[i, file_identity(_input_files(ds, position[i]))] for i in ids]


def inputs_digest(identities: Sequence[Sequence[str]]) -> str:
    """One key for a whole input list (ids, order and file identities)."""
    return "sha256:" + hashlib.sha256(json.dumps([list(x) for x in identities]).encode()).hexdigest()


def reusable_prefix(done: Sequence[Sequence[str]], current: Sequence[Sequence[str]]) -> int:
    """How many leading entries of ``done`` (``[id, identity]`` pairs, in processing order) equal the leading
    entries of ``current``: work on exactly those can be kept without changing a byte of the result (sums and
    shards depend on the order). A deleted, replaced or newly inserted image ends the prefix."""
    n = 0
    for a, b in zip(done, current):
        if list(a) != list(b):
            break
        n += 1
    return n


def describe_input_change(done: Sequence[Sequence[str]], current: Sequence[Sequence[str]]) -> str:
    """``"1 added: c; 1 replaced: street/b"``: how the inputs of ``done`` differ from ``current``, naming the first
    three ids of each kind (for the log)."""
    old, new = dict(map(tuple, done)), dict(map(tuple, current))
    kinds = (("added", [i for i in new if i not in old]), ("deleted", [i for i in old if i not in new]),
             ("replaced", [i for i in new if i in old and old[i] != new[i]]))
    parts = [f"{len(ids)} {what}: {', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''}" for what, ids in kinds if ids]
    return "; ".join(parts) or "order changed"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m floss.util.provenance [--out FILE]``: print (or write) the code identity as JSON — the pipeline's
    ``code`` stage, on which every stage that computes numbers depends."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m floss.util.provenance", description=main.__doc__)
    p.add_argument("--out", type=Path, help="write the JSON here (atomically) instead of printing it")
    p.add_argument("--params", type=Path, help="params.yaml: its rank.metric_plugins' sources are added to the "
                                               "identity (a \"metric_plugins\" key, only when there are any)")
    args = p.parse_args(argv)
    doc = {"code": code_identity()}
    if args.params is not None and args.params.is_file():
        import yaml
        plugins = ((yaml.safe_load(args.params.read_text()) or {}).get("rank") or {}).get("metric_plugins") or []
        if plugins:      # the user's metric code: floss's digest cannot see it, every stage downstream must
            doc["metric_plugins"] = {str(s): module_source_digest(str(s).split(":")[0]) for s in plugins}
    text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    if args.out is None:
        sys.stdout.write(text)
        return 0
    from floss.util.io import atomic_write_text
    if not args.out.is_file() or args.out.read_text() != text:      # unchanged file: same bytes, same mtime
        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
