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
# # Fig. 1 (and Figs. 8–9) — single templates vs the averaged classifier
#
# Per class, the val IoU of each of the 80 single-template classifiers W(T_m) (dots, coloured by template id)
# and of the averaged classifier W_CLIP (star). For every class some templates beat W_CLIP: the class-experts.
# Fig. 1 is CLIP-DINOiser on Cityscapes; the appendix figures repeat it per model and dataset.

# %% tags=["parameters"]
root = ""  # repository root; empty means floss.util.paths.ROOT
fig1_model = "clipdinoiser"
fig1_dataset = "cityscapes"
appendix = {"8": "clipdinoiser", "9": "naclip"}  # figure number -> model
appendix_datasets = ["ade20k", "cityscapes", "pascalco59", "pascalvoc20"]
matrix = None  # params.yaml `models`; None: the paper's matrix. A panel whose run is missing says so.
per_template = True  # params.yaml evaluate.per_template (the single-template IoUs these figures plot)

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import floss.util.paths
from floss.report import analysis, paper, plots

ROOT = Path(root) if root else floss.util.paths.ROOT
plots.use_style()
COLORS = plots.template_colors()


def draw(ax, res, title):
    iou = analysis.per_template_iou(res)
    base = analysis.class_iou(res, "baseline")
    x = np.arange(len(base))
    for k, name in enumerate(base.index):
        ax.scatter(np.full(len(iou), k), iou[name], c=COLORS[iou.index % len(COLORS)], s=8, alpha=0.8, linewidths=0)
    ax.scatter(x, base, marker="*", s=90, c="black", label="W_CLIP (80-template average)", zorder=3)
    ax.set_xticks(x, list(base.index), rotation=70, ha="right", fontsize=6 if len(x) > 40 else 8)
    ax.set_ylabel("IoU (%)")
    ax.set_title(title)
    return analysis.single_template_summary(iou, base)


def missing(model, dataset):
    """Why the single-template IoUs of (model, dataset) are unavailable, or None."""
    if not per_template:
        return "Not run: evaluate.per_template is false in params.yaml (the 80 single-template IoUs are not computed)."
    return None if analysis.ran(matrix, model, dataset) else analysis.not_run_message(model, dataset)


# %%
title = f"Single templates vs W_CLIP — {paper.model_label(fig1_model)}, {fig1_dataset}"
summary = None
if missing(fig1_model, fig1_dataset):
    fig = plots.message_figure(title, missing(fig1_model, fig1_dataset))
else:
    res = analysis.load_results(ROOT, fig1_model, fig1_dataset)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(res["methods"]["baseline"]["iou"])), 3.6))
    summary = draw(ax, res, plots.demo_title(title, analysis.provenance(res)))
    ax.legend(loc="upper right")
plots.save_figure(fig, 1, "single_templates", root=ROOT)
summary

# %% [markdown]
# Appendix: the same view for each model and dataset (one panel per dataset).

# %%
for number, model in appendix.items():
    docs = [None if missing(model, d) else analysis.load_results(ROOT, model, d) for d in appendix_datasets]
    fig, axes = plt.subplots(len(docs), 1, figsize=(12, 3.4 * len(docs)), squeeze=False)
    for ax, d, doc in zip(axes[:, 0], appendix_datasets, docs):
        if doc is None:
            ax.axis("off")
            ax.set_title(d)
            ax.text(0.5, 0.5, missing(model, d), ha="center", va="center", wrap=True, transform=ax.transAxes)
        else:
            draw(ax, doc, d)
    fig.suptitle(plots.demo_title(f"Individual templates vs average templates ({paper.model_label(model)})",
                                  analysis.provenance(*docs)))
    plots.save_figure(fig, number, f"single_templates_{model}", root=ROOT)
