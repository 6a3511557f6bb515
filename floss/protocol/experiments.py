"""The paper's analysis experiments on feature caches (the notebooks call these; no algorithm lives only in a
notebook): low-data re-ranking (Fig. 3), metric ablation (Fig. 4c), top-N (Fig. 4d), oracle and ρ-mixed
experts (Fig. 5, Sec. 5.2), the fallback rate (Sec. 4.2) and the qualitative maps.

Every evaluation goes through :func:`floss.protocol.evaluate_cache`, so these numbers come from exactly the
protocol of Table 1. Artifact analyses that need no cache (per-template IoU, ρ̂, correlations, overlaps) are in
:mod:`floss.report.analysis`.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from floss.data.cache import FeatureCache
from floss.core.fusion import SOURCE_FALLBACK, fuse
from floss.protocol import classify, evaluate_cache, merge_queries
from floss.core.rankings import mixed_experts, oracle_experts, select_experts
from floss.core.text import averaged_classifier, expand_experts_to_queries, expert_classifiers

logger = logging.getLogger(__name__)


def cache_path(root, model: str, dataset: str, split: str) -> Path:
    """``<root>/data/features/<model>/<dataset>/<split>`` (PIPELINE.md)."""
    return Path(root) / "data" / "features" / model / dataset / split


def stats_path(root, model: str, dataset: str) -> Path:
    """``<root>/results/stats/<model>/<dataset>.safetensors`` (TemplateStats with per-image records)."""
    return Path(root) / "results" / "stats" / model / f"{dataset}.safetensors"


def open_cache(root, model: str, dataset: str, split: str) -> FeatureCache:
    """The feature cache of ``model`` on ``dataset``/``split``, with an error naming the missing folder."""
    path = cache_path(root, model, dataset, split)
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(f"cache: expected a feature cache at {path} (run the extract stage)")
    return FeatureCache(path)


def load_stats(root, model: str, dataset: str):
    """The ranking statistics saved by the rank stage (all metrics, per-image records)."""
    from floss.core.stats import TemplateStats  # the statistics module is only needed by the re-ranking experiments
    path = stats_path(root, model, dataset)
    if not path.is_file():
        raise FileNotFoundError(f"stats: expected {path} (run the rank stage)")
    return TemplateStats.load(path)


def lenient_experts(rankings: Mapping, n: int = 4, metric: str = "entropy",
                    class_names: Sequence[str] | None = None) -> tuple[list[list[int]], list[str]]:
    """:func:`floss.core.rankings.select_experts` (the authors' rule for classes with fewer than ``n`` valid templates)
    and the names of those classes (the low-data experiment reports how many tiny subsets leave)."""
    from floss.core.rankings import valid_templates

    names = list(class_names) if class_names is not None else list(rankings["classes"])
    short = [name for name, v in zip(names, valid_templates(rankings, metric, class_names)) if len(v) < n]
    return select_experts(rankings, n=n, metric=metric, class_names=class_names), short


def evaluate_experts(val_cache: FeatureCache, experts: Sequence[Sequence[int]], fusion: str = "highest",
                     device=None) -> dict:
    """mIoU (%) of the baseline and of FLOSS with ``experts`` on ``val_cache`` (one evaluation)."""
    res = evaluate_cache(val_cache, experts=[list(e) for e in experts], fusions=(fusion,), device=device,
                         progress=False)
    return {"baseline": res["methods"]["baseline"]["miou"], "floss": res["methods"][f"floss_{fusion}"]["miou"]}


def summarize(frame: pd.DataFrame, by: str, value: str = "miou") -> pd.DataFrame:
    """Mean, std (ddof=0, as numpy) and count of ``value`` per ``by`` (one row per setting)."""
    g = frame.groupby(by, sort=True)[value]
    return pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=0), "count": g.count()})


def low_data(stats, train_ids: Sequence[str], val_cache: FeatureCache, class_names: Sequence[str],
             sizes: Sequence[int], seeds: int | Sequence[int] = 10, n: int = 4, metric: str = "entropy",
             fusion: str = "highest", device=None) -> pd.DataFrame:
    """Fig. 3: for each size and seed, sample ``size`` train images (numpy ``default_rng(seed)``, without
    replacement), re-rank from their per-image records (``stats.subset``), select experts, evaluate on val.

    Sizes larger than the train set are skipped with a warning. Returns one row per (size, seed) with the
    FLOSS mIoU, the baseline mIoU and how many classes had fewer than ``n`` valid templates.
    """
    ids = sorted(map(str, train_ids))
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    rows = []
    usable = [s for s in sizes if 1 <= int(s) <= len(ids)]
    if len(usable) != len(list(sizes)):
        logger.warning("low_data: sizes %s exceed the %d train images or are < 1; skipped",
                       sorted(set(sizes) - set(usable)), len(ids))
    for size in tqdm(usable, desc="low-data sizes", disable=None):
        for seed in seeds:
            rng = np.random.default_rng(seed)
            chosen = [ids[i] for i in sorted(rng.choice(len(ids), size=int(size), replace=False))]
            rankings = stats.subset(chosen).rankings(list(class_names), metric=metric)
            experts, short = lenient_experts(rankings, n=n, metric=metric, class_names=class_names)
            res = evaluate_experts(val_cache, experts, fusion, device)
            rows.append({"size": int(size), "seed": int(seed), "miou": res["floss"], "baseline": res["baseline"],
                         "short_classes": len(short)})
    return pd.DataFrame(rows)


def metric_ablation(stats, val_cache: FeatureCache, class_names: Sequence[str], metrics: Sequence[str],
                    n: int = 4, fusion: str = "highest", device=None) -> pd.DataFrame:
    """Fig. 4(c): experts chosen by each metric (entropy, avgprob, mano, iti or any registered one) -> mIoU.

    Returns one row per metric with the mIoU, the rankings used (column ``rankings``) so the caller can
    correlate each metric with the true per-template IoU (:func:`floss.report.analysis.metric_correlation`) and
    the experts (column ``experts``). Metrics that select the same experts share one evaluation (same numbers).
    """
    rows, done = [], {}
    for metric in metrics:
        rankings = stats.rankings(list(class_names), metric=metric)
        experts, short = lenient_experts(rankings, n=n, metric=metric, class_names=class_names)
        if short:
            logger.warning("metric %s: classes %s have fewer than %d valid templates", metric, short[:5], n)
        key = tuple(tuple(e) for e in experts)
        if key not in done:
            done[key] = evaluate_experts(val_cache, experts, fusion, device)
        res = done[key]
        rows.append({"metric": metric, "miou": res["floss"], "baseline": res["baseline"], "rankings": rankings,
                     "experts": experts})
    return pd.DataFrame(rows).set_index("metric")


def topn_sweep(rankings: Mapping, val_cache: FeatureCache, ns: Sequence[int], metric: str = "entropy",
               fusion: str = "highest", device=None) -> pd.DataFrame:
    """Fig. 4(d): FLOSS mIoU for each number N of experts per class."""
    names = val_cache.class_names
    rows = []
    for n in ns:
        experts, _ = lenient_experts(rankings, n=int(n), metric=metric, class_names=names)
        res = evaluate_experts(val_cache, experts, fusion, device)
        rows.append({"n": int(n), "miou": res["floss"], "baseline": res["baseline"]})
    return pd.DataFrame(rows).set_index("n")


def oracle_sweep(iou: torch.Tensor, val_cache: FeatureCache, ns: Sequence[int] = (1, 2, 3, 4),
                 fusion: str = "highest", device=None) -> pd.DataFrame:
    """Sec. 5.2: FLOSS with the top-N templates per class by true IoU (``iou`` [M, K] %, class order of the
    cache) for each N."""
    rows = []
    for n in ns:
        res = evaluate_experts(val_cache, oracle_experts(iou, n=int(n)), fusion, device)
        rows.append({"n": int(n), "miou": res["floss"], "baseline": res["baseline"]})
    return pd.DataFrame(rows).set_index("n")


def rho_sweep(iou: torch.Tensor, baseline_iou: torch.Tensor, val_cache: FeatureCache, rhos: Sequence[float],
              seeds: int | Sequence[int] = 10, n: int = 4, fusion: str = "highest", device=None) -> pd.DataFrame:
    """Fig. 5: per ρ and seed, ``n`` experts per class of which ``round(ρ·n)`` are true experts (Eq. 4); classes
    short of true experts or non-experts are completed from the other side (``on_shortage="fill"``), and the
    achieved mean quality is reported beside the target ρ."""
    from floss.core.rankings import expert_quality
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    rows = []
    for rho in rhos:
        for seed in seeds:
            experts = mixed_experts(iou, baseline_iou, float(rho), n=n, seed=int(seed), on_shortage="fill")
            _, achieved = expert_quality(experts, iou, baseline_iou)
            res = evaluate_experts(val_cache, experts, fusion, device)
            rows.append({"rho": 100.0 * float(rho), "seed": int(seed), "miou": res["floss"],
                         "baseline": res["baseline"], "achieved_rho": achieved})
    return pd.DataFrame(rows)


def decision_maps(record, cache: FeatureCache, experts: Sequence[Sequence[int]], fusion: str = "highest",
                  out: str = "resized", device=None) -> dict[str, torch.Tensor]:
    """Per-pixel decisions of the baseline and of FLOSS for one cached image, with the deciding source.

    Eq. 7 is applied on the window-averaged maps at ``out`` resolution (``"resized"`` keeps memory at
    Q²·h·w floats; the authors fuse per window, which can differ at window seams). Returns ``baseline`` and
    ``floss`` class maps [H, W], ``source`` (query index of the deciding expert, -1 fallback, -2 averaged),
    ``changed`` (bool) and ``label`` (resized with nearest neighbour when ``out="resized"``).
    """
    settings = cache.settings
    text = cache.text if device is None else cache.text.to(device)
    q2c, num_classes = cache.query_to_class, cache.num_classes
    base_w = averaged_classifier(text, renormalize=True)[None]
    expert_w = expert_classifiers(text, expand_experts_to_queries([list(e) for e in experts], q2c),
                                  renormalize=settings.renormalize_experts)
    fallback_w = averaged_classifier(text, renormalize=settings.renormalize_fallback)[None]
    baseline = merge_queries(classify(record, base_w, settings, out=out, device=device)[0], q2c, num_classes)
    maps = classify(record, torch.cat([expert_w, fallback_w]), settings, out=out, device=device)
    fused, source = fuse(maps[:-1], maps[-1], fusion, return_source=True)
    floss_pred = merge_queries(fused, q2c, num_classes).argmax(dim=0)
    base_pred = baseline.argmax(dim=0)
    label = record.label
    if label is not None and tuple(label.shape) != tuple(base_pred.shape):
        label = torch.nn.functional.interpolate(label[None, None].float(), size=tuple(base_pred.shape),
                                                mode="nearest")[0, 0].to(torch.uint8)
    return {"baseline": base_pred.cpu(), "floss": floss_pred.cpu(), "source": source.cpu(),
            "changed": (base_pred != floss_pred).cpu(), "label": None if label is None else label.cpu()}


def fallback_stats(cache: FeatureCache, experts: Sequence[Sequence[int]], fusion: str = "highest",
                   max_images: int | None = None, device=None) -> dict[str, float]:
    """Sec. 4.2 ("≈2 % of pixels fall back to W_CLIP") and "pixels changed": percentages over the first
    ``max_images`` images (all by default) of ``cache``, measured with :func:`decision_maps`."""
    total = fallback = changed = 0
    count = len(cache) if max_images is None else min(int(max_images), len(cache))
    for i in tqdm(range(count), desc="fallback", disable=None):
        maps = decision_maps(cache[i], cache, experts, fusion, device=device)
        total += maps["source"].numel()
        fallback += int((maps["source"] == SOURCE_FALLBACK).sum())
        changed += int(maps["changed"].sum())
    if total == 0:
        return {"fallback_percent": math.nan, "changed_percent": math.nan, "images": 0}
    return {"fallback_percent": 100.0 * fallback / total, "changed_percent": 100.0 * changed / total,
            "images": count}
