"""The pipeline's stages that look outside the repository: ``stage inputs`` (data/inputs.json, the identity of the
dataset files the paper profile reads) and ``stage authors`` (the authors' data, local or downloaded).

May import: the standard library, :mod:`floss.util.paths`, and (lazily) :mod:`floss.data.datasets`, :mod:`floss.pipeline.params`,
:mod:`floss.util.provenance`, :mod:`floss.util.io` and :mod:`floss.data.authors`; never :mod:`floss.pipeline`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from floss.util import paths


def stage_inputs(params: Mapping) -> Path:
    """``data/inputs.json``: per dataset split the paper profile reads, a digest of its image (and label) files'
    ids, sizes and modification times (:mod:`floss.util.provenance`). DVC cannot see a dataset outside the repository;
    this always-run stage can, and the stages that read images depend on its output, so an added, deleted or
    replaced image reruns them (and their caches and checkpoints recompute only what changed)."""
    from floss.data.datasets import open_dataset
    from floss.pipeline.params import dataset_folder, needed_splits
    from floss.util.provenance import input_identities, inputs_digest

    digests = {}
    if params["profile"] != "demo":            # the demo reads no image: its synthetic data is keyed by params
        for d, splits in sorted(needed_splits(params).items()):
            for split, labels in sorted(splits.items()):
                ds = open_dataset(d, dataset_folder(params, d), split, labels=labels)
                ids = sorted(ds.ids)
                digests[f"{d}/{split}"] = {"images": len(ids), "inputs": inputs_digest(input_identities(ds, ids))}
    out = paths.DATA / "inputs.json"
    text = json.dumps(digests, indent=1, sort_keys=True) + "\n"
    if not out.is_file() or out.read_text() != text:
        from floss.util.io import atomic_write_text
        atomic_write_text(out, text)
    return out


def stage_authors(params: Mapping) -> dict:
    """``data/authors``: the authors' files (local folder, else the pinned URL) and ``status.json``; an
    unavailable source is recorded, never an error (floss.data.authors.obtain_authors)."""
    from floss.data.authors import obtain_authors

    a = params["authors"]
    local = paths.from_root(a["local"]) if a["local"] else None
    return obtain_authors(paths.DATA / "authors", url=a["url"], local=local, timeout=a["timeout_s"])
