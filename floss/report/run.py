"""Execute the report notebooks: papermill's parameter injection, nbclient's execution, in warm kernels.

Each notebook (``notebooks/<name>.py``, jupytext percent) is parameterised exactly as ``papermill -y`` would (an
``injected-parameters`` cell after the ``parameters`` cell) and executed with the repository root as working
directory; the executed notebook lands in ``reports/notebooks/<name>.ipynb``. Why not one papermill call per
notebook: a fresh kernel pays the interpreter start and the imports of torch, pandas and matplotlib again (about
7 s of the 10–15 s a small notebook took on 2 cores). Here ``workers`` kernels are started once and each runs its
share of the notebooks in turn, with the user namespace reset (``%reset -f``) and every figure closed between
two notebooks, so no notebook sees another's variables; imported modules stay warm.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Mapping, Sequence

logger = logging.getLogger(__name__)

__all__ = ["prepare_notebook", "execute_notebooks"]

#: relative cost of each notebook (seconds measured on 2 cores, rounded), to balance the kernels' shares
COST_HINT = {"fig12_entropy_iou": 50, "fig3_low_data": 35, "fig5_oracle": 30, "fig10_expert_quality": 20,
             "fig1_single_templates": 20, "fig4_metrics_topn": 20, "qualitative": 15, "beyond_six_models": 8}
_RESET = "get_ipython().run_line_magic('reset', '-f')\nimport matplotlib.pyplot as _plt\n_plt.close('all')\ndel _plt"


def prepare_notebook(source: Path, parameters: Mapping):
    """The jupytext notebook with papermill's injected-parameters cell (kernel python3)."""
    import jupytext
    from papermill.parameterize import parameterize_notebook

    nb = jupytext.read(source)
    for cell in nb.cells:               # as papermill's loader: every cell has a tags list
        cell.metadata.setdefault("tags", [])
    nb.metadata.setdefault("papermill", {})
    return parameterize_notebook(nb, dict(parameters), kernel_name="python3", language="python")


def _run_group(jobs: list[tuple[str, str, str, dict]], cwd: str, env: dict) -> list[tuple[str, str | None]]:
    """Execute ``(name, source, output, parameters)`` jobs in one kernel; returns (name, error or None)."""
    import nbformat
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    from nbclient.util import run_sync
    from nbformat.v4 import new_code_cell

    km = AsyncKernelManager(kernel_name="python3")
    run_sync(km.start_kernel)(cwd=cwd, env=env)
    outcomes = []
    try:
        for name, source, output, parameters in jobs:
            nb = prepare_notebook(Path(source), parameters)
            nb.cells.insert(0, new_code_cell(_RESET, metadata={"tags": ["floss-reset"]}))
            client = NotebookClient(nb, km=km, timeout=None, kernel_name="python3",
                                    resources={"metadata": {"path": cwd}})
            error, started = None, time.perf_counter()
            try:
                client.execute()
            except CellExecutionError as err:
                error = f"{err.ename}: {err.evalue}"
            finally:
                if client.kc is not None:
                    client.kc.stop_channels()
            nb.cells.pop(0)
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, output)
            outcomes.append((name, error))
            print(f"notebook {name}: {'FAILED: ' + error if error else 'done'} in {time.perf_counter() - started:.1f} s",
                  flush=True)
            if error:
                break          # the rest of this kernel's share would run on a half-finished state
    finally:
        run_sync(km.shutdown_kernel)(now=True)
    return outcomes


def execute_notebooks(jobs: Sequence[tuple[str, Path, Path, Mapping]], *, cwd: Path, workers: int = 2,
                      env: Mapping | None = None) -> dict[str, str | None]:
    """Execute ``(name, source .py, output .ipynb, parameters)`` jobs in ``workers`` warm kernels (processes);
    returns ``{name: error or None}`` (a notebook after a failed one in the same kernel is reported as skipped)."""
    import multiprocessing

    env = dict(os.environ if env is None else env)
    shares: list[list] = [[] for _ in range(max(1, min(workers, len(jobs))))]
    load = [0.0] * len(shares)
    for job in sorted(jobs, key=lambda j: -COST_HINT.get(j[0], 5)):
        i = load.index(min(load))
        shares[i].append((job[0], str(job[1]), str(job[2]), dict(job[3])))
        load[i] += COST_HINT.get(job[0], 5)
    results: dict[str, str | None] = {}
    # spawn: the parent may have run torch (OpenMP threads), which a fork could deadlock on
    with ProcessPoolExecutor(len(shares), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_run_group, share, str(cwd), env) for share in shares if share]
        for future, share in zip(futures, [s for s in shares if s]):
            done = dict(future.result())
            for name, *_ in share:
                results[name] = done.get(name, "skipped: an earlier notebook in the same kernel failed")
    return results
