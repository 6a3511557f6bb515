"""Feature cache: the contract between the GPU half (``floss extract``) and everything else.

Layout (docs/architecture.md, "Feature cache")::

    <cache>/manifest.json                 merged manifest, ``complete: true`` once every rank finished
    <cache>/manifest.rank{r}.json         partial manifest of rank r (finished shards only), kept for resume
    <cache>/text.safetensors              "templates" [M, Q, D] float32 per-template query embeddings
    <cache>/shards/rank{r:03d}-of-{w:03d}-{n:05d}.safetensors
        per image i of the shard: "i/feats" [Nw, D, gh, gw] (L2-normalised, fp16 or fp32),
        "i/boxes" [Nw, 4] int32 (y1, y2, x1, x2 in resized coordinates), "i/label" [H, W] uint8

Why this shape: per-window features (not a window-averaged map) are what makes any text classifier reproduce
the end-to-end output (OVSS-models §4: the softmax sits per window on the patch grid). Labels are cached so
nothing after extraction needs the images.

Precision: ``dtype=torch.float32`` (default) stores the features exactly as computed (the authors' numbers);
``torch.float16`` halves the disk size but perturbs cosines by ~1e-3, which the softmax(100·) can turn into argmax
flips at near ties (measured effect: README, "Feature-cache precision").
Disk bytes per image = Nw·D·gh·gw·(2 | 4) + 16·Nw + H·W (label) + ~100 B of safetensors header, e.g.
fp16 ViT-B/16 448-crops on Cityscapes: 3·512·28·28·2 + 2048·1024 = 4,505,888 B = 4.3 MiB measured (fp32:
6.6 MiB; an ADE-sized 512×683 label: 2.6 MiB); see :meth:`FeatureCache.bytes_per_image`.

Writes are atomic (temp file + ``os.replace``). A shard is written when full; the rank's partial manifest is
rewritten after each shard, so an interrupted extraction resumes from its last finished shard and, because ids
are processed in a fixed order, produces byte-identical shards.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from floss._io import atomic_write, atomic_write_text
from floss.provenance import file_sha256  # noqa: F401  (shards' sha256; part of this module's API)

logger = logging.getLogger(__name__)

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


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


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


class CacheWriter:
    """Write one rank's share of a cache; resumable; see the module docstring for the layout.

    ``meta``: {"model", "dataset", "split", "class_names", "query_names", "query_to_class", "settings"};
    ``fingerprint``: flat dict identifying everything the features depend on (code, weights, settings, and an
    ``inputs`` digest of the whole input list); ``text``: [M, Q, D] float; ``inputs``: this rank's
    ``[id, file identity]`` pairs in processing order (:func:`floss.provenance.input_identities`).

    Reuse (:mod:`floss.provenance`): an earlier run here with other code, weights or settings is discarded; with
    other inputs, its leading shards that hold exactly the leading current inputs are kept and the rest is
    extracted again; a line in the log says which. The result equals a fresh extraction byte for byte.
    """

    def __init__(self, path: str | os.PathLike, meta: Mapping, fingerprint: Mapping, text: torch.Tensor,
                 rank: int = 0, world_size: int = 1, images_per_shard: int = 256,
                 dtype: torch.dtype = torch.float32, inputs: Sequence[Sequence[str]] | None = None):
        missing = [k for k in META_KEYS if k not in meta]
        if missing:
            raise ValueError(f"meta: missing keys {missing}; expected {list(META_KEYS)}")
        if not isinstance(text, torch.Tensor) or text.ndim != 3 or not text.is_floating_point():
            got = tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__
            raise ValueError(f"text: expected a float tensor [M, Q, D], received {got}")
        if text.shape[1] != len(meta["query_names"]) or len(meta["query_to_class"]) != len(meta["query_names"]):
            raise ValueError(f"text: expected Q = {len(meta['query_names'])} queries (meta query_names) and a "
                             f"query_to_class of the same length, received text {tuple(text.shape)}, "
                             f"query_to_class of length {len(meta['query_to_class'])}")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"rank/world_size: expected 0 <= rank < world_size, received {rank}/{world_size}")
        if not isinstance(images_per_shard, int) or images_per_shard < 1:
            raise ValueError(f"images_per_shard: expected a positive int, received {images_per_shard!r}")
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype: expected torch.float16 or torch.float32, received {dtype}")
        self.root = Path(path)
        self.rank, self.world_size, self.images_per_shard, self.dtype = rank, world_size, images_per_shard, dtype
        self.fingerprint = _jsonable(dict(fingerprint))
        self.feature_dim = int(text.shape[2])
        self._buffer: list[ImageRecord] = []
        self._inputs = [list(x) for x in inputs] if inputs is not None else None
        self._sources = dict(map(tuple, self._inputs or []))
        (self.root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        self._partial_path = self.root / f"manifest.rank{rank}.json"
        self._state = self._fresh_state(meta, text)
        self.complete = False
        self._resume(text)

    # -- setup -------------------------------------------------------------------------------------------
    def _fresh_state(self, meta: Mapping, text: torch.Tensor) -> dict:
        state = {"format": FORMAT, "fingerprint": self.fingerprint}
        state.update(_jsonable({k: meta[k] for k in META_KEYS}))
        state.update(num_templates=int(text.shape[0]), feature_dim=self.feature_dim,
                     dtype=str(self.dtype).removeprefix("torch."), world_size=self.world_size, rank=self.rank,
                     images_per_shard=self.images_per_shard, finished=False, images=[], shards=[], skipped=[],
                     processed=[])
        return state

    def _wipe(self, reason: str) -> None:
        """Remove every file of an earlier extraction here (manifests, text, shards): it cannot be reused."""
        logger.info("%s: %s; extracting every image again", self.root, reason)
        for p in [self.root / MANIFEST, self.root / TEXT_FILE, *self.root.glob("manifest.rank*.json"),
                  *(self.root / SHARD_DIR).glob("*.safetensors")]:
            p.unlink(missing_ok=True)

    def _stale_reason(self, manifest: dict, source: Path) -> str | None:
        """Why ``manifest`` (of an earlier run) cannot be extended, or None. Inputs alone are no reason: the
        images that are still the same keep their shards (:meth:`_keep_prefix`)."""
        diff = [d for d in fingerprint_differences(manifest.get("fingerprint", {}), self.fingerprint)
                if not d.startswith("inputs:")]
        if diff:
            return f"{source.name} was written by other code, weights or settings (" + "; ".join(diff) + ")"
        if manifest.get("format") != FORMAT:
            return f"{source.name} has cache format {manifest.get('format')!r}, expected {FORMAT}"
        if "world_size" in manifest and manifest["world_size"] != self.world_size:
            return f"{source.name} was written by {manifest['world_size']} processes, now {self.world_size}"
        return None

    def _resume(self, text: torch.Tensor) -> None:
        complete = self.root / MANIFEST
        if complete.exists():
            manifest = _read_json(complete)
            reason = self._stale_reason(manifest, complete)
            if reason:
                self._wipe(reason)
            elif manifest.get("complete") and not fingerprint_differences(manifest["fingerprint"], self.fingerprint):
                self.complete = True
                self.done_ids = {im["id"] for im in manifest["images"] + manifest.get("skipped", [])}
                logger.info("%s is already complete (%d images): nothing to extract", self.root, len(self.done_ids))
                return
            else:
                complete.unlink()          # some inputs changed: rebuilt from the rank manifests below
        for r, part in _partial_manifests(self.root).items():
            reason = self._stale_reason(part, self.root / f"manifest.rank{r}.json")
            if reason:
                self._wipe(reason)
                break
        text_path = self.root / TEXT_FILE
        text32 = text.detach().to("cpu", torch.float32).contiguous()
        if text_path.exists():
            with safe_open(text_path, framework="pt") as f:
                old = f.get_tensor("templates")
            if old.shape != text32.shape or not torch.equal(old, text32):
                self._wipe(f"{TEXT_FILE} holds other text embeddings")
        if not text_path.exists():
            _atomic_save({"templates": text32}, text_path, {"format": str(FORMAT)})
        if self._partial_path.exists():
            self._keep_prefix(_read_json(self._partial_path))
        self.done_ids = {i for i, _ in self._state["processed"]}
        if self.done_ids:
            logger.info("resuming rank %d of %s: %d images already cached", self.rank, self.root, len(self.done_ids))

    def _keep_prefix(self, old: dict) -> None:
        """Keep the leading shards of an earlier run whose images are, in order, the leading current inputs with
        the same files (and the images buffered when it stopped, :meth:`_save_pending`); delete the rest. The
        shards then hold exactly the bytes a fresh extraction writes."""
        from floss.provenance import describe_input_change, reusable_prefix

        pending = self._load_pending()
        processed = list(old.get("processed", []))        # the pending images are its last non-skipped entries
        inputs = self._inputs if self._inputs is not None else processed   # no input list: trust the ids
        n = reusable_prefix(processed, inputs)
        if n < len(processed):
            logger.info("%s: inputs changed since the last run (%s): re-extracting from image %d of %d", self.root,
                        describe_input_change(processed, inputs), n + 1, len(inputs))
        position = {image_id: k for k, (image_id, _) in enumerate(processed)}
        end, keep = -1, []            # end: input position of the last image of the last kept shard
        images = {}
        for im in old["images"]:
            images.setdefault(im["shard"], []).append(im)
        for s in old["shards"]:
            last = max(position.get(im["id"], n) for im in images.get(s["name"], []))
            full = s["num_images"] == old.get("images_per_shard", self.images_per_shard)
            exists = (self.root / SHARD_DIR / f"{s['name']}.safetensors").exists()
            if not (exists and last < n and (full or n == len(processed) == len(inputs) and not pending)):
                break
            keep.append(s)
            end = last
        names = {s["name"] for s in keep}
        for s in old["shards"]:
            if s["name"] not in names:
                (self.root / SHARD_DIR / f"{s['name']}.safetensors").unlink(missing_ok=True)
        self._state["shards"] = keep
        self._state["images"] = [im for im in old["images"] if im["shard"] in names]
        self._state["skipped"] = [sk for sk in old.get("skipped", []) if position.get(sk["id"], n) <= end]
        self._state["processed"] = processed[:end + 1]
        # the buffered images of an interrupted run: reused when they directly follow the kept shards
        first, stop = (position.get(pending[0][0][0], n), position.get(pending[-1][0][0], n)) if pending else (0, n)
        if pending and end < first and stop < n:       # between the shards and the buffer only skipped images
            self._state["skipped"] += [sk for sk in old.get("skipped", []) if end < position.get(sk["id"], n) <= stop]
            self._state["processed"] = processed[:stop + 1]
            self._buffer = [rec for _, rec in pending]
            logger.info("%s: %d buffered images of the interrupted run reused", self.root, len(self._buffer))
        if len(keep) < len(old["shards"]):
            logger.info("%s: %d of %d shards kept", self.root, len(keep), len(old["shards"]))

    # -- interruption --------------------------------------------------------------------------------------
    @property
    def _pending_path(self) -> Path:
        return self.root / SHARD_DIR / f"pending.rank{self.rank}.safetensors"

    def _save_pending(self) -> None:
        """On an error, keep the buffered (not yet sharded) images, so no finished work is lost."""
        if not self._buffer:
            return
        tensors, entries = {}, []
        for i, rec in enumerate(self._buffer):
            tensors[f"{i}/feats"], tensors[f"{i}/boxes"] = rec.feats, rec.boxes
            if rec.label is not None:
                tensors[f"{i}/label"] = rec.label
            entries.append({"id": rec.id, "source": self._source(rec.id), "orig_size": list(rec.orig_size),
                            "resized_size": list(rec.resized_size)})
        _atomic_save(tensors, self._pending_path, {"entries": json.dumps(entries)})
        logger.info("%s: %d extracted images kept for the next run", self.root, len(entries))

    def _load_pending(self) -> list[tuple[list[str], ImageRecord]]:
        path = self._pending_path
        if not path.exists():
            return []
        out = []
        with safe_open(path, framework="pt") as f:
            entries = json.loads(f.metadata()["entries"])
            for i, e in enumerate(entries):
                label = f.get_tensor(f"{i}/label") if f"{i}/label" in f.keys() else None
                rec = ImageRecord(e["id"], f.get_tensor(f"{i}/feats"), f.get_tensor(f"{i}/boxes"),
                                  tuple(e["resized_size"]), tuple(e["orig_size"]), label)
                out.append(([e["id"], e["source"]], rec))
        path.unlink()
        return out

    def _source(self, image_id: str) -> str:
        return self._sources.get(image_id, "")

    # -- writing -----------------------------------------------------------------------------------------
    def add(self, record: ImageRecord) -> None:
        """Buffer one image; the shard is written atomically when ``images_per_shard`` images are buffered."""
        if self.complete:
            raise CacheError(f"{self.root} is complete; refusing to add {record.id!r}")
        if record.id in self.done_ids or any(r.id == record.id for r in self._buffer):
            raise ValueError(f"record.id: {record.id!r} is already in the cache")
        self._buffer.append(self._validated(record))
        self._state["processed"].append([record.id, self._source(record.id)])
        if len(self._buffer) >= self.images_per_shard:
            self._flush()

    def skip(self, image_id: str, reason: str) -> None:
        """Record an input that could not be used (``--on-bad-image skip``): listed in the manifest's ``skipped``."""
        if self.complete:
            raise CacheError(f"{self.root} is complete; refusing to skip {image_id!r}")
        self._state["skipped"].append({"id": image_id, "source": self._source(image_id), "reason": reason})
        self._state["processed"].append([image_id, self._source(image_id)])
        self.done_ids.add(image_id)

    def _validated(self, rec: ImageRecord) -> ImageRecord:
        if not isinstance(rec.id, str) or not rec.id:
            raise ValueError(f"record.id: expected a non-empty str, received {rec.id!r}")
        f, b = rec.feats, torch.as_tensor(rec.boxes)
        if f.ndim != 4 or f.shape[1] != self.feature_dim or not f.is_floating_point():
            raise ValueError(f"record {rec.id!r} feats: expected float [Nw, {self.feature_dim}, gh, gw], "
                             f"received {tuple(f.shape)} {f.dtype}")
        if b.shape != (f.shape[0], 4) or b.is_floating_point():
            raise ValueError(f"record {rec.id!r} boxes: expected int [{f.shape[0]}, 4], received "
                             f"{tuple(b.shape)} {b.dtype}")
        h, w = rec.resized_size
        if bool(((b[:, 0] < 0) | (b[:, 1] > h) | (b[:, 2] < 0) | (b[:, 3] > w)
                 | (b[:, 1] <= b[:, 0]) | (b[:, 3] <= b[:, 2])).any()):
            raise ValueError(f"record {rec.id!r} boxes: expected (y1, y2, x1, x2) inside the resized size "
                             f"{rec.resized_size}, received {b.tolist()}")
        label = rec.label
        if label is not None:
            if tuple(label.shape) != tuple(rec.orig_size):
                raise ValueError(f"record {rec.id!r} label: expected shape {tuple(rec.orig_size)} (orig_size), "
                                 f"received {tuple(label.shape)}")
            if label.dtype != torch.uint8:
                if label.is_floating_point() or (label.numel() and (int(label.min()) < 0 or int(label.max()) > 255)):
                    raise ValueError(f"record {rec.id!r} label: expected integer values in 0..255, received "
                                     f"dtype {label.dtype}")
                label = label.to(torch.uint8)
            label = label.cpu().contiguous()
        return ImageRecord(rec.id, f.detach().to("cpu", self.dtype).contiguous(),
                           b.detach().to("cpu", torch.int32).contiguous(),
                           (int(h), int(w)), (int(rec.orig_size[0]), int(rec.orig_size[1])), label)

    def _flush(self) -> None:
        if not self._buffer:
            return
        name = shard_name(self.rank, self.world_size, len(self._state["shards"]))
        tensors = {}
        for i, rec in enumerate(self._buffer):
            tensors[f"{i}/feats"], tensors[f"{i}/boxes"] = rec.feats, rec.boxes
            if rec.label is not None:
                tensors[f"{i}/label"] = rec.label
        path = self.root / SHARD_DIR / f"{name}.safetensors"
        # a single metadata key: safetensors writes metadata keys in hash order, so several keys would make
        # the bytes of a resumed and an uninterrupted extraction differ
        _atomic_save(tensors, path, {"ids": json.dumps([r.id for r in self._buffer])})
        self._state["shards"].append({"name": name, "rank": self.rank, "num_images": len(self._buffer),
                                      "sha256": file_sha256(path)})
        self._state["images"] += [{"id": r.id, "source": self._source(r.id), "shard": name, "index": i,
                                   "orig_size": list(r.orig_size),
                                   "resized_size": list(r.resized_size), "num_windows": r.num_windows,
                                   "has_label": r.label is not None} for i, r in enumerate(self._buffer)]
        self.done_ids.update(r.id for r in self._buffer)
        self._buffer = []
        atomic_write_text(self._partial_path, json.dumps(self._state, indent=1))
        logger.debug("wrote shard %s", path)

    def close(self) -> bool:
        """Write the last shard, mark this rank finished and merge if every rank has finished.

        Returns True when the cache is complete after this call.
        """
        if self.complete:
            return True
        self._flush()
        self._state["finished"] = True
        atomic_write_text(self._partial_path, json.dumps(self._state, indent=1))
        parts = _partial_manifests(self.root)
        if len(parts) == self.world_size and all(p.get("finished") for p in parts.values()):
            merge_partial_manifests(self.root)
            self.complete = True
        return self.complete

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # on an error the buffered images are kept aside (not sharded: a short shard would make the resumed
        # cache differ from an uninterrupted one); the next run puts them back in its buffer
        if exc_type is None:
            self.close()
        else:
            self._save_pending()
            atomic_write_text(self._partial_path, json.dumps(self._state, indent=1))


