"""The pipeline's result stages: ``stage evaluate`` (baseline, FLOSS and per-template mIoU on the val caches),
``stage transfer`` (Table 3: the Cityscapes experts on the driving sets) and ``stage metrics`` (metrics/miou.json).

May import: the standard library, :mod:`floss.util.paths`, :mod:`floss.util.io`, :mod:`floss.pipeline.params`,
:mod:`floss.pipeline.common`, and (lazily) the cache, protocol, rankings and classes; never :mod:`floss.pipeline`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping

from floss.util import paths
from floss.util.io import atomic_write_json
from floss.models.matrix import base_model
from floss.pipeline.common import _device, _select, cache_dir, rankings_path, run_jobs, stage_workers

logger = logging.getLogger("floss.pipeline")   # the stages log under the pipeline's name (as before the split)


def _experts(params: Mapping, model: str, dataset: str, cache_path: Path | None = None) -> list[list[int]]:
    """Top-N experts per class of ``model``'s rankings on ``dataset`` (:func:`floss.core.rankings.select_experts`, the
    authors' rule for classes with fewer than N valid templates); with ``cache_path``, the rankings must be of the
    template set of that feature cache."""
    from floss.core.classes import ranking_keys
    from floss.core.rankings import check_rankings_templates, load_rankings, select_experts

    ev = params["evaluate"]
    path = rankings_path(model, dataset)
    if ev["metric"] != "entropy":
        path = path.with_name(f"template_rankings_{model}_{dataset}.{ev['metric']}.json")
    rankings = load_rankings(path)
    if cache_path is not None:
        from floss.data.cache import FeatureCache
        check_rankings_templates(rankings, FeatureCache(cache_path).templates, str(path), ev["metric"],
                                 against=f"the templates of the feature cache {cache_path}")
    return select_experts(rankings, n=ev["n_experts"], metric=ev["metric"],
                          class_names=ranking_keys(dataset, base_model(model)))


def _evaluate_into(params: Mapping, model: str, cache_path: Path, experts, out: Path, per_template: bool) -> None:
    from floss.util.io import save_results
    from floss.data.cache import FeatureCache
    from floss.protocol import evaluate_cache

    ev = params["evaluate"]
    cache = FeatureCache(cache_path)
    results = evaluate_cache(cache, experts=experts, fusions=ev["fusions"], per_template=per_template,
                             device=_device(ev["device"]), progress=True)
    confusion = results.pop("confusion")
    results["model"] = model          # the matrix key (naclip_vitl14 caches are NACLIP caches)
    results["source"] = cache.manifest.get("source", "real")
    results["config"].update(n_experts=ev["n_experts"], metric=ev["metric"], profile=params["profile"])
    save_results(results, confusion, out)
    summary = ", ".join(f"{k} {v['miou']}" for k, v in results["methods"].items())
    logger.info("%s/%s: mIoU %s", model, cache.manifest["dataset"], summary)


def stage_evaluate(params: Mapping, model: str, dataset: str | None = None) -> None:
    """Baseline, FLOSS (every fusion) and per-template mIoU on the val caches -> results/eval/<model>/ (one job per
    dataset, spread over :func:`~floss.pipeline.common.stage_workers` processes)."""
    jobs = []
    for d, _ in _select([(d, "val") for d in params["models"][model]], dataset):
        val = cache_dir(model, d, "val")
        jobs.append((params, model, val, _experts(params, model, d, val),
                     paths.ROOT / "results" / "eval" / model / f"{d}.json", params["evaluate"]["per_template"]))
    run_jobs(_evaluate_into, jobs, stage_workers(params, _device(params["evaluate"]["device"])))


def stage_transfer(params: Mapping, model: str | None = None) -> None:
    """Table 3: the Cityscapes experts of each transfer model on the driving sets -> results/transfer/, plus
    ``results/transfer/index.json`` (what was run; the folder exists even when ``transfer`` is empty)."""
    models = params["transfer"]["models"] if model is None else [model]
    datasets = params["transfer"]["datasets"] if models else []
    jobs = []
    for m in models:
        experts = _experts(params, m, "cityscapes")
        jobs += [(params, m, cache_dir(m, d, "val"), experts, paths.ROOT / "results" / "transfer" / m / f"{d}.json",
                  False) for d in datasets]
    run_jobs(_evaluate_into, jobs, stage_workers(params, _device(params["evaluate"]["device"])))
    atomic_write_json(paths.ROOT / "results" / "transfer" / "index.json", {"models": models, "datasets": datasets})


def stage_metrics(params: Mapping) -> Path:
    """metrics/miou.json: {model: {dataset: {"baseline": %, "floss": %}}} for `dvc metrics show/diff`."""
    out: dict[str, dict] = {}
    for kind in ("eval", "transfer"):
        for path in sorted((paths.ROOT / "results" / kind).glob("*/*.json")):
            doc = json.loads(path.read_text())
            entry = {m: doc["methods"][m]["miou"] for m in ("baseline", "floss") if m in doc["methods"]}
            out.setdefault(path.parent.name, {})[path.stem] = {
                k: None if v is None else round(float(v), 2) for k, v in entry.items()}
    if not out:
        raise FileNotFoundError(f"{paths.ROOT / 'results' / 'eval'}: no results JSON (run the evaluate stages)")
    target = paths.METRICS / "miou.json"
    atomic_write_json(target, out)
    return target
