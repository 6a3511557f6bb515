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
# # Fig. 3 — effect of the number of images
#
# FLOSS needs only unlabeled train images to rank templates. Here the experts are re-identified from random
# subsets of the train set (several seeds per size; the paper uses 10) by re-aggregating the per-image ranking
# statistics — no feature is recomputed — and evaluated on val. Mean ± std over seeds; the dashed line is W_CLIP.

# %% tags=["parameters"]
root = ""  # repository root; empty means floss.util.paths.ROOT
matrix = {}  # params.yaml `models` (model -> datasets run); empty: the paper's matrix
model = "clipdinoiser"
datasets = ["cityscapes", "pascalvoc20"]
sizes = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000]
seeds = 10
metric = "entropy"
n = 4

# %%
from pathlib import Path

import matplotlib.pyplot as plt

import floss.util.paths
from floss.protocol import experiments
from floss.report import analysis, paper, plots

ROOT = Path(root) if root else floss.util.paths.ROOT
plots.use_style()

# %%
curves, provenance, frame = {}, "", None
fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.2), squeeze=False)
for ax, d in zip(axes[0], datasets):
    if not analysis.ran(matrix or None, model, d):          # a subset of the matrix: this panel was not run
        ax.text(0.5, 0.5, analysis.not_run_message(model, d), ha="center", va="center", wrap=True, fontsize=7,
                transform=ax.transAxes)
        ax.set_axis_off()
        ax.set_title(d)
        continue
    stats = experiments.load_stats(ROOT, model, d)
    train_ids = stats.image_ids        # the per-image records of the rank stage (no train cache needed)
    val = experiments.open_cache(ROOT, model, d, "val")
    frame = experiments.low_data(stats, train_ids, val, val.class_names, sizes, seeds, n=n, metric=metric)
    summary = experiments.summarize(frame, "size")
    curves[d] = summary
    plots.mean_std_line(ax, summary.index, summary["mean"], summary["std"], label=f"{paper.model_label(model)} + FLOSS")
    ax.axhline(frame["baseline"].iloc[0], color=plots.BASELINE_COLOR, linestyle="--", label=paper.model_label(model))
    ax.set_xscale("log")
    ax.set_xlabel("number of train images")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(d)
    ax.legend(loc="lower right")
    provenance = analysis.provenance(val.manifest)
seeds_run = f"{len(frame.seed.unique())} seeds" if frame is not None else "not run"
fig.suptitle(plots.demo_title(f"Effect of the number of images ({seeds_run})", provenance))
plots.save_figure(fig, 3, "low_data", root=ROOT)
curves
