"""The authors' published data: 15 rankings files, the per-template IoU of CLIP-DINOiser on Cityscapes and the
top-4 experts derived from the rankings (Fig. 12 and the authors-vs-ours comparison need them).

Source: the FLOSS repository's raw files at a pinned commit (``authors.url`` in params.yaml), or a local folder with
the same files (``authors.local``; flat or with the repository's ``notebooks/`` sub-folder). Every file is
schema-checked (:func:`floss.core.rankings.validate_rankings`) before it is written, atomically, under ``data/authors/``.
These are third-party data: they are never committed to this repository.

The pipeline never fails for want of them (:func:`obtain_authors`): a local folder if one is given, else the pinned
URL, else ``data/authors/status.json`` records that the data is unavailable and why, and the items that need it
(Fig. 12 from the authors' data, the authors-vs-ours table) say so, with :data:`GET_IT`.
"""
from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping

from floss.util.io import atomic_write_bytes

logger = logging.getLogger(__name__)

MODELS = ("maskclip", "clipdinoiser", "naclip")
DATASETS = ("cityscapes", "pascalvoc20", "pascalco59", "ade20k", "cocostuff")
IOU_FILE = "iou_per_template_clipdinoiser_cityscapes.json"
TOP4_FILE = "top4_experts.json"
STATUS_FILE = "status.json"
#: the commit of github.com/yasserben/FLOSS whose files FLOSS-protocol.md describes (params.yaml pins the same)
PINNED_COMMIT = "ccf1d49dba37d0e35316dc50be57d133745a168a"
#: what a user runs to get the data once it is reachable (the authors stage retries on every ``dvc repro``)
GET_IT = ("run `dvc repro` on a machine with network access (the authors stage downloads the pinned files), or "
          "`dvc exp run -S authors.local=<folder holding rankings/ and the IoU file>` with a local copy")


def rankings_relpath(model: str, dataset: str) -> str:
    return f"rankings/{model}/template_rankings_{model}_{dataset}.json"



