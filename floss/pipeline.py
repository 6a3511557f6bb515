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
from typing import Any, Mapping

import yaml

from floss import paths
from floss._io import atomic_write_json
from floss.params import ParamsError, load_params, validate_params  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

NUM_TEMPLATES = 80

#: notebook -> {papermill parameter: params.yaml key}; dvc.yaml lists exactly these keys per notebook stage
NOTEBOOK_PARAMS: dict[str, dict[str, str]] = {
    "tab1_main_results": {}, "tab2_expert_quality": {}, "tab4_fusion": {}, "tab5_backbones": {},
    "tab3_transfer": {"models": "transfer.models", "transfer_datasets": "transfer.datasets"},
    "fig1_single_templates": {}, "fig6_best_experts": {}, "fig7_improvement": {}, "fig10_expert_quality": {},
    "fig12_entropy_iou": {},
    "fig3_low_data": {"model": "low_data.model", "datasets": "low_data.datasets", "sizes": "low_data.sizes",
                      "seeds": "low_data.seeds", "metric": "evaluate.metric", "n": "evaluate.n_experts"},
    "fig4_metrics_topn": {"metrics": "rank.metrics", "ns": "topn", "n": "evaluate.n_experts"},
    "fig5_oracle": {"rhos": "oracle.rhos", "seeds": "oracle.seeds", "oracle_ns": "oracle.ns",
                    "n": "evaluate.n_experts"},
    "qualitative": {"num_images": "qualitative.num_images", "data_root": "data_root"},
    "authors_vs_ours": {"n": "evaluate.n_experts"},
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


def _caches_of(params: Mapping, model: str) -> list[tuple[str, str]]:
    """Every (dataset, split) the extract stage writes for ``model``: train+val of its datasets, val of the
    transfer sets when the model is in ``transfer.models``."""
    out = [(d, s) for d in params["models"][model] for s in ("train", "val")]
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
    for d, s in _select(_caches_of(params, model), dataset, split):
        out = cache_dir(model, d, s)
        if params["profile"] == "demo":
            _extract_synthetic(params, model, d, s, out)
        else:
            _extract_real(params, model, d, s, out)


def _extract_synthetic(params: Mapping, model: str, dataset: str, split: str, out: Path) -> None:
    from floss.cache import MANIFEST, CacheError
    from floss.classes import TRANSFER_DATASETS
    from floss.synthetic import write_synthetic_cache

    syn = params["synthetic"]
    counts = syn["images"]["transfer" if dataset in TRANSFER_DATASETS else dataset]
    kwargs = dict(num_images=counts[split], seed=syn["seed"], feature_dim=syn["feature_dim"],
                  protocol=params["extract"]["protocol"], planted_per_class=syn["planted_per_class"])
    try:
        write_synthetic_cache(out, model, dataset, split, **kwargs)
    except CacheError:
        manifest = out / MANIFEST
        # a synthetic cache of other parameters is cheap to rebuild; a real cache is never deleted here
        if manifest.is_file() and json.loads(manifest.read_text()).get("source") == "synthetic":
            logger.info("%s: synthetic cache of other parameters; rebuilding it", out)
            shutil.rmtree(out)
            write_synthetic_cache(out, model, dataset, split, **kwargs)
        else:
            raise


def extract_command(params: Mapping, model: str, dataset: str, split: str, out: Path) -> list[str]:
    """The ``floss extract`` command line of the paper profile (torchrun when ``extract.gpus > 1``)."""
    from floss.datasets import get_layout

    ex = params["extract"]
    weights = ex["weights"][model]
    folder = ex["dataset_dirs"].get(dataset) or get_layout(dataset).root_hint
    base_model = "naclip" if model.startswith("naclip") else model
    cmd = ["-m", "floss", "extract", "--model", base_model, "--dataset", dataset, "--split", split,
           "--data-root", str(paths.from_root(params["data_root"]) / folder), "--out", str(out),
           "--protocol", ex["protocol"], "--dtype", ex["dtype"], "--images-per-shard", str(ex["images_per_shard"])]
    for key in ("backbone", "pretrained", "checkpoint"):
        if weights.get(key):
            value = str(paths.from_root(weights[key])) if key == "checkpoint" else str(weights[key])
            cmd += [f"--{key}", value]
    if ex["device"] != "auto":
        cmd += ["--device", ex["device"]]
    if ex["gpus"] > 1:
        return [shutil.which("torchrun") or "torchrun", "--standalone", f"--nproc_per_node={ex['gpus']}"] + cmd
    return [sys.executable] + cmd


def _extract_real(params: Mapping, model: str, dataset: str, split: str, out: Path) -> None:
    cmd = extract_command(params, model, dataset, split, out)
    logger.info("running %s", shlex.join(cmd))
    subprocess.run(cmd, check=True, cwd=paths.ROOT)


def rankings_path(model: str, dataset: str) -> Path:
    return paths.ROOT / "results" / "rankings" / model / f"template_rankings_{model}_{dataset}.json"


def stage_rank(params: Mapping, model: str, dataset: str | None = None) -> None:
    """Rank the 80 templates on the train caches: rankings JSON (authors' schema, one per metric; entropy
    keeps the authors' file name) and the TemplateStats (results/stats; with per-image records for the
    ``low_data`` pairs)."""
    from floss.cache import FeatureCache
    from floss.classes import ranking_keys
    from floss.protocol import rank_cache
    from floss.rankings import save_rankings

    metrics = params["rank"]["metrics"]
    low = params.get("low_data", {})
    for d, _ in _select([(d, "train") for d in params["models"][model]], dataset):
        cache = FeatureCache(cache_dir(model, d, "train"))
        # per-image records double the cost: only for the pairs of the low-data analysis (Fig. 3)
        track = model == low.get("model") and d in low.get("datasets", ())
        st = rank_cache(cache, metrics=metrics, track_images=track, device=_device(params["rank"]["device"]))
        keys = ranking_keys(d, "naclip" if model.startswith("naclip") else model)
        for metric in metrics:
            path = rankings_path(model, d)
            if metric != "entropy":
                path = path.with_name(f"template_rankings_{model}_{d}.{metric}.json")
            save_rankings(st.rankings(keys, metric=metric, model=model, dataset=d, split="train"), path, metric)
        stats_path = paths.ROOT / "results" / "stats" / model / f"{d}.safetensors"
        stats_path.parent.mkdir(parents=True, exist_ok=True)      # DVC deletes outs before the stage runs
        st.save(stats_path)
        logger.info("ranked %s/%s on %d train images", model, d, len(cache))


def _experts(params: Mapping, model: str, dataset: str) -> list[list[int]]:
    """Top-N experts per class as the authors' code selects them (protocol §1.5, §3.8): the first N templates
    with ``pixel_percentage > 0``; a class with fewer keeps those, and one with none uses all 80 templates
    (their MaskCLIP/CLIP-DINOiser rule). Tiny train sets (the demo's ADE20K) reach these cases; each is logged."""
    from floss.classes import ranking_keys
    from floss.rankings import load_rankings, ranking_key, validate_rankings

    ev = params["evaluate"]
    n, metric = ev["n_experts"], ev["metric"]
    path = rankings_path(model, dataset)
    if metric != "entropy":
        path = path.with_name(f"template_rankings_{model}_{dataset}.{metric}.json")
    keys = ranking_keys(dataset, "naclip" if model.startswith("naclip") else model)
    rankings = load_rankings(path)
    validate_rankings(rankings, class_names=keys, metric=metric)
    experts, short = [], []
    for name in keys:
        valid = [it["template_id"] for it in rankings["classes"][name][ranking_key(metric)]
                 if it["pixel_percentage"] > 0.0]
        if len(valid) < n:
            short.append(f"{name} ({len(valid)})")
        experts.append(valid[:n] if valid else list(range(NUM_TEMPLATES)))
    if short:
        logger.warning("%s/%s: %d classes have fewer than %d valid templates (no valid one: all %d templates): %s",
                       model, dataset, len(short), n, NUM_TEMPLATES, ", ".join(short[:10]))
    return experts


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
    """Table 3: the Cityscapes experts of each transfer model on the driving sets -> results/transfer/."""
    models = params["transfer"]["models"] if model is None else [model]
    for m in models:
        experts = _experts(params, m, "cityscapes")
        for d in params["transfer"]["datasets"]:
            _evaluate_into(params, m, cache_dir(m, d, "val"), experts,
                           paths.ROOT / "results" / "transfer" / m / f"{d}.json", per_template=False)


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


def stage_authors(params: Mapping) -> Path:
    from floss.authors import fetch_authors

    a = params["authors"]
    local = paths.from_root(a["local"]) if a["local"] else None
    return fetch_authors(paths.DATA / "authors", url=a["url"], local=local, timeout=a["timeout_s"])


def notebook_command(params: Mapping, name: str) -> str:
    """The shell pipeline of a notebook stage: jupytext -> papermill with the notebook's parameters."""
    if name not in NOTEBOOK_PARAMS:
        raise ValueError(f"notebook: expected one of {sorted(NOTEBOOK_PARAMS)}, received {name!r}")
    values = {p: _lookup(params, key) for p, key in NOTEBOOK_PARAMS[name].items()}
    values = {p: ("" if v is None else v) for p, v in values.items()}
    source = paths.NOTEBOOKS / f"{name}.py"
    out = paths.REPORTS / "notebooks" / f"{name}.ipynb"
    cmd = (f"jupytext --to ipynb -o - {shlex.quote(str(source))} | papermill - {shlex.quote(str(out))} "
           "-k python3 --log-output --no-progress-bar")
    if values:   # lists cannot go through `-p`: one YAML mapping with -y
        cmd += " -y " + shlex.quote(yaml.safe_dump(values, default_flow_style=True, width=10_000).strip())
    return cmd


def run_notebook(params: Mapping, name: str) -> None:
    cmd = notebook_command(params, name)
    (paths.REPORTS / "notebooks").mkdir(parents=True, exist_ok=True)
    for folder in (paths.TABLES, paths.FIGURES, paths.METRICS):
        folder.mkdir(parents=True, exist_ok=True)     # DVC deletes outs before a stage runs
    env = dict(os.environ)
    if params.get("cpu_threads"):
        env.update(OMP_NUM_THREADS=str(params["cpu_threads"]), MKL_NUM_THREADS=str(params["cpu_threads"]))
    logger.info("running %s", cmd)
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True, cwd=paths.ROOT, env=env)


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
_STAGES = ("extract", "rank", "evaluate", "transfer", "metrics", "authors")


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
    if args.stage not in ("metrics", "authors"):
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
    else:
        print(stage_authors(params))
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


def _configure_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("targets", nargs="*", help="dvc repro targets (default: the whole pipeline)")


COMMANDS = {
    "stage": ("run one pipeline stage (what dvc.yaml calls)", _configure_stage, _run_stage),
    "check-params": ("validate params.yaml (every stage does it first)", configure, _run_check),
    "notebook": ("execute one notebook with its parameters from params.yaml", _configure_notebook, _run_notebook),
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
    except (ParamsError, ValueError, KeyError, OSError, subprocess.CalledProcessError) as err:
        if args.debug:
            raise
        print(f"floss {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
