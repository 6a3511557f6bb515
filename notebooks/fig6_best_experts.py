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
# # Fig. 6 — performance of the best class-experts
#
# Per class, the IoU gain (percentage points) of the best single template (chosen with labels) over the
# averaged classifier W_CLIP: how much room better expert identification could still win (paper: more than
# 30 points on Cityscapes' sky for CLIP-DINOiser).

# %% tags=["parameters"]
root = ""  # repository root; empty means floss.util.paths.ROOT
models = ["clipdinoiser", "maskclip", "naclip"]
dataset = "cityscapes"
matrix = None  # params.yaml `models`; None: the paper's matrix. A panel whose run is missing says so.
per_template = True  # params.yaml evaluate.per_template

# %%
from pathlib import Path

import matplotlib.pyplot as plt

import floss.util.paths
from floss.report import analysis, paper, plots

ROOT = Path(root) if root else floss.util.paths.ROOT
plots.use_style()

# %%
docs = {m: analysis.results_or_none(ROOT, matrix, m, dataset) if per_template else None for m in models}
fig, axes = plt.subplots(len(models), 1, figsize=(9, 2.6 * len(models)), squeeze=False)
summaries = {}
for ax, (m, res) in zip(axes[:, 0], docs.items()):
    if res is None:
        ax.axis("off")
        ax.set_title(paper.model_label(m))
        ax.text(0.5, 0.5, analysis.not_run_message(m, dataset) if per_template else
                "Not run: evaluate.per_template is false in params.yaml.", ha="center", va="center", wrap=True,
                transform=ax.transAxes)
        continue
    s = analysis.single_template_summary(analysis.per_template_iou(res), analysis.class_iou(res, "baseline"))
    summaries[m] = s
    plots.bar_gains(ax, list(s.index), s["gain"])
    ax.set_title(paper.model_label(m))
fig.suptitle(plots.demo_title(f"Best class-expert vs W_CLIP — {dataset}", analysis.provenance(*docs.values())))
plots.save_figure(fig, 6, "best_experts", root=ROOT)
{m: s["gain"].round(2).to_dict() for m, s in summaries.items()}
