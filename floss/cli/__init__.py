"""Command line: ``python -m floss extract | rank | evaluate | ...`` (``--help`` on each).

    python -m floss extract --model maskclip --dataset cityscapes --split train --data-root data/cityscapes \\
        --out features/maskclip/cityscapes/train
    python -m floss rank --features features/maskclip/cityscapes/train --out rankings.json
    python -m floss evaluate --features features/maskclip/cityscapes/val --rankings rankings.json \\
        --out results/maskclip_cityscapes.json --fusion highest average

``torchrun --nproc_per_node=N -m floss extract ...`` shards the images over N processes (floss.util.distributed).
Logging is configured here and nowhere else. Bad input exits with status 2 and a one-line message naming the
file or value (no traceback; ``--debug`` shows it). Other modules add subcommands with :func:`add_subcommand`.
The arguments, image source and model loading shared by the commands that read images live in
:mod:`floss.cli.inputs` (importable from here as before).

Layer 5, the command line: this package, :mod:`~floss.cli.inputs` (image sources, model loading) and
:mod:`~floss.cli.segment` (own images). May import every layer below (util, core, models, data, protocol); the
pipeline registers its commands here, never the reverse.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from floss.data.cache_manifest import CacheError
from floss.core.classes import match_rankings_classes  # also floss.cli's public name (segment calls it)
from floss.cli.inputs import (ImageSource, _configure_bad_images, _configure_images,  # noqa: F401  (re-exported)
                              _configure_model, _configure_templates, check_weight_file, load_model,
                              load_template_arg)
from floss.util.memory import keep_freed_memory
from floss.util.provenance import floss_version

logger = logging.getLogger("floss.cli")

#: name -> (help, configure(parser), run(args) -> int | None); see :func:`add_subcommand`
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int | None]]] = {}
#: modules imported before parsing so that they can register their own subcommands
EXTENSIONS: list[str] = ["floss.pipeline", "floss.cli.segment"]
#: exceptions that mean bad input or environment: reported in one line, exit status 2
USER_ERRORS = (ValueError, TypeError, KeyError, OSError, CacheError, ImportError)


def add_subcommand(name: str, configure: Callable[[argparse.ArgumentParser], None],
                   run: Callable[[argparse.Namespace], int | None], help: str = "") -> None:
    """Register ``python -m floss <name>``: ``configure`` adds arguments, ``run(args)`` returns an exit status."""
    if name in COMMANDS:
        raise ValueError(f"subcommand {name!r} is already registered")
    COMMANDS[name] = (help, configure, run)




# ------------------------------------------------------------------------------------------------ extract
def _configure_extract(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="maskclip | clipdinoiser | naclip | sclip | clearclip | gem (or a registered model)")
    _configure_images(p)
    p.add_argument("--out", required=True, type=Path, help="feature-cache folder (created; resumed if present)")
    _configure_model(p)
    p.add_argument("--limit", type=int, help="only the first N images (sorted ids)")
    p.add_argument("--protocol", choices=("authors", "paper"), default="authors")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                   help="feature precision on disk: fp32 (exact, default) or fp16 (half the disk; see the README)")
    p.add_argument("--images-per-shard", type=int, default=256)
    _configure_templates(p)
    _configure_bad_images(p)


def run_extract(args: argparse.Namespace) -> int:
    from floss.util import distributed
    from floss.protocol.extraction import cache_fingerprint, extract_split, text_embeddings, write_skipped_report
    from floss.util.provenance import input_identities

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit: expected a positive integer, received {args.limit}")
    ctx = distributed.context()
    templates = load_template_arg(args)                           # a bad file is refused before any model work
    source = ImageSource(args, labels=True, model=args.model)     # checks the layout before any model work
    ds = source.ds
    ids = sorted(ds.ids)[:args.limit] if args.limit else sorted(ds.ids)
    inputs = input_identities(ds, ids)
    device = distributed.device_for(args.device, ctx)
    model = load_model(args, device)
    settings = model.protocol_settings(source.settings_dataset, args.protocol)   # a plug-in model brings its own
    text = text_embeddings(model, source.queries, cache_dir=args.text_cache, templates=templates)
    meta = {"model": args.model, "dataset": source.dataset, "split": ds.split, "class_names": source.class_names,
            "query_names": source.queries, "query_to_class": source.query_to_class, "settings": settings.to_dict(),
            "templates": None if templates.is_default else list(templates)}
    fingerprint = cache_fingerprint(model, args.model, source.dataset, ds.split, settings, dtype=args.dtype,
                                    limit=args.limit, pretrained=args.pretrained, checkpoint=args.checkpoint,
                                    inputs=inputs, templates=templates)
    distributed.init_process_group(ctx)
    mine = distributed.shard(ids, ctx)
    extract_split(model, ds, args.out, ids=mine, inputs=[x for x in inputs if x[0] in set(mine)],
                  on_bad_image=args.on_bad_image, settings=settings, text=text, meta=meta,
                  fingerprint=fingerprint, dtype=torch.float16 if args.dtype == "fp16" else torch.float32,
                  rank=ctx.rank, world_size=ctx.world_size, images_per_shard=args.images_per_shard,
                  workers=args.workers)
    distributed.barrier()
    if ctx.is_main:
        from floss.data.cache import FeatureCache
        cache = FeatureCache(args.out)          # merges the partial manifests if no rank did yet
        logger.info("feature cache %s: %d images, %.2f MiB per image on disk", args.out, len(cache),
                    cache.bytes_per_image() / 2**20)
        write_skipped_report(cache.manifest.get("skipped", []), Path(str(args.out).rstrip("/") + ".skipped.json"))
    distributed.shutdown()
    return 0


# --------------------------------------------------------------------------------------------------- rank
def _configure_rank(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", type=Path, help="source: a feature cache (floss extract), usually a train split")
    p.add_argument("--model", help="source: rank straight from images with this model, no cache (with --dataset "
                                   "and --data-root, or --images and --classes)")
    _configure_images(p, split_default="train")
    _configure_model(p)
    p.add_argument("--protocol", choices=("authors", "paper"), default="authors")
    p.add_argument("--out", required=True, type=Path,
                   help="rankings JSON; with several --metric values it must contain '{metric}'")
    p.add_argument("--metric", nargs="+", default=["entropy"], metavar="METRIC",
                   help="registered metric names (built-ins: entropy avgprob mano iti margin kurtosis spatial "
                        "rank_ensemble; plus those of --metric-plugin)")
    p.add_argument("--metric-plugin", action="append", default=[], metavar="MODULE:FUNCTION",
                   help="import MODULE (on sys.path / PYTHONPATH) and call FUNCTION() to register your own metric "
                        "(README 'Your own metric'); repeatable")
    p.add_argument("--n-experts", type=int, default=4, help="experts per class printed and written beside --out")
    p.add_argument("--stats-out", type=Path, help="also save the TemplateStats (safetensors)")
    p.add_argument("--state", type=Path, help="images: resumable checkpoint folder (default: <out>.state/)")
    p.add_argument("--track-images", action="store_true", help="keep per-image records (for subset analyses)")
    p.add_argument("--template-chunk", type=int, default=8, help="templates classified at once (memory)")
    _configure_templates(p)
    _configure_bad_images(p)


def rankings_keys(cache) -> list[str]:
    """Class keys of the rankings JSON: NACLIP-family files spell names without spaces (protocol §6)."""
    from floss.core.classes import MODELS, ranking_name
    if cache.manifest.get("dataset") == "folder":        # the user's own names, as written in the class file
        return list(cache.class_names)
    from floss.models.matrix import base_model
    model = base_model(str(cache.manifest["model"]))
    return [ranking_name(n, model if model in MODELS else None) for n in cache.class_names]


def run_rank(args: argparse.Namespace) -> int:
    from floss.protocol.extraction import write_skipped_report
    from floss.core.rankings import save_rankings

    from floss.core.metrics import available_metrics, load_metric_plugins, metric_plugin_digest

    load_metric_plugins(args.metric_plugin, "--metric-plugin")
    args.plugin_key = {"metric_plugins": metric_plugin_digest(args.metric_plugin)} if args.metric_plugin else {}
    metrics = list(dict.fromkeys(args.metric))
    unknown = [m for m in metrics if m not in available_metrics()]
    if unknown:
        raise ValueError(f"--metric: unknown metric(s) {unknown}; expected registered names {available_metrics()} "
                         "(your own: --metric-plugin MODULE:FUNCTION)")
    if args.n_experts < 1:
        raise ValueError(f"--n-experts: expected a positive integer, received {args.n_experts}")
    if args.template_chunk < 1:
        raise ValueError(f"--template-chunk: expected a positive integer, received {args.template_chunk}")
    if len(metrics) > 1 and "{metric}" not in str(args.out):
        raise ValueError(f"--out: with several metrics ({metrics}) the path must contain '{{metric}}', "
                         f"received {args.out}")
    if (args.features is None) == (args.model is None):
        raise ValueError("--features/--model: give a feature cache (--features) or a model to run on images "
                         "(--model with --dataset/--data-root or --images/--classes), not both")
    templates = load_template_arg(args)
    if args.features is not None:
        st, keys, meta = _rank_from_cache(args, metrics, templates)
        templates = meta.pop("templates")          # the cache's (checked against --templates when given)
    else:
        done = _rank_from_images(args, metrics, templates)
        if done is None:         # a torchrun rank other than 0
            return 0
        st, keys, meta = done
    skipped = (st.extra or {}).get("skipped") if args.features is None else None
    for metric in metrics:
        rankings = st.rankings(keys, metric=metric, templates=templates, **meta)
        if skipped is not None:      # ranked from images: how many were left out, listed in <out>.skipped.json
            rankings["images"], rankings["skipped_images"] = st.num_images, len(skipped)
        path = Path(str(args.out).replace("{metric}", metric))
        save_rankings(rankings, path, metric=metric)
        logger.info("wrote %s rankings to %s", metric, path)
    if skipped is not None:
        write_skipped_report(skipped, Path(str(args.out).replace("{metric}", "all")).with_suffix(".skipped.json"))
    if args.stats_out:     # keyed by the plug-ins' source too (floss's code digest does not cover them)
        st.save(args.stats_out, extra=args.plugin_key or None)
        logger.info("wrote template statistics to %s", args.stats_out)
    _report_experts(st.rankings(keys, metric=metrics[0], templates=templates, **meta), metrics[0], args.n_experts,
                    Path(str(args.out).replace("{metric}", metrics[0])))
    return 0


def _rank_from_cache(args: argparse.Namespace, metrics: list[str], templates):
    from floss.data.cache import FeatureCache
    from floss.core.classes import rankings_dataset
    from floss.protocol import rank_cache

    cache = FeatureCache(args.features)
    cached = cache.templates
    if args.templates is not None and tuple(cached) != tuple(templates):
        raise ValueError(f"--templates: {args.templates} holds {len(templates)} templates, but the feature cache "
                         f"{args.features} was extracted with {len(cached)} other ones (see {cached.source}); "
                         "expected the same file as `floss extract --templates` (or leave --templates out)")
    st = rank_cache(cache, metrics=metrics, track_images=args.track_images, device=args.device,
                    template_chunk=args.template_chunk)
    m = cache.manifest
    try:
        dataset = rankings_dataset(m["dataset"])
    except ValueError:
        dataset = m["dataset"]
    return st, rankings_keys(cache), {"model": m["model"], "dataset": dataset, "split": m["split"],
                                      "templates": cached}


def _rank_from_images(args: argparse.Namespace, metrics: list[str], templates):
    """Cache-free ranking (floss.protocol.extraction.rank_images): sharded over torchrun ranks, resumable (--state)."""
    from floss.util import distributed
    from floss.protocol.extraction import cache_fingerprint, rank_dataset, text_embeddings

    source = ImageSource(args, labels=False, model=args.model)
    ctx = distributed.context()
    device = distributed.device_for(args.device, ctx)
    model = load_model(args, device)
    settings = model.protocol_settings(source.settings_dataset, args.protocol)
    text = text_embeddings(model, source.queries, cache_dir=args.text_cache, templates=templates)
    state_dir = args.state or Path(str(args.out).replace("{metric}", "all") + ".state")
    fingerprint = {**cache_fingerprint(model, args.model, source.dataset, source.ds.split, settings, dtype="none",
                                       pretrained=args.pretrained, checkpoint=args.checkpoint, templates=templates),
                   "metrics": metrics, "queries": source.queries, "track_images": args.track_images,
                   "on_bad_image": args.on_bad_image, **args.plugin_key}     # a plug-in's edit: recomputed
    distributed.init_process_group(ctx)
    st = rank_dataset(model, source.ds, settings, text, source.query_to_class, ctx=ctx,
                      state_of=lambda r: state_dir / f"rank{r}.safetensors", fingerprint=fingerprint,
                      metrics=metrics, track_images=args.track_images, workers=args.workers,
                      template_chunk=args.template_chunk, on_bad_image=args.on_bad_image)
    distributed.shutdown()
    if st is None:
        return None
    return st, source.keys, {"model": args.model, "dataset": source.dataset, "split": source.ds.split}


def _report_experts(rankings: dict, metric: str, n: int, out: Path) -> None:
    """Log each class's top-n experts (ids and prompts) and write them to ``<out stem>.experts.json``."""
    from floss.util.io import atomic_write_json
    from floss.core.rankings import rankings_templates, select_experts

    names = list(rankings["classes"])
    experts = dict(zip(names, select_experts(rankings, n=n, metric=metric)))
    templates = rankings_templates(rankings, metric)
    path = out.with_name(out.stem + ".experts.json")
    atomic_write_json(path, {"metric": metric, "n": n, "experts": experts})
    for name, ids in experts.items():
        logger.info("%s: %s", name, "; ".join(f"{t} {templates[t].format(name)!r}" for t in ids[:n]))
    logger.info("wrote the top-%d experts per class to %s", n, path)


