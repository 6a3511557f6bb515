"""The built-in ``spatial`` metric from the statistics blocks' argmax (``argmax_map_sums``) against the general
map-metric path (``map_sums``: every template's whole map upsampled again), side by side in one process on the
demo's train caches (run ``dvc repro`` first): seconds of ``rank_cache`` with the eight metrics of params.yaml,
the ratio, and whether both give the same spatial statistics bit for bit.

    CUDA_VISIBLE_DEVICES= python benchmarks/bench_spatial.py [--caches maskclip/cityscapes naclip/cityscapes]
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

import floss.core.kernels.stats as kernels  # noqa: E402
from floss.data.cache import FeatureCache  # noqa: E402
from floss.pipeline.params import METRICS  # noqa: E402
from floss.protocol import rank_cache  # noqa: E402


def _rank(cache: FeatureCache, general: bool):
    """``rank_cache`` timed; ``general``: the identity check for the built-in spatial fails, so it goes through
    ``map_sums`` like a registered map metric."""
    builtin = kernels.spatial_score
    if general:
        kernels.spatial_score = object()
    try:
        start = time.perf_counter()
        st = rank_cache(cache, metrics=METRICS, progress=False)
        return time.perf_counter() - start, st
    finally:
        kernels.spatial_score = builtin


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--caches", nargs="+", default=["maskclip/cityscapes", "maskclip/ade20k", "naclip/cityscapes"],
                   help="model/dataset train caches under data/features")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.caches:
        path = ROOT / "data" / "features" / name / "train"
        if not (path / "manifest.json").is_file():
            sys.exit(f"{path}: no feature cache (run `dvc repro` for the demo's caches)")
        cache = FeatureCache(path)
        general, a = _rank(cache, general=True)
        argmax, b = _rank(cache, general=False)
        same = torch.equal(a.values("spatial").nan_to_num(), b.values("spatial").nan_to_num())
        print(f"{name}: rank_cache {general:.2f} s with map_sums, {argmax:.2f} s with the blocks' argmax: "
              f"{general / argmax:.2f}x; spatial statistics bit-identical: {same}")


if __name__ == "__main__":
    main()
