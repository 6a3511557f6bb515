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

Modules: this one is the reader (:class:`FeatureCache`) and the public face of the cache (every name below is
importable from here); :mod:`floss.data.cache_writer` holds :class:`CacheWriter`, :mod:`floss.data.cache_manifest` the
format's names, :class:`ImageRecord`, fingerprints and the merge of partial manifests. May import those two,
the standard library, torch, safetensors, :mod:`floss.util.provenance` and (lazily) :mod:`floss.models.base`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import safe_open

from floss.data.cache_manifest import (FORMAT, MANIFEST, META_KEYS, SHARD_DIR, TEXT_FILE, CacheError,  # noqa: F401
                                  ImageRecord, fingerprint_differences, merge_partial_manifests, shard_name,
                                  _read_json)
from floss.data.cache_writer import CacheWriter  # noqa: F401  (part of this module's API)
from floss.util.provenance import file_sha256  # noqa: F401  (shards' sha256; part of this module's API)


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
    def num_templates(self) -> int:
        """M: the number of templates the text embeddings hold (manifest ``num_templates``)."""
        return int(self.manifest.get("num_templates", 80))

    @property
    def templates(self):
        """The :class:`floss.core.templates.TemplateSet` of the text embeddings: the manifest's ``"templates"``
        texts (written for any set but CLIP's 80), else CLIP's 80."""
        from floss.core.templates import DEFAULT_TEMPLATES, TemplateSet
        texts = self.manifest.get("templates")
        if texts is None:
            if self.num_templates != len(DEFAULT_TEMPLATES):
                raise CacheError(f"{self.root / MANIFEST}: {self.num_templates} templates but no 'templates' texts; "
                                 "expected the template texts (written by floss extract) or CLIP's 80")
            return DEFAULT_TEMPLATES
        ts = TemplateSet(texts, source=f"{self.root / MANIFEST}")
        if len(ts) != self.num_templates:
            raise CacheError(f"{self.root / MANIFEST}: 'templates' holds {len(ts)} texts, expected num_templates = "
                             f"{self.num_templates}")
        return ts

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
