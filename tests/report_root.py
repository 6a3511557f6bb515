"""Build a tiny artifact root for the report tests: synthetic caches, ranking statistics, rankings, results JSON
(the schema of docs/architecture.md), transfer results and authors-format files — by calling the library
directly (what the rank/evaluate stages do), so the notebook tests do not depend on the CLI or DVC."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from floss import protocol
from floss.data.cache import FeatureCache
from floss.protocol.experiments import cache_path, lenient_experts, stats_path
from floss.core.rankings import save_rankings
from floss.report.analysis import rankings_path, results_path
from floss.data.synthetic import write_synthetic_cache

METRICS = ("entropy", "avgprob", "mano", "iti", "margin", "kurtosis", "spatial", "rank_ensemble")
FUSIONS = ("highest", "average", "default", "average_all")
TRAIN_IMAGES, VAL_IMAGES = 4, 2


def _write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))


def _evaluate(cache: FeatureCache, experts, per_template: bool) -> dict:
    res = protocol.evaluate_cache(cache, experts=experts, fusions=FUSIONS, per_template=per_template,
                                  progress=False)
    res.pop("confusion")
    res["source"] = cache.manifest.get("source", "real")
    return res


def build_root(root: Path, pairs, transfer=(), authors_pair=("clipdinoiser", "cityscapes")) -> dict:
    """Write everything the notebooks read for each (model, dataset) of ``pairs``; returns the experts."""
    experts_of = {}
    for model, dataset in pairs:
        train = FeatureCache(write_synthetic_cache(cache_path(root, model, dataset, "train"), model, dataset,
                                                   "train", num_images=TRAIN_IMAGES))
        val = FeatureCache(write_synthetic_cache(cache_path(root, model, dataset, "val"), model, dataset, "val",
                                                 num_images=VAL_IMAGES))
        stats = protocol.rank_cache(train, metrics=METRICS, track_images=True, progress=False)
        stats_path(root, model, dataset).parent.mkdir(parents=True, exist_ok=True)
        stats.save(stats_path(root, model, dataset))
        rankings = stats.rankings(train.class_names, metric="entropy", model=model, dataset=dataset, split="train")
        rankings["source"] = "synthetic"
        save_rankings(rankings, rankings_path(root, model, dataset))
        experts, _ = lenient_experts(rankings, n=4, class_names=train.class_names)
        experts_of[model, dataset] = experts
        _write_json(results_path(root, model, dataset), _evaluate(val, experts, per_template=True))
    for model, dataset in transfer:
        val = FeatureCache(write_synthetic_cache(cache_path(root, model, dataset, "val"), model, dataset, "val",
                                                 num_images=2))
        _write_json(results_path(root, model, dataset, kind="transfer"),
                    _evaluate(val, experts_of[model, "cityscapes"], per_template=False))
    if authors_pair in experts_of:   # authors-format files (their schema) made from the synthetic run
        model, dataset = authors_pair
        src = rankings_path(root, model, dataset)
        dst = rankings_path(root, model, dataset, authors=True)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        res = json.loads(results_path(root, model, dataset).read_text())
        iou = {"mIoU": {t: d["miou"] for t, d in res["per_template"].items()}}
        for name in res["methods"]["baseline"]["iou"]:
            iou[name] = {t: d["iou"][name] for t, d in res["per_template"].items()}
        _write_json(root / "data/authors" / f"iou_per_template_{model}_{dataset}.json", iou)
        names = list(res["methods"]["baseline"]["iou"])
        _write_json(root / "data/authors/top4_experts.json",
                    {f"{model}/{dataset}": dict(zip(names, experts_of[model, dataset]))})
    return experts_of