def _download(url: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise ConnectionError(
            f"authors.url: could not download {url} ({err}). Without network access, set authors.local in "
            "params.yaml to a folder holding the authors' files (rankings/<model>/template_rankings_<model>_"
            f"<dataset>.json and {IOU_FILE})") from err


def _read_local(local: Path, relpath: str) -> bytes:
    candidates = [local / relpath]
    if relpath.startswith("notebooks/"):
        candidates.append(local / relpath.removeprefix("notebooks/"))   # flat copies
    for path in candidates:
        if path.is_file():
            return path.read_bytes()
    raise FileNotFoundError(f"authors.local: {candidates[0]} not found (expected the authors' files under {local})")


def _parse(data: bytes, source: str) -> dict:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{source}: not valid JSON ({err})") from err


def validate_iou(doc: Mapping, source: str) -> None:
    """The per-template IoU file: {"mIoU": {tid: %}, <class>: {tid: %}} with the 19 Cityscapes classes."""
    from floss.core.classes import CLASS_NAMES

    expected = ["mIoU", *CLASS_NAMES["cityscapes"]]
    if not isinstance(doc, Mapping) or sorted(doc) != sorted(expected):
        got = sorted(doc)[:6] if isinstance(doc, Mapping) else type(doc).__name__
        raise ValueError(f"{source}: expected the keys mIoU + the 19 Cityscapes classes, received {got}")
    ids = {str(t) for t in range(80)}
    for key, values in doc.items():
        if not isinstance(values, Mapping) or set(values) != ids:
            raise ValueError(f"{source}[{key!r}]: expected IoU values for template ids '0'..'79'")
        bad = [t for t, v in values.items() if isinstance(v, bool) or not isinstance(v, (int, float))
               or not 0 <= v <= 100]
        if bad:
            raise ValueError(f"{source}[{key!r}]: expected IoU percentages in [0, 100], received "
                             f"{values[bad[0]]!r} for template {bad[0]}")


def top_experts(rankings: Mapping[str, Mapping], n: int = 4) -> dict[str, dict[str, list[int]]]:
    """``{"<model>/<dataset>": {class: [n template ids]}}`` from rankings documents keyed the same way."""
    from floss.core.rankings import select_experts

    out = {}
    for key, doc in rankings.items():
        names = list(doc["classes"])
        out[key] = dict(zip(names, select_experts(doc, n=n, class_names=names)))
    return out


#: the recorded reason of a download that could not connect (whatever the machine's error text)
NO_NETWORK = "no network access"


def obtain_authors(dest: str | os.PathLike, *, url: str, local: str | os.PathLike | None = None,
                   timeout: float = 15.0) -> dict:
    """The pipeline's authors stage: ``local`` if given, else ``url``, else record the data as unavailable.

    Always writes ``dest/status.json`` (``available``, ``source``, ``reasons``, ``get_it``) and returns it; never
    raises for a missing folder, a failed download or a broken copy (each attempt's reason is recorded and
    logged as a warning), so an offline machine still runs the whole pipeline.
    """
    dest = Path(dest)
    reasons = []
    attempts = ([("local", local)] if local is not None else []) + [("url", url)]
    for kind, source in attempts:
        try:
            fetch_authors(dest, url=url, local=source if kind == "local" else None, timeout=timeout)
        except (OSError, ValueError) as err:      # ConnectionError and FileNotFoundError are OSErrors
            # the download's own error (e.g. "Name or service not known") says more than the long URL
            why = str(err.__cause__) if isinstance(err, ConnectionError) and err.__cause__ else str(err)
            if kind == "url" and not why.startswith("HTTP Error"):
                # how a connection fails reads differently from machine to machine (resolver, proxy, timeout):
                # status.json is a DVC output recorded in dvc.lock, so it says the same everywhere (the log
                # keeps the details)
                why = NO_NETWORK
            reasons.append(f"{kind} {source}: {why}")
            logger.warning("authors' data from %s %s unavailable: %s", kind, source, err)
            continue
        status = {"available": True, "source": f"{kind}:{source}", "reasons": reasons, "get_it": None}
        break
    else:
        status = {"available": False, "source": None, "reasons": reasons, "get_it": GET_IT}
        logger.warning("the authors' published data is unavailable; the items that need it say so. To get it: %s",
                       GET_IT)
    atomic_write_bytes(dest / STATUS_FILE, (json.dumps(status, indent=1) + "\n").encode())
    return status


def authors_status(root: str | os.PathLike) -> dict:
    """``data/authors/status.json`` under ``root`` (written by :func:`obtain_authors`); a missing file reads as
    unavailable (the authors stage has not run)."""
    folder = Path(root) / "data" / "authors"
    path = folder / STATUS_FILE
    if not path.is_file():
        if (folder / "rankings").is_dir():      # files put there by hand, without the stage
            return {"available": True, "source": str(folder), "reasons": [], "get_it": None}
        return {"available": False, "source": None, "get_it": GET_IT,
                "reasons": [f"{path} does not exist (the pipeline's authors stage has not run)"]}
    return json.loads(path.read_text())


def unavailable_note(status: Mapping) -> str:
    """One sentence for captions and titles: the data was unavailable, why (first reason), how to get it."""
    reason = (status.get("reasons") or ["unknown reason"])[-1]
    kind, _, rest = reason.partition(" ")
    where = "the pinned URL" if kind == "url" else "the local folder" if kind == "local" else "the source"
    why = rest.split(": ", 1)[-1]
    return f"The authors' published data was unavailable ({where}: {why[:160]}). To get it, " \
           f"{status.get('get_it') or GET_IT}."


def fetch_authors(dest: str | os.PathLike, *, url: str, local: str | os.PathLike | None = None,
                  timeout: float = 15.0) -> Path:
    """Copy (``local``) or download (``url``) the authors' files into ``dest``, validated; returns ``dest``.

    A download fails on the first file that cannot be fetched, with a message naming ``authors.local``.
    ``top4_experts.json`` is computed from the rankings (:func:`floss.core.rankings.select_experts`); when the
    source also has one, the two must agree.
    """
    from floss.core.classes import ranking_keys
    from floss.core.rankings import validate_rankings

    dest = Path(dest)
    local = Path(local) if local is not None else None
    if local is not None and not local.is_dir():
        raise FileNotFoundError(f"authors.local: {local} is not a folder (expected the authors' files there)")

    def get(relpath: str) -> bytes:
        if local is not None:
            return _read_local(local, relpath)
        return _download(f"{url.rstrip('/')}/{relpath}", timeout)

    staged: dict[str, bytes] = {}
    rankings: dict[str, dict] = {}
    for model in MODELS:
        for dataset in DATASETS:
            rel = rankings_relpath(model, dataset)
            data = get(rel)
            doc = _parse(data, rel)
            validate_rankings(doc, class_names=ranking_keys(dataset, model))
            if doc.get("model") != model or doc.get("dataset") != dataset:
                raise ValueError(f"{rel}: expected model {model!r} and dataset {dataset!r}, received "
                                 f"{doc.get('model')!r} and {doc.get('dataset')!r}")
            staged[rel], rankings[f"{model}/{dataset}"] = data, doc
    data = get(f"notebooks/{IOU_FILE}")
    validate_iou(_parse(data, IOU_FILE), IOU_FILE)
    staged[IOU_FILE] = data
    top4 = top_experts(rankings, n=4)
    if local is not None and (local / TOP4_FILE).is_file():
        theirs = _parse((local / TOP4_FILE).read_bytes(), str(local / TOP4_FILE))
        if theirs != top4:
            diff = sorted(k for k in set(theirs) | set(top4) if theirs.get(k) != top4.get(k))
            raise ValueError(f"{local / TOP4_FILE}: differs from the top-4 experts computed from the rankings "
                             f"for {diff[:5]}")
    staged[TOP4_FILE] = (json.dumps(top4, indent=1) + "\n").encode()
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"dest: {dest} exists and is not a folder")
    for rel, data in staged.items():
        atomic_write_bytes(dest / rel, data)
    logger.info("authors' data: %d files in %s (from %s)", len(staged), dest, local or url)
    return dest
