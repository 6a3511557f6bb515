"""Feature-cache writer: :class:`CacheWriter` writes one rank's share of a cache, resumably and atomically.

Owns the writing side of the layout described in :mod:`floss.data.cache` (shards, the rank's partial manifest,
text embeddings, the pending images of an interrupted run) and the reuse rule for an earlier run in the same
folder (:mod:`floss.util.provenance`).

May import: the standard library, torch, safetensors, :mod:`floss.util.io`, :mod:`floss.util.provenance` and
:mod:`floss.data.cache_manifest`; never the reader (:mod:`floss.data.cache`) or anything above it.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from floss.util.io import atomic_write, atomic_write_text
from floss.data.cache_manifest import (FORMAT, MANIFEST, META_KEYS, SHARD_DIR, TEXT_FILE, CacheError, ImageRecord,
                                  _jsonable, _partial_manifests, _read_json, fingerprint_differences,
                                  merge_partial_manifests, shard_name)
from floss.util.provenance import file_sha256

logger = logging.getLogger("floss.data.cache")   # one logger name for every part of the cache (as before the split)

_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


class CacheWriter:
    """Write one rank's share of a cache; resumable; see the module docstring for the layout.

    ``meta``: {"model", "dataset", "split", "class_names", "query_names", "query_to_class", "settings"} and,
    for a template set other than CLIP's 80, ``"templates"`` (its M texts, recorded in the manifest);
    ``fingerprint``: flat dict identifying everything the features depend on (code, weights, settings, and an
    ``inputs`` digest of the whole input list); ``text``: [M, Q, D] float; ``inputs``: this rank's
    ``[id, file identity]`` pairs in processing order (:func:`floss.util.provenance.input_identities`).

    Reuse (:mod:`floss.util.provenance`): an earlier run here with other code, weights or settings is discarded; with
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
        if meta.get("templates") is not None:      # any template set but CLIP's 80: its texts, in id order
            if len(meta["templates"]) != int(text.shape[0]):
                raise ValueError(f"meta['templates']: expected {int(text.shape[0])} texts (text embeddings "
                                 f"[M, Q, D]), received {len(meta['templates'])}")
            state["templates"] = list(meta["templates"])
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
        from floss.util.provenance import describe_input_change, reusable_prefix

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
