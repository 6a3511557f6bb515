"""The pipeline's feature stages: ``stage extract`` (feature caches: synthetic in the demo profile, the real models
and datasets in the paper profile, torchrun when ``extract.gpus > 1``) and ``stage rank`` (the M templates ranked
on the train split, from caches or straight from the images). The template set is the ``templates`` parameter
(null: CLIP's 80; else a template file), :func:`floss.pipeline.params.pipeline_templates`.

May import: the standard library, :mod:`floss.util.paths`, :mod:`floss.pipeline.params`, :mod:`floss.pipeline.common`, and
(lazily, inside the functions) the computing modules (cache, extraction, protocol, rankings, datasets, classes,
synthetic, distributed, provenance); never :mod:`floss.pipeline` (the command line builds on this module).
"""
from __future__ import annotations

import json
import logging
import shlex
import subprocess
from pathlib import Path
from typing import Mapping

from floss.util import paths
from floss.models.matrix import base_model
from floss.pipeline.common import (_caches_of, _device, _rank_state, _select, _text_cache, cache_dir,
                                   load_checkpoint_path, load_pipeline_model, rankings_path, ranks_from_cache,
                                   run_jobs, stage_workers, torchrun_command, tracks_images)

logger = logging.getLogger("floss.pipeline")   # the stages log under the pipeline's name (as before the split)


def stage_extract(params: Mapping, model: str | None = None, dataset: str | None = None,
                  split: str | None = None) -> None:
    """Write the feature caches of ``model`` (all its (dataset, split) pairs, or the one asked), or of every model
    of the matrix (``model=None``: DVC's one extract stage). A complete cache with the same fingerprint (code,
    weights, inputs, settings) is kept, so a rerun only writes what changed. On CPU the jobs (demo: one per cache;
    paper: one per model, which loads its model once) are spread over :func:`stage_workers` processes."""
    models = list(params["models"]) if model is None else [model]
    if params["profile"] == "demo":
        jobs = [(params, m, d, s, cache_dir(m, d, s)) for m in models
                for d, s in _select(_caches_of(params, m), dataset, split)]
        run_jobs(_extract_synthetic, jobs, stage_workers(params, "cpu"))
        return
    jobs = [(params, m, _select(_caches_of(params, m), dataset, split), dataset, split) for m in models]
    workers = 1 if params["extract"]["gpus"] > 1 else stage_workers(params, _device(params["extract"]["device"]))
    run_jobs(_extract_real, jobs, workers)


def _extract_synthetic(params: Mapping, model: str, dataset: str, split: str, out: Path) -> None:
    from floss.data.cache_manifest import CacheError, MANIFEST
    from floss.core.classes import TRANSFER_DATASETS
    from floss.data.synthetic import write_synthetic_cache

    syn = params["synthetic"]
    counts = syn["images"]["transfer" if dataset in TRANSFER_DATASETS else dataset]
    manifests = [out / MANIFEST, *out.glob("manifest.rank*.json")] if out.is_dir() else []
    for manifest in (m for m in manifests if m.is_file()):
        # the demo never replaces a real (paper profile) cache at the same path: hours of GPU work
        if json.loads(manifest.read_text()).get("fingerprint", {}).get("source") != "synthetic":
            raise CacheError(f"{out} holds a feature cache of real images ({manifest.name}); the demo profile "
                             "would replace it with synthetic data. Move it away or run the paper profile.")
    from floss.pipeline.params import pipeline_templates
    write_synthetic_cache(out, model, dataset, split, num_images=counts[split], seed=syn["seed"],
                          feature_dim=syn["feature_dim"], protocol=params["extract"]["protocol"],
                          planted_per_class=syn["planted_per_class"], templates=pipeline_templates(params))


