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
# # Fig. 7 — performance boost with FLOSS
#
# mIoU(+FLOSS) − mIoU(model) per model and dataset, reproduced (bars) and the paper's Table 1 (dots).

# %% tags=["parameters"]
root = ""  # repository root; empty means floss.util.paths.ROOT
models = ["maskclip", "naclip", "clipdinoiser"]
datasets = ["cityscapes", "pascalvoc20", "pascalco59", "ade20k", "cocostuff"]
matrix = None  # params.yaml `models`; None: the paper's matrix. Bars not run are absent (and listed).

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import floss.util.paths
from floss.report import analysis, paper, plots

ROOT = Path(root) if root else floss.util.paths.ROOT
plots.use_style()

# %%
docs = {(m, d): analysis.results_or_none(ROOT, matrix, m, d) for m in models for d in datasets}
gain = {(m, d): analysis.method_miou(r, "floss") - analysis.method_miou(r, "baseline") if r else np.nan
        for (m, d), r in docs.items()}
missing = [f"{paper.model_label(m)}/{paper.dataset_label(d)}" for (m, d), r in docs.items() if r is None]
fig, ax = plt.subplots(figsize=(1.2 * len(datasets) * len(models) / 2 + 3, 3.3))
width = 0.8 / len(models)
x = np.arange(len(datasets))
for i, m in enumerate(models):
    ax.bar(x + i * width, [gain[m, d] for d in datasets], width, label=paper.model_label(m))
    ref = []
    for d in datasets:
        try:
            ref.append(paper.paper_miou(m, d, "floss") - paper.paper_miou(m, d, "baseline"))
        except KeyError:
            ref.append(np.nan)
    ax.scatter(x + i * width, ref, color=plots.PAPER_COLOR, s=14, zorder=3, label="paper" if i == 0 else None)
ax.axhline(0, color="black", linewidth=0.8)
ax.set_xticks(x + width * (len(models) - 1) / 2, [paper.dataset_label(d) for d in datasets])
ax.set_ylabel("Δ mIoU (FLOSS − model)")
ax.legend(fontsize=7, ncol=2)
title = "Performance boost with FLOSS" + (f"\n(not run: {', '.join(missing)})" if missing else "")
ax.set_title(plots.demo_title(title, analysis.provenance(*docs.values())), fontsize=9 if missing else None)
plots.save_figure(fig, 7, "improvement", root=ROOT)
{f"{m}/{d}": round(v, 2) for (m, d), v in gain.items()}
