"""Saving and loading :class:`floss.core.stats.TemplateStats` (a safetensors file with the JSON config and image ids in
its metadata, written atomically).

The container's friend: it reads and fills a TemplateStats' state (``_get_state()``, ``_records``); the class is
passed in (``cls``), so this module never imports :mod:`floss.core.stats`. May import: the standard library, torch,
safetensors and :mod:`floss.util.io`.
"""
from __future__ import annotations

import json
import os

import torch

from floss.util.io import atomic_write

_FORMAT = 1


def save_template_stats(stats, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Write to a safetensors file (JSON config and image ids in its metadata), atomically; ``extra`` (a JSON
    dict, e.g. the ids a resumable job has done) is stored with it and read back as ``.extra``."""
    from safetensors.torch import save_file
    path = os.fspath(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in stats._get_state().items()}
    ids = list(stats._records)
    for n, i in enumerate(ids):
        for k, v in stats._records[i].items():
            tensors[f"img/{n}/{k}"] = torch.tensor(v) if k == "npix" else v.contiguous()
    meta = {"format": _FORMAT, "num_templates": stats.num_templates, "num_classes": stats.num_classes,
            "metrics": list(stats.metrics), "feature_dim": stats.feature_dim,
            "track_images": stats.track_images, "image_ids": ids}
    if extra is not None:
        meta["extra"] = extra
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"floss_template_stats": json.dumps(meta)}))


def load_template_stats(cls, path: str | os.PathLike, device: torch.device | str | None = None):
    """Read a file written by :meth:`TemplateStats.save` (custom metrics must be registered again first)."""
    from safetensors import safe_open
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no such file {path!r}")
    with safe_open(path, framework="pt") as f:
        raw = (f.metadata() or {}).get("floss_template_stats")
        if raw is None:
            raise ValueError(f"path: {path!r} is not a TemplateStats file (no floss_template_stats metadata)")
        meta = json.loads(raw)
        if meta.get("format") != _FORMAT:
            raise ValueError(f"path: {path!r} has format {meta.get('format')!r}, expected {_FORMAT}")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out = cls(meta["num_templates"], meta["num_classes"], metrics=tuple(meta["metrics"]),
              feature_dim=meta["feature_dim"], track_images=meta["track_images"], device=device or "cpu")
    for key, val in out._get_state().items():
        val.copy_(tensors[key])
    out.extra = meta.get("extra")
    for n, i in enumerate(meta["image_ids"]):
        prefix = f"img/{n}/"
        rec = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        rec["npix"] = int(rec["npix"])
        out._records[i] = rec
    return out
