"""Analyses of written artifacts (results JSON, rankings JSON, the authors' files); no cache, no model.

Paths follow PIPELINE.md and are always built from an explicit ``root`` (never the current directory).
IoU values are percent, as in the results JSON and the paper.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from floss.core.rankings import expert_quality, experts_overlap, ranking_key, select_experts, true_experts

logger = logging.getLogger(__name__)


def results_path(root, model: str, dataset: str, kind: str = "eval") -> Path:
    """``<root>/results/<kind>/<model>/<dataset>.json`` (kind: eval | transfer)."""
    return Path(root) / "results" / kind / model / f"{dataset}.json"


def rankings_path(root, model: str, dataset: str, authors: bool = False) -> Path:
    """Our rankings (``results/rankings/...``) or the authors' (``data/authors/rankings/...``)."""
    base = Path(root) / ("data/authors/rankings" if authors else "results/rankings")
    return base / model / f"template_rankings_{model}_{dataset}.json"


def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    """Read a JSON file, with an error naming the file and what it should hold when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: expected {path} to exist (run the pipeline stage that writes it)")
    with path.open(encoding="utf-8") as fh:
        return json.load(fh)


def load_results(root, model: str, dataset: str, kind: str = "eval") -> dict:
    """The results JSON of ``model`` on ``dataset`` (``kind="eval"`` or ``"transfer"``)."""
    return read_json(results_path(root, model, dataset, kind), what=f"results of {model}/{dataset} ({kind})")


#: the matrix of params.yaml's default (what a notebook shows when it runs without the pipeline's parameters)
PAPER_MATRIX = {"maskclip": ["cityscapes", "pascalvoc20", "pascalco59", "ade20k", "cocostuff"],
                "naclip": ["cityscapes", "pascalvoc20", "pascalco59", "ade20k", "cocostuff"],
                "clipdinoiser": ["cityscapes", "pascalvoc20", "pascalco59", "ade20k", "cocostuff"],
                "naclip_vitl14": ["cityscapes", "pascalco59"],
                **{m: ["cityscapes", "pascalco59"] for m in ("sclip", "clearclip", "gem", "sclip_vitl14",
                                                               "gem_vitl14", "resclip", "scclip")},
                "gem_quoted": ["cityscapes", "pascalco59", "ade20k"]}


def ran(matrix: Mapping[str, Sequence[str]] | None, model: str, dataset: str) -> bool:
    """Whether params.yaml's ``models`` matrix evaluates ``model`` on ``dataset`` (``None``: the paper's matrix)."""
    matrix = PAPER_MATRIX if matrix is None else matrix
    return dataset in (matrix.get(model) or ())


def not_run_message(model: str, dataset: str, what: str = "this item") -> str:
    """Why a figure or table cell is empty: the run is not in params.yaml, and how to add it."""
    return (f"Not run: {what} needs {model} on {dataset}, which params.yaml's `models` matrix does not include "
            f"(add it, e.g. `dvc exp run -S 'models.{model}=[..., {dataset}]'`).")


def results_or_none(root, matrix, model: str, dataset: str, kind: str = "eval") -> dict | None:
    """The results of ``model`` on ``dataset`` when the matrix ran them, else None (a cell shown "not run")."""
    if kind == "eval" and not ran(matrix, model, dataset):
        return None
    return load_results(root, model, dataset, kind)


#: the mark of outputs computed from weights other than the official ones (e.g. the test rehearsal's tiny models)
OTHER_WEIGHTS_MARK = "weights other than the official ones; not the paper's numbers"


def provenance(*documents: Mapping | None) -> bool | str:
    """How outputs made from ``documents`` (results JSON, cache manifests) must be marked: ``True`` for the demo's
    synthetic data, :data:`OTHER_WEIGHTS_MARK` when any was computed with unofficial weights, else ``False``.
    ``tables.write_table(synthetic=...)`` and ``plots.demo_title`` take either."""
    from floss.models import official_weights

    if is_synthetic(*documents):
        return True
    for doc in documents:
        if doc is None:
            continue
        fp = doc.get("fingerprint") or doc.get("config", {}).get("fingerprint")
        if fp and not official_weights(fp.get("model", doc.get("model", "")), fp.get("backbone"), fp.get("weights")):
            return OTHER_WEIGHTS_MARK
    return False


def is_synthetic(*documents: Mapping | None) -> bool:
    """True when any results/manifest document says ``"source": "synthetic"`` (the demo profile)."""
    return any(doc is not None and doc.get("source") == "synthetic" for doc in documents)


def _nan(value) -> float:
    return math.nan if value is None else float(value)


def method_miou(results: Mapping, method: str = "floss") -> float:
    """mIoU (%) of ``method`` (baseline | floss | floss_<fusion>) in a results document (NaN for null)."""
    methods = results.get("methods", {})
    if method not in methods:
        raise KeyError(f"results of {results.get('model')}/{results.get('dataset')}: no method {method!r} "
                       f"(available: {sorted(methods)})")
    return _nan(methods[method]["miou"])


def class_iou(results: Mapping, method: str = "baseline") -> pd.Series:
    """Per-class IoU (%) of ``method``, in the results' class order (NaN for absent classes)."""
    method_miou(results, method)  # clear error when missing
    iou = results["methods"][method]["iou"]
    return pd.Series({k: _nan(v) for k, v in iou.items()}, dtype="float64", name=method)