def _extract_real(params: Mapping, model: str, todo: list[tuple[str, str]], dataset: str | None,
                  split: str | None) -> None:
    """The paper profile: one process (or one torchrun rank per GPU) loads the model once and extracts every
    (dataset, split) of ``todo``; the text embeddings of a dataset are computed once for all its splits."""
    import torch

    from floss.util import distributed
    from floss.data.cache import FeatureCache
    from floss.core.classes import CLASS_NAMES, query_names
    from floss.data.datasets import open_dataset
    from floss.protocol.extraction import cache_fingerprint, extract_split, text_embeddings, write_skipped_report
    from floss.pipeline.params import dataset_folder, pipeline_templates
    from floss.util.provenance import input_identities

    argv = ["stage", "extract", "--model", model] + (["--dataset", dataset] if dataset else []) + \
        (["--split", split] if split else [])
    cmd = torchrun_command(params, argv)
    if cmd is not None:
        logger.info("running %s", shlex.join(cmd))
        subprocess.run(cmd, check=True, cwd=paths.ROOT)
        return
    ex = params["extract"]
    templates = pipeline_templates(params)
    ctx = distributed.context()
    device = distributed.device_for(_device(ex["device"]), ctx)
    net = load_pipeline_model(params, model, device)
    distributed.init_process_group(ctx)
    by_dataset: dict[str, list[str]] = {}
    for d, s in todo:
        by_dataset.setdefault(d, []).append(s)
    for d, splits in by_dataset.items():
        settings = net.protocol_settings(d, ex["protocol"])
        queries, q2c = query_names(d, base_model(model))
        text = text_embeddings(net, queries, cache_dir=_text_cache(), templates=templates)
        for s in splits:
            ds = open_dataset(d, dataset_folder(params, d), s)
            ids = sorted(ds.ids)
            inputs = input_identities(ds, ids)
            meta = {"model": model, "dataset": d, "split": s, "class_names": list(CLASS_NAMES[d]),
                    "query_names": queries, "query_to_class": q2c, "settings": settings.to_dict(),
                    "templates": None if templates.is_default else list(templates)}
            w = ex["weights"][model]
            fingerprint = cache_fingerprint(net, model, d, s, settings, dtype=ex["cache_dtype"],
                                            pretrained=w["pretrained"], checkpoint=load_checkpoint_path(w),
                                            inputs=inputs, templates=templates)
            out = cache_dir(model, d, s)
            mine = set(distributed.shard(ids, ctx))
            extract_split(net, ds, out, ids=[i for i in ids if i in mine], inputs=[x for x in inputs if x[0] in mine],
                          on_bad_image=ex["on_bad_image"], settings=settings, text=text,
                          meta=meta, fingerprint=fingerprint, rank=ctx.rank, world_size=ctx.world_size,
                          dtype=torch.float16 if ex["cache_dtype"] == "fp16" else torch.float32,
                          images_per_shard=ex["images_per_shard"], workers=ex["workers"])
            distributed.barrier()
            if ctx.is_main:
                skipped = FeatureCache(out).manifest.get("skipped", [])     # merges the ranks' partial manifests
                write_skipped_report(skipped, out.with_name(out.name + ".skipped.json"))
    distributed.shutdown()


def stage_rank(params: Mapping, model: str, dataset: str | None = None) -> None:
    """Rank the M templates on the train split: rankings JSON (authors' schema, one per metric; entropy keeps the
    authors' file name) and the TemplateStats (results/stats; with per-image records for the ``low_data``
    pairs). From the train caches (demo, ``rank.source: cache``; one job per dataset, spread over
    :func:`~floss.pipeline.common.stage_workers` processes) or straight from the train images."""
    from floss.pipeline.params import metric_plugin_names, pipeline_templates

    metric_plugin_names(params)          # the user's metrics registered before the workers fork
    datasets = [d for d, _ in _select([(d, "train") for d in params["models"][model]], dataset)]
    if ranks_from_cache(params):
        run_jobs(_rank_cache_into, [(params, model, d) for d in datasets],
                 stage_workers(params, _device(params["rank"]["device"])))
        return
    stats = _rank_from_images(params, model, datasets, dataset)
    if stats is None:        # a torchrun rank other than 0: rank 0 writes the results
        return
    for d, st in stats.items():
        _write_ranking(params, model, d, st, pipeline_templates(params))


def _rank_cache_into(params: Mapping, model: str, dataset: str) -> None:
    from floss.data.cache import FeatureCache
    from floss.pipeline.params import metric_plugin_names
    from floss.protocol import rank_cache

    metric_plugin_names(params)          # loaded once per process (a no-op when already registered)
    cache = FeatureCache(cache_dir(model, dataset, "train"))
    st = rank_cache(cache, metrics=params["rank"]["metrics"], track_images=tracks_images(params, model, dataset),
                    device=_device(params["rank"]["device"]))
    _write_ranking(params, model, dataset, st, cache.templates)     # the texts of the cache's text embeddings