# ----------------------------------------------------------------------------------------------- evaluate
def _configure_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", required=True, type=Path, help="feature-cache folder (a labelled split)")
    p.add_argument("--out", required=True, type=Path,
                   help="results JSON; the confusion matrices go to <out stem>.confusion.safetensors beside it")
    p.add_argument("--rankings", type=Path, help="rankings JSON (may come from another dataset with the same classes)")
    p.add_argument("--n-experts", type=int, default=4)
    p.add_argument("--metric", default="entropy", help="which ranking of the rankings file selects the experts")
    p.add_argument("--fusion", nargs="+", default=["highest"], choices=("highest", "average", "default", "average_all"))
    p.add_argument("--per-template", action="store_true",
                   help="also evaluate the M single-template classifiers (CLIP's 80, or the cache's template set)")
    p.add_argument("--device")


def run_evaluate(args: argparse.Namespace) -> int:
    from floss.util.io import save_results

    from floss.data.cache import FeatureCache
    from floss.protocol import evaluate_cache
    from floss.core.rankings import check_rankings_templates, load_rankings, select_experts

    cache = FeatureCache(args.features)
    experts = None
    if args.rankings is not None:
        rankings = load_rankings(args.rankings)
        check_rankings_templates(rankings, cache.templates, f"--rankings: {args.rankings}", args.metric,
                                 against=f"the templates of the feature cache {args.features}")
        keys = match_rankings_classes(rankings, cache.class_names, args.rankings)
        experts = select_experts(rankings, n=args.n_experts, metric=args.metric, class_names=keys)
    results = evaluate_cache(cache, experts=experts, fusions=args.fusion, per_template=args.per_template,
                             device=args.device)
    confusion = results.pop("confusion")
    results["config"].update(rankings=str(args.rankings) if args.rankings else None, n_experts=args.n_experts,
                             metric=args.metric, features=str(args.features))
    conf_path = save_results(results, confusion, args.out)
    summary = ", ".join(f"{k} {v['miou']}" for k, v in results["methods"].items())
    logger.info("mIoU (%%): %s; wrote %s and %s", summary, args.out, conf_path)
    return 0


add_subcommand("extract", _configure_extract, run_extract, "dense features of a dataset split -> feature cache")
add_subcommand("rank", _configure_rank, run_rank, "per-template statistics and rankings from a feature cache")
add_subcommand("evaluate", _configure_evaluate, run_evaluate, "baseline / FLOSS / per-template mIoU from a cache")


def build_parser() -> argparse.ArgumentParser:
    for module in EXTENSIONS:
        importlib.import_module(module)
    parser = argparse.ArgumentParser(prog="floss", description="FLOSS: free lunch in open-vocabulary segmentation")
    parser.add_argument("--version", action="version", version=f"floss {floss_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (repeatable), e.g. one that calls floss.models.register_model "
                             "or floss.register_metric for your own model or metric")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, configure, _) in COMMANDS.items():
        configure(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()        # an entry point: glibc keeps freed tensors' memory (floss.util.memory)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, force=True,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"
                        if os.environ.get("WORLD_SIZE", "1") != "1" else "%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = COMMANDS[args.command][2]
    try:
        for module in args.plugin:
            importlib.import_module(module)
        return int(run(args) or 0)
    except USER_ERRORS as err:
        if args.debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"floss {args.command}: error: {message}", file=sys.stderr)
        return 2