def per_template_iou(results: Mapping) -> pd.DataFrame:
    """``[template id × class]`` IoU (%) of the single-template classifiers from ``results["per_template"]``."""
    per = results.get("per_template") or {}
    if not per:
        raise KeyError(f"results of {results.get('model')}/{results.get('dataset')}: no 'per_template' entry "
                       "(evaluate with per_template=True)")
    frame = pd.DataFrame({int(t): {k: _nan(v) for k, v in d["iou"].items()} for t, d in per.items()}).T
    return frame.sort_index().astype("float64")


def authors_iou(document: Mapping) -> pd.DataFrame:
    """``[template id × class]`` IoU (%) from the authors' ``iou_per_template_<model>_<dataset>.json``
    (schema ``{"mIoU": {tid: v}, <class>: {tid: v}}``)."""
    classes = {k: v for k, v in document.items() if k != "mIoU"}
    frame = pd.DataFrame({k: {int(t): _nan(x) for t, x in v.items()} for k, v in classes.items()})
    return frame.sort_index().astype("float64")


def ranking_frame(rankings: Mapping, metric: str = "entropy") -> pd.DataFrame:
    """Long frame (class, template_id, value, pixel_percentage, rank, valid) of a rankings document."""
    key = ranking_key(metric)
    rows = [{"class": name, "template_id": int(e["template_id"]), "value": float(e[metric]),
             "pixel_percentage": float(e["pixel_percentage"]), "rank": int(e["rank"]),
             "valid": float(e["pixel_percentage"]) > 0.0}
            for name, d in rankings["classes"].items() for e in d[key]]
    return pd.DataFrame(rows)


