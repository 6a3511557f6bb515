"""The pipeline DVC runs (dvc.yaml): params.yaml validation, the profile logic and the stage commands.

    python -m floss.pipeline check-params
    python -m floss.pipeline stage extract --model maskclip [--dataset cityscapes --split train]
    python -m floss.pipeline stage rank|evaluate --model maskclip [--dataset cityscapes]
    python -m floss.pipeline stage transfer | metrics | authors
    python -m floss.pipeline notebook fig3_low_data
    python -m floss.pipeline demo          # = make demo: dvc repro of the default (demo) profile

The same subcommands are registered into ``python -m floss`` (floss.cli) when floss.cli lists this module in
its EXTENSIONS; dvc.yaml calls ``python -m floss.pipeline`` because it does not import torch for the light
stages (notebooks, metrics, check-params: importing torch costs ~4 s per stage on 2 cores).

Profiles: ``demo`` writes synthetic caches (floss.synthetic); ``paper`` runs ``floss extract`` on the real
datasets under ``data_root`` (torchrun when ``extract.gpus > 1``). Nothing after extraction knows the profile.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from floss import paths
from floss._io import atomic_write_json
from floss.params import ParamsError, base_model, load_params, validate_params  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

#: notebook -> {papermill parameter: params.yaml key}; dvc.yaml lists exactly these keys per notebook stage
NOTEBOOK_PARAMS: dict[str, dict[str, str]] = {
    "tab1_main_results": {"matrix": "models"},
    "tab2_expert_quality": {"matrix": "models", "per_template": "evaluate.per_template"},
    "tab4_fusion": {"matrix": "models", "evaluated_fusions": "evaluate.fusions"},
    "tab5_backbones": {"matrix": "models"},
    "tab3_transfer": {"matrix": "models", "transfer": "transfer"},
    "fig1_single_templates": {"matrix": "models", "per_template": "evaluate.per_template"},
    "fig6_best_experts": {"matrix": "models", "per_template": "evaluate.per_template"},
    "fig7_improvement": {"matrix": "models"},
    "fig10_expert_quality": {"matrix": "models", "per_template": "evaluate.per_template"},
    "fig12_entropy_iou": {"matrix": "models", "per_template": "evaluate.per_template"},
    "fig3_low_data": {"matrix": "models", "model": "low_data.model", "datasets": "low_data.datasets", "sizes": "low_data.sizes",
                      "seeds": "low_data.seeds", "metric": "evaluate.metric", "n": "evaluate.n_experts"},
    "fig4_metrics_topn": {"matrix": "models", "per_template": "evaluate.per_template", "metrics": "rank.metrics",
                          "ns": "topn", "n": "evaluate.n_experts"},
    "fig5_oracle": {"matrix": "models", "per_template": "evaluate.per_template", "rhos": "oracle.rhos",
                    "seeds": "oracle.seeds", "oracle_ns": "oracle.ns", "n": "evaluate.n_experts"},
    "qualitative": {"matrix": "models", "num_images": "qualitative.num_images", "data_root": "data_root"},
    "authors_vs_ours": {"matrix": "models", "n": "evaluate.n_experts"},
    "beyond_six_models": {"matrix": "models"},
}


def _lookup(params: Mapping, dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        node = node[part]
    return node



def _device(value: str) -> str | None:
    return None if value == "auto" else value


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


# ------------------------------------------------------------------------------------------------ stages
def stage_extract(params: Mapping, model: str, dataset: str | None = None, split: str | None = None) -> None:
    """Write the feature caches of ``model`` (all its (dataset, split) pairs, or the one asked)."""
    todo = _select(_caches_of(params, model), dataset, split)
    if params["profile"] == "demo":
        for d, s in todo:
            _extract_synthetic(params, model, d, s, cache_dir(model, d, s))
    else:
        _extract_real(params, model, todo, dataset, split)


def _extract_synthetic(params: Mapping, model: str, dataset: str, split: str, out: Path) -> None:
    from floss.cache_manifest import CacheError, MANIFEST
    from floss.classes import TRANSFER_DATASETS
    from floss.synthetic import write_synthetic_cache

    syn = params["synthetic"]
    counts = syn["images"]["transfer" if dataset in TRANSFER_DATASETS else dataset]
    manifests = [out / MANIFEST, *out.glob("manifest.rank*.json")] if out.is_dir() else []
    for manifest in (m for m in manifests if m.is_file()):
        # the demo never replaces a real (paper profile) cache at the same path: hours of GPU work
        if json.loads(manifest.read_text()).get("fingerprint", {}).get("source") != "synthetic":
            raise CacheError(f"{out} holds a feature cache of real images ({manifest.name}); the demo profile "
                             "would replace it with synthetic data. Move it away or run the paper profile.")
    write_synthetic_cache(out, model, dataset, split, num_images=counts[split], seed=syn["seed"],
                          feature_dim=syn["feature_dim"], protocol=params["extract"]["protocol"],
                          planted_per_class=syn["planted_per_class"])


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
    from floss.extraction import resolve_precision
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


def _extract_real(params: Mapping, model: str, todo: list[tuple[str, str]], dataset: str | None,
                  split: str | None) -> None:
    """The paper profile: one process (or one torchrun rank per GPU) loads the model once and extracts every
    (dataset, split) of ``todo``; the text embeddings of a dataset are computed once for all its splits."""
    import torch

    from floss import distributed
    from floss.cache import FeatureCache
    from floss.classes import CLASS_NAMES, query_names
    from floss.datasets import open_dataset
    from floss.extraction import cache_fingerprint, extract_split, text_embeddings, write_skipped_report
    from floss.params import dataset_folder
    from floss.provenance import input_identities

    argv = ["stage", "extract", "--model", model] + (["--dataset", dataset] if dataset else []) + \
        (["--split", split] if split else [])
    cmd = torchrun_command(params, argv)
    if cmd is not None:
        logger.info("running %s", shlex.join(cmd))
        subprocess.run(cmd, check=True, cwd=paths.ROOT)
        return
    ex = params["extract"]
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
        text = text_embeddings(net, queries, cache_dir=_text_cache())
        for s in splits:
            ds = open_dataset(d, dataset_folder(params, d), s)
            ids = sorted(ds.ids)
            inputs = input_identities(ds, ids)
            meta = {"model": model, "dataset": d, "split": s, "class_names": list(CLASS_NAMES[d]),
                    "query_names": queries, "query_to_class": q2c, "settings": settings.to_dict()}
            w = ex["weights"][model]
            fingerprint = cache_fingerprint(net, model, d, s, settings, dtype=ex["cache_dtype"],
                                            pretrained=w["pretrained"], checkpoint=load_checkpoint_path(w),
                                            inputs=inputs)
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


def load_checkpoint_path(weights: Mapping) -> str | None:
    return str(paths.from_root(weights["checkpoint"])) if weights["checkpoint"] else None


def rankings_path(model: str, dataset: str) -> Path:
    return paths.ROOT / "results" / "rankings" / model / f"template_rankings_{model}_{dataset}.json"


def stage_rank(params: Mapping, model: str, dataset: str | None = None) -> None:
    """Rank the 80 templates on the train split: rankings JSON (authors' schema, one per metric; entropy keeps the
    authors' file name) and the TemplateStats (results/stats; with per-image records for the ``low_data``
    pairs). From the train caches (demo, ``rank.source: cache``) or straight from the train images."""
    from floss.classes import ranking_keys
    from floss.protocol import rank_cache
    from floss.rankings import save_rankings

    metrics = params["rank"]["metrics"]
    low = params.get("low_data", {})
    datasets = [d for d, _ in _select([(d, "train") for d in params["models"][model]], dataset)]
    if ranks_from_cache(params):
        from floss.cache import FeatureCache
        stats = {}
        for d in datasets:
            cache = FeatureCache(cache_dir(model, d, "train"))
            # per-image records double the cost: only for the pairs of the low-data analysis (Fig. 3)
            track = model == low.get("model") and d in low.get("datasets", ())
            stats[d] = rank_cache(cache, metrics=metrics, track_images=track,
                                  device=_device(params["rank"]["device"]))
    else:
        stats = _rank_from_images(params, model, datasets, dataset)
        if stats is None:        # a torchrun rank other than 0: rank 0 writes the results
            return
    for d, st in stats.items():
        keys = ranking_keys(d, base_model(model))
        skipped = (st.extra or {}).get("skipped")        # ranked from images: how many were left out
        for metric in metrics:
            path = rankings_path(model, d)
            if metric != "entropy":
                path = path.with_name(f"template_rankings_{model}_{d}.{metric}.json")
            rankings = st.rankings(keys, metric=metric, model=model, dataset=d, split="train")
            if skipped is not None:
                rankings["images"], rankings["skipped_images"] = st.num_images, len(skipped)
            save_rankings(rankings, path, metric)
        if skipped is not None:
            from floss.extraction import write_skipped_report
            write_skipped_report(skipped, rankings_path(model, d).with_suffix(".skipped.json"))
        stats_path = paths.ROOT / "results" / "stats" / model / f"{d}.safetensors"
        stats_path.parent.mkdir(parents=True, exist_ok=True)      # DVC deletes outs before the stage runs
        st.save(stats_path)
        logger.info("ranked %s/%s on %d train images", model, d, st.num_images)


def _rank_from_images(params: Mapping, model: str, datasets: list[str], dataset: str | None):
    """Cache-free ranking of ``datasets``' train splits (floss.extraction.rank_images), resumable: each rank keeps
    a checkpoint under ``data/rank_state/<model>/`` (outside DVC's outputs, which DVC deletes before a run)."""
    from floss import distributed
    from floss.classes import query_names
    from floss.datasets import open_dataset
    from floss.extraction import cache_fingerprint, rank_dataset, text_embeddings
    from floss.params import dataset_folder

    cmd = torchrun_command(params, ["stage", "rank", "--model", model] + (["--dataset", dataset] if dataset else []))
    if cmd is not None:            # every rank runs this stage; rank 0 writes the results
        logger.info("running %s", shlex.join(cmd))
        subprocess.run(cmd, check=True, cwd=paths.ROOT)
        return None
    ex, low = params["extract"], params.get("low_data", {})
    ctx = distributed.context()
    device = distributed.device_for(_device(params["rank"]["device"]), ctx)
    net = load_pipeline_model(params, model, device)
    distributed.init_process_group(ctx)
    out = {}
    for d in datasets:
        settings = net.protocol_settings(d, ex["protocol"])
        queries, q2c = query_names(d, base_model(model))
        text = text_embeddings(net, queries, cache_dir=_text_cache())
        ds = open_dataset(d, dataset_folder(params, d), "train", labels=False)
        w = ex["weights"][model]
        fingerprint = {**cache_fingerprint(net, model, d, "train", settings, dtype="none", pretrained=w["pretrained"],
                                           checkpoint=load_checkpoint_path(w)),
                       "metrics": list(params["rank"]["metrics"]), "queries": queries,
                       "on_bad_image": ex["on_bad_image"]}
        track = model == low.get("model") and d in low.get("datasets", ())
        st = rank_dataset(net, ds, settings, text, q2c, ctx=ctx, state_of=lambda r, d=d: _rank_state(model, d, r),
                          fingerprint={**fingerprint, "track_images": track}, metrics=params["rank"]["metrics"],
                          track_images=track, workers=ex["workers"], on_bad_image=ex["on_bad_image"])
        if st is not None:
            out[d] = st
    distributed.shutdown()
    return out if ctx.is_main else None


def _rank_state(model: str, dataset: str, rank: int) -> Path:
    return paths.DATA / "rank_state" / model / f"{dataset}.rank{rank}.safetensors"


def _experts(params: Mapping, model: str, dataset: str) -> list[list[int]]:
    """Top-N experts per class of ``model``'s rankings on ``dataset`` (:func:`floss.rankings.select_experts`, the
    authors' rule for classes with fewer than N valid templates)."""
    from floss.classes import ranking_keys
    from floss.rankings import load_rankings, select_experts

    ev = params["evaluate"]
    path = rankings_path(model, dataset)
    if ev["metric"] != "entropy":
        path = path.with_name(f"template_rankings_{model}_{dataset}.{ev['metric']}.json")
    return select_experts(load_rankings(path), n=ev["n_experts"], metric=ev["metric"],
                          class_names=ranking_keys(dataset, base_model(model)))


def _evaluate_into(params: Mapping, model: str, cache_path: Path, experts, out: Path, per_template: bool) -> None:
    from floss._io import save_results
    from floss.cache import FeatureCache
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
    """Baseline, FLOSS (every fusion) and per-template mIoU on the val caches -> results/eval/<model>/."""
    for d, _ in _select([(d, "val") for d in params["models"][model]], dataset):
        _evaluate_into(params, model, cache_dir(model, d, "val"), _experts(params, model, d),
                       paths.ROOT / "results" / "eval" / model / f"{d}.json", params["evaluate"]["per_template"])


def stage_transfer(params: Mapping, model: str | None = None) -> None:
    """Table 3: the Cityscapes experts of each transfer model on the driving sets -> results/transfer/, plus
    ``results/transfer/index.json`` (what was run; the folder exists even when ``transfer`` is empty)."""
    models = params["transfer"]["models"] if model is None else [model]
    datasets = params["transfer"]["datasets"] if models else []
    for m in models:
        experts = _experts(params, m, "cityscapes")
        for d in datasets:
            _evaluate_into(params, m, cache_dir(m, d, "val"), experts,
                           paths.ROOT / "results" / "transfer" / m / f"{d}.json", per_template=False)
    atomic_write_json(paths.ROOT / "results" / "transfer" / "index.json", {"models": models, "datasets": datasets})


def stage_inputs(params: Mapping) -> Path:
    """``data/inputs.json``: per dataset split the paper profile reads, a digest of its image (and label) files'
    ids, sizes and modification times (:mod:`floss.provenance`). DVC cannot see a dataset outside the repository;
    this always-run stage can, and the stages that read images depend on its output, so an added, deleted or
    replaced image reruns them (and their caches and checkpoints recompute only what changed)."""
    from floss.datasets import open_dataset
    from floss.params import dataset_folder, needed_splits
    from floss.provenance import input_identities, inputs_digest

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
        from floss._io import atomic_write_text
        atomic_write_text(out, text)
    return out


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


def stage_authors(params: Mapping) -> dict:
    """``data/authors``: the authors' files (local folder, else the pinned URL) and ``status.json``; an
    unavailable source is recorded, never an error (floss.authors.obtain_authors)."""
    from floss.authors import obtain_authors

    a = params["authors"]
    local = paths.from_root(a["local"]) if a["local"] else None
    return obtain_authors(paths.DATA / "authors", url=a["url"], local=local, timeout=a["timeout_s"])


def notebook_parameters(params: Mapping, name: str) -> dict:
    """The papermill parameters of notebook ``name``, read from ``params`` (NOTEBOOK_PARAMS)."""
    if name not in NOTEBOOK_PARAMS:
        raise ValueError(f"notebook: expected one of {sorted(NOTEBOOK_PARAMS)}, received {name!r}")
    values = {p: _lookup(params, key) for p, key in NOTEBOOK_PARAMS[name].items()}
    return {p: ("" if v is None else v) for p, v in values.items()}


def notebook_command(params: Mapping, name: str) -> str:
    """The shell equivalent of a notebook stage (for running one by hand): jupytext -> papermill."""
    values = notebook_parameters(params, name)
    source = paths.NOTEBOOKS / f"{name}.py"
    out = paths.REPORTS / "notebooks" / f"{name}.ipynb"
    cmd = (f"jupytext --to ipynb -o - {shlex.quote(str(source))} | papermill - {shlex.quote(str(out))} "
           "-k python3 --log-output --no-progress-bar")
    if values:   # lists cannot go through `-p`: one YAML mapping with -y
        cmd += " -y " + shlex.quote(yaml.safe_dump(values, default_flow_style=True, width=10_000).strip())
    return cmd


def run_notebooks(params: Mapping, names: Sequence[str] | None = None, workers: int = 2) -> None:
    """Execute notebooks (default: all) with their parameters from ``params`` in ``workers`` warm kernels
    (floss.report.run), writing ``reports/notebooks/<name>.ipynb``; raises naming every notebook that failed."""
    from floss.report.run import execute_notebooks

    names = list(names or NOTEBOOK_PARAMS)
    unknown = [n for n in names if n not in NOTEBOOK_PARAMS]
    if unknown:
        raise ValueError(f"notebook: expected names of {sorted(NOTEBOOK_PARAMS)}, received {unknown}")
    for folder in (paths.TABLES, paths.FIGURES, paths.METRICS, paths.REPORTS / "notebooks"):
        folder.mkdir(parents=True, exist_ok=True)     # DVC deletes outs before a stage runs
    env = dict(os.environ)
    if params.get("cpu_threads"):     # the kernels inherit them
        env.update(OMP_NUM_THREADS=str(params["cpu_threads"]), MKL_NUM_THREADS=str(params["cpu_threads"]))
    jobs = [(n, paths.NOTEBOOKS / f"{n}.py", paths.REPORTS / "notebooks" / f"{n}.ipynb", notebook_parameters(params, n))
            for n in names]
    logger.info("executing %d notebooks in %d kernels", len(jobs), min(workers, len(jobs)))
    errors = {n: e for n, e in execute_notebooks(jobs, cwd=paths.ROOT, workers=workers, env=env).items() if e}
    if errors:
        raise RuntimeError("notebooks failed (executed notebooks in reports/notebooks/): "
                           + "; ".join(f"{n}: {e}" for n, e in errors.items()))


def run_notebook(params: Mapping, name: str) -> None:
    """Execute one notebook in a kernel of its own (what ``python -m floss.pipeline notebook <name>`` does)."""
    run_notebooks(params, [name], workers=1)


def run_demo(targets: list[str] | None = None) -> int:
    """`make demo`: dvc repro of the default (demo) profile, then say where the outputs are."""
    dvc = shutil.which("dvc")
    if dvc is None:
        print("floss demo: error: `dvc` is not installed in this environment (pip install 'floss[pipeline]' or "
              "`make setup`); it runs the pipeline of dvc.yaml", file=sys.stderr)
        return 2
    params = load_params()
    if params["profile"] != "demo":
        logger.warning("params.yaml: profile is %r, not 'demo': this runs that profile", params["profile"])
    code = subprocess.run([dvc, "repro", *(targets or [])], cwd=paths.ROOT).returncode
    if code == 0:
        print(f"tables:    {paths.TABLES}/\nfigures:   {paths.FIGURES}/\nmetrics:   {paths.METRICS / 'miou.json'}"
              f"\nnotebooks: {paths.REPORTS / 'notebooks'}/  (executed)\n"
              "compare with git: dvc metrics diff; dvc params diff; dvc plots show")
    return code


# --------------------------------------------------------------------------------------------- command line
_STAGES = ("extract", "rank", "evaluate", "transfer", "metrics", "authors", "inputs")


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by ``python -m floss.pipeline`` and the subcommands registered into floss.cli."""
    parser.add_argument("--params", type=Path, default=None, help="params file (default: <repo>/params.yaml)")


def _configure_stage(p: argparse.ArgumentParser) -> None:
    configure(p)
    p.add_argument("stage", choices=_STAGES)
    p.add_argument("--model", help="model key of the matrix in params.yaml (extract, rank, evaluate, transfer)")
    p.add_argument("--dataset", help="only this dataset of the model (default: all of them)")
    p.add_argument("--split", choices=("train", "val"), help="extract only: only this split")


def _set_threads(params: Mapping) -> None:
    threads = params.get("cpu_threads", 0)
    if threads:
        import torch
        torch.set_num_threads(threads)


def _run_stage(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    if args.stage not in ("metrics", "authors", "inputs"):
        _set_threads(params)
    needs_model = args.stage in ("extract", "rank", "evaluate")
    if needs_model and not args.model:
        raise ValueError(f"stage {args.stage}: --model is required (one of {sorted(params['models'])})")
    if args.model and args.model not in params["models"]:
        raise ValueError(f"--model: expected one of {sorted(params['models'])} (params.yaml models), "
                         f"received {args.model!r}")
    if args.stage == "extract":
        stage_extract(params, args.model, args.dataset, args.split)
    elif args.stage == "rank":
        stage_rank(params, args.model, args.dataset)
    elif args.stage == "evaluate":
        stage_evaluate(params, args.model, args.dataset)
    elif args.stage == "transfer":
        stage_transfer(params, args.model)
    elif args.stage == "metrics":
        print(stage_metrics(params))
    elif args.stage == "inputs":
        print(stage_inputs(params))
    else:
        status = stage_authors(params)
        print(f"authors' data: {'available from ' + status['source'] if status['available'] else 'unavailable'}")
    return 0


def _run_check(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    print(f"params.yaml: OK (profile {params['profile']}, {len(params['models'])} models)")
    return 0


def _configure_notebook(p: argparse.ArgumentParser) -> None:
    configure(p)
    p.add_argument("name", choices=sorted(NOTEBOOK_PARAMS))


def _run_notebook(args: argparse.Namespace) -> int:
    run_notebook(load_params(args.params), args.name)
    return 0


def _configure_notebooks(p: argparse.ArgumentParser) -> None:
    configure(p)
    p.add_argument("names", nargs="*", choices=[[], *sorted(NOTEBOOK_PARAMS)], metavar="NAME",
                   help="notebooks to run (default: all)")
    p.add_argument("--workers", type=int, default=2, help="kernels executing notebooks in parallel")


def _run_notebooks(args: argparse.Namespace) -> int:
    run_notebooks(load_params(args.params), args.names or None, workers=args.workers)
    return 0


def _configure_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("targets", nargs="*", help="dvc repro targets (default: the whole pipeline)")


COMMANDS = {
    "stage": ("run one pipeline stage (what dvc.yaml calls)", _configure_stage, _run_stage),
    "check-params": ("validate params.yaml (every stage does it first)", configure, _run_check),
    "notebook": ("execute one notebook with its parameters from params.yaml", _configure_notebook, _run_notebook),
    "notebooks": ("execute the notebooks (default: all) in warm kernels: the report stage", _configure_notebooks,
                  _run_notebooks),
    "demo": ("dvc repro of the demo profile, then where the tables and figures are",
             _configure_demo, lambda a: run_demo(a.targets)),
}


def register() -> None:
    """Add the pipeline subcommands to ``python -m floss`` (idempotent)."""
    from floss import cli
    for name, (help_text, conf, run) in COMMANDS.items():
        if name not in cli.COMMANDS:
            cli.add_subcommand(name, conf, run, help_text)


register()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m floss.pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, conf, _) in COMMANDS.items():
        conf(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(COMMANDS[args.command][2](args) or 0)
    except (ParamsError, ValueError, KeyError, OSError, subprocess.CalledProcessError, RuntimeError) as err:
        if args.debug:
            raise
        print(f"floss {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