def _write_ranking(params: Mapping, model: str, d: str, st, templates) -> None:
    """The rankings JSON of every metric (recording ``templates`` unless CLIP's 80) and the statistics of
    ``model`` on dataset ``d``."""
    from floss.core.classes import ranking_keys
    from floss.core.rankings import save_rankings

    keys = ranking_keys(d, base_model(model))
    skipped = (st.extra or {}).get("skipped")        # ranked from images: how many were left out
    for metric in params["rank"]["metrics"]:
        path = rankings_path(model, d)
        if metric != "entropy":
            path = path.with_name(f"template_rankings_{model}_{d}.{metric}.json")
        rankings = st.rankings(keys, metric=metric, model=model, dataset=d, split="train", templates=templates)
        if skipped is not None:
            rankings["images"], rankings["skipped_images"] = st.num_images, len(skipped)
        save_rankings(rankings, path, metric)
    if skipped is not None:
        from floss.protocol.extraction import write_skipped_report
        write_skipped_report(skipped, rankings_path(model, d).with_suffix(".skipped.json"))
    stats_path = paths.ROOT / "results" / "stats" / model / f"{d}.safetensors"
    stats_path.parent.mkdir(parents=True, exist_ok=True)      # DVC deletes outs before the stage runs
    from floss.pipeline.params import metric_plugin_key
    key = metric_plugin_key(params)     # the plug-ins' source digests (none: the file as before)
    st.save(stats_path, extra=key or None)
    logger.info("ranked %s/%s on %d train images", model, d, st.num_images)


def _rank_from_images(params: Mapping, model: str, datasets: list[str], dataset: str | None):
    """Cache-free ranking of ``datasets``' train splits (floss.protocol.extraction.rank_images), resumable: each rank keeps
    a checkpoint under ``data/rank_state/<model>/`` (outside DVC's outputs, which DVC deletes before a run)."""
    from floss.util import distributed
    from floss.core.classes import query_names
    from floss.data.datasets import open_dataset
    from floss.protocol.extraction import cache_fingerprint, rank_dataset, text_embeddings
    from floss.pipeline.params import dataset_folder, metric_plugin_key, pipeline_templates

    cmd = torchrun_command(params, ["stage", "rank", "--model", model] + (["--dataset", dataset] if dataset else []))
    if cmd is not None:            # every rank runs this stage; rank 0 writes the results
        logger.info("running %s", shlex.join(cmd))
        subprocess.run(cmd, check=True, cwd=paths.ROOT)
        return None
    ex = params["extract"]
    templates = pipeline_templates(params)
    ctx = distributed.context()
    device = distributed.device_for(_device(params["rank"]["device"]), ctx)
    net = load_pipeline_model(params, model, device)
    distributed.init_process_group(ctx)
    out = {}
    for d in datasets:
        settings = net.protocol_settings(d, ex["protocol"])
        queries, q2c = query_names(d, base_model(model))
        text = text_embeddings(net, queries, cache_dir=_text_cache(), templates=templates)
        ds = open_dataset(d, dataset_folder(params, d), "train", labels=False)
        w = ex["weights"][model]
        fingerprint = {**cache_fingerprint(net, model, d, "train", settings, dtype="none", pretrained=w["pretrained"],
                                           checkpoint=load_checkpoint_path(w), templates=templates),
                       "metrics": list(params["rank"]["metrics"]), "queries": queries,
                       "on_bad_image": ex["on_bad_image"], **metric_plugin_key(params)}
        track = tracks_images(params, model, d)
        st = rank_dataset(net, ds, settings, text, q2c, ctx=ctx, state_of=lambda r, d=d: _rank_state(model, d, r),
                          fingerprint={**fingerprint, "track_images": track}, metrics=params["rank"]["metrics"],
                          track_images=track, workers=ex["workers"], on_bad_image=ex["on_bad_image"])
        if st is not None:
            out[d] = st
    distributed.shutdown()
    return out if ctx.is_main else None
