# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The metric bench — every registered metric measured the same way (Fig. 4(c) generalised)
#
# FLOSS picks the top-N templates of each class by an unsupervised metric (entropy, Eq. 5). Here every metric of
# `rank.metrics` — the paper's four (entropy, average probability, MaNo, ITI), the candidates beyond the paper
# (`margin`, `kurtosis`, `spatial`, `rank_ensemble`; formulas in `floss/core/metrics.py`) and any plug-in metric
# (`rank.metric_plugins`, README "Your own metric") — selects the experts on every (model, dataset) the pipeline ran,
# and is scored by
#
# * **ρ̂** (Eq. 8): the share of its selected experts that are true experts (val IoU above the averaged classifier
#   W_CLIP, Eq. 4), mean over classes, as Table 2 — an unsupervised metric against the oracle's knowledge;
# * **ΔmIoU**: FLOSS with that metric's experts minus the baseline W_CLIP on the val split (the protocol of Table 1,
#   `floss.protocol.experiments.metric_ablation`).
#
# Averages are over the pairs that ran. ρ̂ needs the per-template IoU of the evaluate stage (`per_template`).

# %% tags=["parameters"]
root = ""  # repository root; empty means floss.util.paths.ROOT
metrics = ["entropy", "avgprob", "mano", "iti", "margin", "kurtosis", "spatial", "rank_ensemble"]
n = 4  # experts per class (params.yaml evaluate.n_experts)
matrix = None  # params.yaml `models`; None: the paper's matrix. Pairs without artifacts are shown as "not run".
# the pairs measured: one FLOSS evaluation per metric and pair (about 15 s per pair on 2 CPU cores in the demo), so
# by default the paper's three models on Cityscapes (Fig. 4(c)'s dataset); None = every model / dataset of the matrix
# (set them here in JupyterLab, or inject them with papermill's -p)
models = ["maskclip", "naclip", "clipdinoiser"]
datasets = ["cityscapes"]
metric_plugins = []  # params.yaml rank.metric_plugins: registered before the statistics are read

# %%
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import floss.util.paths
from floss.core.metrics import load_metric_plugins
from floss.protocol import experiments
from floss.report import analysis, paper, plots, tables

ROOT = Path(root) if root else floss.util.paths.ROOT
plots.use_style()
load_metric_plugins(list(metric_plugins or []), "metric_plugins")
LABELS = {**paper.paper_numbers()["fig4c"]["labels"], "rank_ensemble": "Rank ensemble"}


def pair_label(model: str, dataset: str) -> str:
    return f"{paper.model_label(model)} {paper.DATASET_LABELS.get(dataset, dataset)}"


# %%
pairs = [(m, d) for m, ds in (analysis.PAPER_MATRIX if matrix is None else matrix).items() for d in ds
         if (models is None or m in models) and (datasets is None or d in datasets)]
rho = {m: {} for m in metrics}
gain = {m: {} for m in metrics}
not_run, synthetic = set(), False
for model, dataset in pairs:
    col = pair_label(model, dataset)
    try:
        stats = experiments.load_stats(ROOT, model, dataset)
        val = experiments.open_cache(ROOT, model, dataset, "val")
        res = analysis.load_results(ROOT, model, dataset)
    except FileNotFoundError as err:
        print(f"{col}: not run ({err})")
        not_run.add(col)
        continue
    synthetic = synthetic or analysis.provenance(res, val.manifest)
    tracked = [m for m in metrics if m in stats.metrics]
    if len(tracked) < len(metrics):
        print(f"{col}: statistics without {[m for m in metrics if m not in tracked]} (rank.metrics changed?)")
    ablation = experiments.metric_ablation(stats, val, val.class_names, tracked, n=n)
    baseline = analysis.class_iou(res, "baseline")
    try:
        iou = analysis.per_template_iou(res)
    except KeyError:            # evaluated without per_template: no true experts to compare with
        iou = None
    for m in tracked:
        gain[m][col] = ablation.at[m, "miou"] - ablation.at[m, "baseline"]
        rho[m][col] = (math.nan if iou is None else
                       analysis.quality_per_class(ablation.at[m, "experts"], iou, baseline, val.class_names)[1])
ran = [pair_label(m, d) for m, d in pairs if pair_label(m, d) not in not_run]

# %%
columns = [pair_label(m, d) for m, d in pairs] + ["avg"]
rho_frame = tables.frame_from_nested(rho, rows=metrics, columns=columns[:-1])
gain_frame = tables.frame_from_nested(gain, rows=metrics, columns=columns[:-1])
rho_frame["avg"] = rho_frame[ran].mean(axis=1) if ran else math.nan
gain_frame["avg"] = gain_frame[ran].mean(axis=1) if ran else math.nan
table = pd.DataFrame({(c, part): frame[c] for c in columns for part, frame in (("ρ̂", rho_frame),
                                                                               ("ΔmIoU", gain_frame))})
table.index = [LABELS.get(m, m) for m in metrics]
table = tables.mark_not_run(table, {(r, c) for r in table.index for c in not_run})
caption = (f"The metric bench: every metric of rank.metrics selects the top-{n} templates per class; rho_hat = mean "
           "over classes of the share of true experts among them (Eq. 8, %), ΔmIoU = FLOSS with those experts minus "
           "the baseline W_CLIP (mIoU points), per model and dataset and averaged over the pairs that ran "
           "(Fig. 4(c) generalised).")
if not ran:
    caption += (" " + analysis.not_run_message(*pairs[0], "the metric bench")) if pairs else " Nothing ran."
tables.write_table(table, "metric_bench", "M", caption, root=ROOT, synthetic=synthetic, precision=1)
print((ROOT / "tables" / "tabM_metric_bench.md").read_text())

# %%
if ran:   # bars: the average over the pairs that ran; dots: each pair (a legend while they are few)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    x = np.arange(len(metrics))
    offsets = np.linspace(-0.3, 0.3, len(ran)) if len(ran) > 1 else np.zeros(1)
    for ax, frame, ylabel, title in ((axes[0], rho_frame, "ρ̂ (%)", "expert quality vs the oracle"),
                                     (axes[1], gain_frame, "ΔmIoU vs W_CLIP (points)", "gain over the baseline")):
        ax.bar(x, frame["avg"], 0.7, color=plots.FLOSS_COLOR, alpha=0.35, label="average")
        for off, col in zip(offsets, ran):
            ax.plot(x + off, frame[col], "o", markersize=3.5, label=col)
        ax.set_xticks(x, [LABELS.get(m, m) for m in metrics], rotation=30, ha="right")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
    axes[1].axhline(0.0, color=plots.BASELINE_COLOR, linestyle="--", linewidth=1)
    if len(ran) <= 12:
        axes[1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="x-small")
    fig.suptitle(plots.demo_title(f"The metric bench (top-{n} experts per class, {len(ran)} model/dataset pairs)",
                                  synthetic))
    fig.tight_layout()
else:
    fig = plots.message_figure("The metric bench", "Not run: no (model, dataset) of the matrix has statistics, "
                               "a val cache and results (run the pipeline).")
plots.save_figure(fig, "M", "metric_bench", root=ROOT)
