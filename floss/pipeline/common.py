"""What the pipeline's stages share: where their outputs live (``cache_dir``, ``rankings_path``, the text-embedding
cache and the ranking checkpoints), which (dataset, split) pairs a model's extract stage writes, the torchrun
re-launch and the model of a matrix key with its ``extract.weights`` entry.

May import: the standard library, :mod:`floss.util.paths`, :mod:`floss.pipeline.params`, and (lazily, inside functions, so the
light stages never pay for torch) :mod:`floss.protocol.extraction` and :mod:`floss.models`; never :mod:`floss.pipeline` or
the other ``floss.pipeline_*`` modules (they build on this one).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Mapping, Sequence

from floss.util import paths
from floss.models.matrix import base_model


def _device(value: str) -> str | None:
    return None if value == "auto" else value


def stage_workers(params: Mapping, device: str | None) -> int:
    """Processes a stage spreads its independent jobs (datasets) over: ``cpu_workers`` (0 = the CPU count) on CPU
    when this process runs torch on one thread (``cpu_threads: 1``); otherwise 1: on CUDA one device's kernels are
    the parallelism, and with more threads they already use the cores — and forking a process whose OpenMP pool
    has run can deadlock the children. Every job computes and writes its own files exactly as alone, so the count
    never changes a result."""
    import torch
    on_cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    if on_cuda or torch.get_num_threads() > 1:
        return 1
    return int(params.get("cpu_workers", 0) or 0) or max(1, os.cpu_count() or 1)


def _call(job: tuple) -> None:
    fn, args = job
    fn(*args)


def run_jobs(fn: Callable[..., None], jobs: Sequence[tuple], workers: int) -> None:
    """``fn(*job)`` for every job: in this process when ``workers <= 1`` or one job, else in ``workers`` forked
    processes (they inherit the imported modules, so none pays the imports again). A failing job raises here."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            fn(*job)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)),
                             mp_context=multiprocessing.get_context("fork")) as pool:
        for _ in pool.map(_call, [(fn, tuple(job)) for job in jobs]):
            pass


def tracks_images(params: Mapping, model: str, dataset: str) -> bool:
    """Whether ranking ``model`` on ``dataset`` keeps per-image records (they double the cost): only for the pairs
    of the low-data analysis (Fig. 3, ``low_data`` in params.yaml)."""
    low = params.get("low_data", {})
    return model == low.get("model") and dataset in low.get("datasets", ())


def cache_dir(model: str, dataset: str, split: str) -> Path:
    """``data/features/<model>/<dataset>/<split>`` (PIPELINE.md)."""
    return paths.DATA / "features" / model / dataset / split


def ranks_from_cache(params: Mapping) -> bool:
    """Whether the rank stage reads train feature caches (the demo's synthetic source, or ``rank.source: cache``)
    rather than the train images themselves (the paper profile's default: no train cache is written)."""
    return params["profile"] == "demo" or params["rank"]["source"] == "cache"


def _caches_of(params: Mapping, model: str) -> list[tuple[str, str]]:
    """Every (dataset, split) the extract stage writes for ``model``: val (and train when ranking from caches) of
    its datasets, val of the transfer sets when the model is in ``transfer.models``."""
    splits = ("train", "val") if ranks_from_cache(params) else ("val",)
    out = [(d, s) for d in params["models"][model] for s in splits]
    if model in params["transfer"]["models"]:
        out += [(d, "val") for d in params["transfer"]["datasets"]]
    return out


def _select(items: list, dataset: str | None, split: str | None = None) -> list:
    chosen = [it for it in items if (dataset is None or it[0] == dataset) and (split is None or it[1] == split)]
    if not chosen:
        raise ValueError(f"--dataset/--split: {dataset}/{split} is not in this model's matrix in params.yaml "
                         f"(available: {sorted(set(items))})")
    return chosen


def torchrun_command(params: Mapping, argv: list[str]) -> list[str] | None:
    """``torchrun --standalone --nproc_per_node=gpus -m floss.pipeline <argv>`` when ``extract.gpus > 1`` and this
    process is not already a torchrun rank; else None (run in this process)."""
    gpus = params["extract"]["gpus"]
    if gpus <= 1 or "WORLD_SIZE" in os.environ:
        return None
    return [shutil.which("torchrun") or "torchrun", "--standalone", f"--nproc_per_node={gpus}", "-m",
            "floss.pipeline", *argv]


def load_pipeline_model(params: Mapping, model: str, device):
    """The model of matrix key ``model`` with its ``extract.weights`` entry and ``extract.precision`` on ``device``
    (paths in the entry are relative to the repository root)."""
    from floss.protocol.extraction import resolve_precision
    from floss.models import create_model

    ex = params["extract"]
    w = ex["weights"][model]
    as_path = lambda v: str(paths.from_root(v)) if v and (v.endswith(".json") or os.sep in v or  # noqa: E731
                                                             Path(v).suffix in (".pt", ".pth", ".bin", ".safetensors")) else v
    precision = resolve_precision(base_model(model), ex["precision"], device)
    kwargs = {"precision": precision} if precision != "fp32" else {}
    return create_model(base_model(model), backbone=as_path(w["backbone"]), pretrained=as_path(w["pretrained"]),
                        checkpoint=str(paths.from_root(w["checkpoint"])) if w["checkpoint"] else None, device=device,
                        **kwargs)


def _text_cache() -> Path:
    return paths.DATA / "text"


def load_checkpoint_path(weights: Mapping) -> str | None:
    return str(paths.from_root(weights["checkpoint"])) if weights["checkpoint"] else None


def rankings_path(model: str, dataset: str) -> Path:
    return paths.ROOT / "results" / "rankings" / model / f"template_rankings_{model}_{dataset}.json"


def _rank_state(model: str, dataset: str, rank: int) -> Path:
    return paths.DATA / "rank_state" / model / f"{dataset}.rank{rank}.safetensors"