class FeatureCache:
    """Read-only view of a complete cache; records are read lazily, one shard file open at a time."""

    def __init__(self, path: str | os.PathLike, expected_fingerprint: Mapping | None = None):
        self.root = Path(path)
        if not self.root.is_dir():
            raise CacheError(f"{self.root}: feature cache folder not found (run `python -m floss extract` first)")
        mpath = self.root / MANIFEST
        manifest = _read_json(mpath) if mpath.exists() else None
        if manifest is None or not manifest.get("complete"):
            manifest = merge_partial_manifests(self.root, write=os.access(self.root, os.W_OK))
        if manifest.get("format") != FORMAT:
            raise CacheError(f"{mpath}: expected cache format {FORMAT}, received {manifest.get('format')!r}")
        self.manifest = manifest
        self.class_names: list[str] = list(manifest["class_names"])
        self.query_names: list[str] = list(manifest["query_names"])
        self.query_to_class: list[int] = [int(q) for q in manifest["query_to_class"]]
        self.feature_dim = int(manifest["feature_dim"])
        self._images = manifest["images"]
        self._by_id = {im["id"]: i for i, im in enumerate(self._images)}
        missing = [s["name"] for s in manifest["shards"] if not self._shard_path(s["name"]).exists()]
        if missing:
            raise CacheError(f"{self.root}: shard files missing: {missing[:5]} (the cache is corrupt; extract again)")
        self._open: tuple[str, Any] | None = None
        self._text: torch.Tensor | None = None
        if expected_fingerprint is not None:
            self.check_fingerprint(expected_fingerprint)

    def _shard_path(self, name: str) -> Path:
        return self.root / SHARD_DIR / f"{name}.safetensors"

    @property
    def fingerprint(self) -> dict:
        return dict(self.manifest["fingerprint"])

    def check_fingerprint(self, expected: Mapping) -> None:
        """Raise :class:`CacheError` naming every key whose cached value differs from ``expected``."""
        diff = fingerprint_differences(self.manifest["fingerprint"], expected)
        if diff:
            raise CacheError(f"{self.root} is stale or was made for something else; differing fingerprint keys: "
                             + "; ".join(diff))

    @property
    def settings(self):
        """The :class:`floss.models.base.ProtocolSettings` the features were extracted with."""
        from floss.models.base import ProtocolSettings
        return ProtocolSettings.from_dict(dict(self.manifest["settings"]))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def text(self) -> torch.Tensor:
        """[M, Q, D] float32 per-template query embeddings."""
        if self._text is None:
            with safe_open(self.root / TEXT_FILE, framework="pt") as f:
                self._text = f.get_tensor("templates")
        return self._text

    @property
    def ids(self) -> list[str]:
        return [im["id"] for im in self._images]

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int | str) -> ImageRecord:
        if isinstance(index, str):
            if index not in self._by_id:
                raise KeyError(f"image id {index!r} is not in the cache {self.root}")
            index = self._by_id[index]
        im = self._images[index]
        name = im["shard"]
        if self._open is None or self._open[0] != name:
            self._open = (name, safe_open(self._shard_path(name), framework="pt"))
        f, i = self._open[1], im["index"]
        label = f.get_tensor(f"{i}/label") if im.get("has_label", True) else None
        return ImageRecord(im["id"], f.get_tensor(f"{i}/feats"), f.get_tensor(f"{i}/boxes"),
                           tuple(im["resized_size"]), tuple(im["orig_size"]), label)

    def __iter__(self) -> Iterator[ImageRecord]:
        for i in range(len(self)):
            yield self[i]

    def disk_bytes(self) -> int:
        """Bytes of all shard files (text.safetensors and manifests excluded)."""
        return sum(self._shard_path(s["name"]).stat().st_size for s in self.manifest["shards"])

    def bytes_per_image(self) -> float:
        return self.disk_bytes() / max(len(self), 1)

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest (reads the whole cache)."""
        for s in self.manifest["shards"]:
            if file_sha256(self._shard_path(s["name"])) != s["sha256"]:
                raise CacheError(f"{self._shard_path(s['name'])}: sha256 differs from the manifest (corrupt shard)")