def higher_is_better(rankings: Mapping, metric: str) -> bool:
    """Read the metric's direction from the stored order (best first) of a rankings document."""
    frame = ranking_frame(rankings, metric)
    frame = frame[frame.valid].sort_values(["class", "rank"])
    first = frame.groupby("class", sort=False)["value"].first()
    last = frame.groupby("class", sort=False)["value"].last()
    differs = first != last
    if not differs.any():
        return False
    return bool((first[differs] > last[differs]).mean() > 0.5)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN with fewer than 3 pairs or a constant side."""
    frame = pd.DataFrame({"x": x, "y": y}).dropna()
    if len(frame) < 3:
        return math.nan
    rx, ry = frame["x"].rank().to_numpy(), frame["y"].rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def metric_iou_pairs(rankings: Mapping, iou: pd.DataFrame, metric: str = "entropy") -> pd.DataFrame:
    """Per (class, template): the metric value, the true IoU and validity; the data of Figs. 12–15."""
    frame = ranking_frame(rankings, metric)
    # NACLIP's rankings use the class names without spaces (protocol §1.6); results use the dataset's names
    unspaced = {c.replace(" ", ""): c for c in iou.columns}
    frame["class"] = [c if c in iou.columns else unspaced.get(c.replace(" ", ""), c) for c in frame["class"]]
    missing = sorted(set(frame["class"]) - set(iou.columns))
    if missing:
        raise ValueError(f"iou: classes {missing[:5]} of the rankings have no per-template IoU column")
    frame["iou"] = [iou.at[t, c] if t in iou.index else math.nan
                    for c, t in zip(frame["class"], frame["template_id"])]
    return frame


def metric_correlation(rankings: Mapping, iou: pd.DataFrame, metric: str = "entropy") -> pd.DataFrame:
    """Per class: Spearman ρ between the metric and the true per-template IoU over the valid templates, and
    the *oriented* ρ (sign flipped for lower-is-better metrics, so higher always means a better proxy)."""
    pairs = metric_iou_pairs(rankings, iou, metric)
    sign = 1.0 if higher_is_better(rankings, metric) else -1.0
    rows = []
    for name, group in pairs[pairs.valid].groupby("class", sort=False):
        rho = spearman(group["value"], group["iou"])
        rows.append({"class": name, "spearman": rho, "oriented": sign * rho, "valid_templates": len(group)})
    return pd.DataFrame(rows).set_index("class")


def _tensors(iou: pd.DataFrame, baseline: pd.Series, class_names: Sequence[str]):
    iou_t = torch.tensor(iou.reindex(columns=list(class_names)).to_numpy(), dtype=torch.float64)
    base_t = torch.tensor(baseline.reindex(list(class_names)).to_numpy(), dtype=torch.float64)
    return iou_t, base_t


def quality_per_class(experts: Sequence[Sequence[int]], iou: pd.DataFrame, baseline: pd.Series,
                      class_names: Sequence[str]) -> tuple[pd.Series, float]:
    """Eq. 8 per class (%) and its mean (Table 2, Figs. 10–11), via :func:`floss.core.rankings.expert_quality`."""
    iou_t, base_t = _tensors(iou, baseline, class_names)
    quality, mean = expert_quality(experts, iou_t, base_t)
    return pd.Series(quality.numpy(), index=list(class_names), name="rho_hat"), mean


def single_template_summary(iou: pd.DataFrame, baseline: pd.Series) -> pd.DataFrame:
    """Per class (Figs. 1, 6, 8, 9): W_CLIP IoU, best template and its IoU, gain, and how many templates beat
    W_CLIP (the true experts of Eq. 4)."""
    class_names = list(baseline.index)
    iou_t, base_t = _tensors(iou, baseline, class_names)
    experts = true_experts(iou_t, base_t)
    sub = iou.reindex(columns=class_names)
    best_id = sub.fillna(-math.inf).idxmax(axis=0)
    best = sub.max(axis=0)
    return pd.DataFrame({"baseline": baseline.to_numpy(), "best_template": best_id.astype(int).to_numpy(),
                         "best_iou": best.to_numpy(), "gain": (best - baseline).to_numpy(),
                         "true_experts": [len(e) for e in experts]}, index=class_names)


def load_authors_top4(root, model: str, dataset: str) -> dict[str, list[int]] | None:
    """The authors' top-4 experts per class: ``data/authors/top4_experts.json`` (key ``model/dataset``), else
    derived from their rankings file; None when neither exists."""
    top4 = Path(root) / "data/authors/top4_experts.json"
    if top4.is_file():
        doc = read_json(top4)
        if f"{model}/{dataset}" in doc:
            return {k: list(map(int, v)) for k, v in doc[f"{model}/{dataset}"].items()}
    path = rankings_path(root, model, dataset, authors=True)
    if not path.is_file():
        return None
    rankings = read_json(path)
    names = list(rankings["classes"])
    return dict(zip(names, select_experts(rankings, n=4)))


def overlap_table(authors: Mapping[str, Sequence[int]], ours: Mapping[str, Sequence[int]],
                  class_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Per class: the authors' experts, ours, and ``|∩|`` (via :func:`floss.core.rankings.experts_overlap`).

    Class names are matched ignoring spaces (NACLIP spells them without spaces)."""
    def norm(name: str) -> str:
        return name.replace(" ", "").lower()
    theirs = {norm(k): list(v) for k, v in authors.items()}
    names = list(class_names) if class_names is not None else list(ours)
    missing = [n for n in names if norm(n) not in theirs or n not in ours]
    if missing:
        raise ValueError(f"authors/ours: classes {missing[:5]} are missing from one of the expert sets")
    a = [theirs[norm(n)] for n in names]
    b = [list(ours[n]) for n in names]
    return pd.DataFrame({"authors": [" ".join(map(str, x)) for x in a], "ours": [" ".join(map(str, x)) for x in b],
                         "overlap": experts_overlap(a, b)}, index=names)
