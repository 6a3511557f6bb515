"""The pipeline's report stage: the notebooks' papermill parameters from params.yaml (``NOTEBOOK_PARAMS``; dvc.yaml
lists exactly these keys), the shell equivalent of a notebook stage, and running notebooks in warm kernels.

May import: the standard library, yaml, :mod:`floss.util.paths` and (lazily) :mod:`floss.report.run`; never
:mod:`floss.pipeline`.
"""
from __future__ import annotations

import logging
import os
import shlex
from typing import Any, Mapping, Sequence

import yaml

from floss.util import paths

logger = logging.getLogger("floss.pipeline")   # the stages log under the pipeline's name (as before the split)


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
    "metric_bench": {"matrix": "models", "metrics": "rank.metrics", "n": "evaluate.n_experts",
                     "metric_plugins": "rank.metric_plugins"},
}


def _lookup(params: Mapping, dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        node = node[part]
    return node


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
    # the kernels resolve every path from this root, whichever floss they import (a kernel does not put its working
    # directory first on sys.path: with PYTHONPATH or an editable install elsewhere it would write there)
    env = {**os.environ, "FLOSS_ROOT": str(paths.ROOT)}
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
