"""The demo's rank and evaluate work without stage processes: every (model, dataset) job of params.yaml's matrix run
one after the other in this process, on ``--threads`` torch threads, on the demo's caches (run ``dvc repro``
first). Prints each job's seconds and the sums per kind; compare with the stage walls of ``dvc repro`` to see what
the stage processes and workers cost or buy (docs/architecture.md, "Where the demo's time goes"). Writes nothing.

    CUDA_VISIBLE_DEVICES= python benchmarks/bench_demo_jobs.py [--threads 1] [--kinds rank evaluate]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from floss.data.cache import FeatureCache  # noqa: E402
from floss.pipeline.common import cache_dir, tracks_images  # noqa: E402
from floss.pipeline.evaluate import _experts  # noqa: E402
from floss.pipeline.params import load_params  # noqa: E402
from floss.protocol import evaluate_cache, rank_cache  # noqa: E402


def job(params, kind: str, model: str, dataset: str):
    """One demo job as its stage computes it: the rank statistics (TemplateStats) or the evaluation results."""
    if kind == "rank":
        return rank_cache(FeatureCache(cache_dir(model, dataset, "train")), metrics=params["rank"]["metrics"],
                          track_images=tracks_images(params, model, dataset), progress=False)
    val = cache_dir(model, dataset, "val")
    return evaluate_cache(FeatureCache(val), experts=_experts(params, model, dataset, val),
                          fusions=params["evaluate"]["fusions"], per_template=params["evaluate"]["per_template"],
                          progress=False)


def run_job(params, kind: str, model: str, dataset: str) -> float:
    start = time.perf_counter()
    job(params, kind, model, dataset)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kinds", nargs="+", choices=["rank", "evaluate"], default=["rank", "evaluate"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(ROOT / "params.yaml")
    if params["profile"] != "demo":
        sys.exit("params.yaml: profile is not demo (this benchmark reads the demo's caches)")
    for kind in args.kinds:
        times = {}
        for model, datasets in params["models"].items():
            for dataset in datasets:
                cache = cache_dir(model, dataset, "train" if kind == "rank" else "val")
                if not (cache / "manifest.json").is_file():
                    sys.exit(f"{cache}: no feature cache (run `dvc repro` first)")
                times[model, dataset] = run_job(params, kind, model, dataset)
                print(f"{times[model, dataset]:7.2f} s  {kind} {model}/{dataset}", flush=True)
        print(f"{kind}: {len(times)} jobs, {sum(times.values()):.1f} s in all, longest {max(times.values()):.1f} s")


if __name__ == "__main__":
    main()
