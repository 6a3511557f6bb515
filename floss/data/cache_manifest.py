"""Feature-cache format: the facts every reader and writer of a cache shares.

Owns the layout's names and format number (``FORMAT``, ``MANIFEST``, ``TEXT_FILE``, ``SHARD_DIR``,
``META_KEYS``), :class:`CacheError`, :class:`ImageRecord`, shard names, the fingerprint comparison
(:func:`fingerprint_differences`) and the merge of the ranks' partial manifests into one
(:func:`merge_partial_manifests`). The layout itself is described in :mod:`floss.data.cache`.

May import: the standard library, torch, and floss's bottom helpers (:mod:`floss.util.io`); nothing else of floss.
:mod:`floss.data.cache_writer` and :mod:`floss.data.cache` build on it.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from floss.util.io import atomic_write_text

logger = logging.getLogger("floss.data.cache")   # one logger name for every part of the cache (as before the split)

FORMAT = 1
MANIFEST = "manifest.json"
TEXT_FILE = "text.safetensors"
SHARD_DIR = "shards"
META_KEYS = ("model", "dataset", "split", "class_names", "query_names", "query_to_class", "settings")
_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_PARTIAL_RE = re.compile(r"^manifest\.rank(\d+)\.json$")


class CacheError(RuntimeError):
    """A cache that cannot be used as asked: stale, mismatched, incomplete or corrupt."""


@dataclass
class ImageRecord:
    """One image of the cache: per-window features, window boxes, sizes and (optionally) the label."""
    id: str
    feats: torch.Tensor                 # [Nw, D, gh, gw], L2-normalised over D
    boxes: torch.Tensor                 # [Nw, 4] int32 (y1, y2, x1, x2) in resized coordinates
    resized_size: tuple[int, int]       # (h, w) of the resized image the windows tile
    orig_size: tuple[int, int]          # (H, W) of the original image / label
    label: torch.Tensor | None = None   # [H, W] uint8, 255 = ignore

    @property
    def num_windows(self) -> int:
        return int(self.feats.shape[0])


def shard_name(rank: int, world_size: int, index: int) -> str:
    return f"rank{rank:03d}-of-{world_size:03d}-{index:05d}"


def _jsonable(obj: Any) -> Any:
    """Round-trip through JSON so tuples/lists compare equal between fresh and loaded manifests."""
    return json.loads(json.dumps(obj))


def fingerprint_differences(cached: Mapping, expected: Mapping, prefix: str = "") -> list[str]:
    """Human-readable ``key: cached=... expected=...`` lines for every key whose value differs; nested dicts
    (settings, code) are compared key by key (``settings.scale: ...``)."""
    cached, expected = _jsonable(dict(cached)), _jsonable(dict(expected))
    lines = []
    for key in sorted(set(cached) | set(expected)):
        a, b = cached.get(key, "<absent>"), expected.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            lines += fingerprint_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: cached={a!r} expected={b!r}")
    return lines


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CacheError(f"cannot read cache manifest {path}: {e}") from e


def _partial_manifests(root: Path) -> dict[int, dict]:
    out = {}
    for p in root.iterdir() if root.is_dir() else ():
        m = _PARTIAL_RE.match(p.name)
        if m:
            out[int(m.group(1))] = _read_json(p)
    return out


def merge_partial_manifests(root: str | os.PathLike, write: bool = True) -> dict:
    """Merge the finished partial manifests of all ranks into one complete manifest (written atomically).

    Raises :class:`CacheError` if a rank is missing or unfinished, world sizes disagree, fingerprints differ
    or an image id appears twice.
    """
    root = Path(root)
    parts = _partial_manifests(root)
    if not parts:
        raise CacheError(f"{root}: no manifest.json and no partial manifests: not a feature cache")
    first = parts[min(parts)]
    world = first["world_size"]
    missing = sorted(set(range(world)) - set(parts))
    unfinished = sorted(r for r, p in parts.items() if not p.get("finished"))
    if missing or unfinished:
        done = sum(len(p["images"]) for p in parts.values())
        raise CacheError(
            f"{root}: incomplete cache ({done} images written); ranks missing: {missing or 'none'}, "
            f"unfinished: {unfinished or 'none'} of world size {world}. Rerun the extraction with the same "
            "arguments and world size to resume it.")
    for r, p in parts.items():
        if p["world_size"] != world:
            raise CacheError(f"{root}: partial manifests of different world sizes ({world} and {p['world_size']}) "
                             "are mixed; delete the folder and extract again")
        diff = fingerprint_differences(p["fingerprint"], first["fingerprint"])
        if diff:
            raise CacheError(f"{root}: rank {r} was extracted with a different fingerprint: " + "; ".join(diff))
    images = sorted((im for p in parts.values() for im in p["images"]), key=lambda im: im["id"])
    ids = [im["id"] for im in images]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise CacheError(f"{root}: image ids written by several ranks: {dup}")
    manifest = {k: v for k, v in first.items() if k not in ("rank", "finished", "images", "shards", "processed")}
    manifest["images"] = images
    manifest["skipped"] = sorted((s for p in parts.values() for s in p.get("skipped", [])), key=lambda s: s["id"])
    manifest["shards"] = sorted((s for p in parts.values() for s in p["shards"]), key=lambda s: s["name"])
    manifest["complete"] = True
    if write:
        atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=1))
        logger.info("merged %d partial manifests of %s: %d images in %d shards", len(parts), root,
                    len(images), len(manifest["shards"]))
    return manifest
