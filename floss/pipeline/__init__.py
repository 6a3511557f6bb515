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

Profiles: ``demo`` writes synthetic caches (floss.data.synthetic); ``paper`` runs ``floss extract`` on the real
datasets under ``data_root`` (torchrun when ``extract.gpus > 1``). Nothing after extraction knows the profile.

This module is the command line (and DVC's entry point); the stages live in ``floss.pipeline.features`` (extract,
rank), ``floss.pipeline.evaluate`` (evaluate, transfer, metrics), ``floss.pipeline.inputs`` (inputs, authors) and
``floss.pipeline.notebooks`` (the report), on top of ``floss.pipeline.common``; every name they define is
importable from here as before. May import those modules, the standard library, :mod:`floss.util.paths`,
:mod:`floss.pipeline.params` and (lazily) :mod:`floss.cli` and torch.

Layer 7, the top: the DVC pipeline. May import every layer below, the report (notebook runner) included.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping

from floss.util import paths
from floss.util.memory import keep_freed_memory
from floss.pipeline.params import ParamsError, base_model, load_params, validate_params  # noqa: F401  (re-exported)
from floss.pipeline.common import (_caches_of, _device, _rank_state, _select, _text_cache,  # noqa: F401  (re-exported)
                                   cache_dir, load_checkpoint_path, load_pipeline_model, rankings_path,
                                   ranks_from_cache, torchrun_command)
from floss.pipeline.evaluate import (_evaluate_into, _experts, stage_evaluate, stage_metrics,  # noqa: F401
                                     stage_transfer)
from floss.pipeline.features import (_extract_real, _extract_synthetic, _rank_from_images,  # noqa: F401
                                     stage_extract, stage_rank)
from floss.pipeline.inputs import stage_authors, stage_inputs  # noqa: F401  (re-exported)
from floss.pipeline.notebooks import (NOTEBOOK_PARAMS, _lookup, notebook_command,  # noqa: F401  (re-exported)
                                      notebook_parameters, run_notebook, run_notebooks)

logger = logging.getLogger(__name__)


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


#: the stages that open weights or dataset folders; the others (and the notebooks: the report) read caches and
#: results only, so they neither check the paper profile's weights and folders again (``inputs`` did, first) nor
#: import open_clip to do it — and the report runs on a machine that has the results but not the weights
_STAGES_READING_INPUTS = ("inputs", "extract", "rank")


def _run_stage(args: argparse.Namespace) -> int:
    params = load_params(args.params, check_paths=args.stage in _STAGES_READING_INPUTS)
    if args.stage not in ("metrics", "authors", "inputs"):
        _set_threads(params)
    needs_model = args.stage in ("rank", "evaluate")        # extract without --model: every model
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
    run_notebook(load_params(args.params, check_paths=False), args.name)      # reads results, never weights
    return 0


def _configure_notebooks(p: argparse.ArgumentParser) -> None:
    configure(p)
    p.add_argument("names", nargs="*", choices=[[], *sorted(NOTEBOOK_PARAMS)], metavar="NAME",
                   help="notebooks to run (default: all)")
    p.add_argument("--workers", type=int, default=2, help="kernels executing notebooks in parallel")


def _run_notebooks(args: argparse.Namespace) -> int:
    run_notebooks(load_params(args.params, check_paths=False), args.names or None, workers=args.workers)
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
    keep_freed_memory()        # an entry point: glibc keeps freed tensors' memory (floss.util.memory)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(COMMANDS[args.command][2](args) or 0)
    except (ParamsError, ValueError, KeyError, OSError, subprocess.CalledProcessError, RuntimeError) as err:
        if args.debug:
            raise
        print(f"floss {args.command}: error: {err}", file=sys.stderr)
        return 2
