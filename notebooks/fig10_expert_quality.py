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
# # Figs. 10–11 — per-class quality of the estimated experts
#
# ρ̂_k (Eq. 8) of the entropy-selected top-4 experts per class, one panel per dataset; the dashed line is the
# mean over classes (Table 2's value).

# %% tags=["parameters"]
root = ""  # repository root; empty means floss.util.paths.ROOT
figures = {"10": "clipdinoiser", "11": "naclip"}  # figure number -> model
datasets = ["ade20k", "cityscapes", "pascalco59", "pascalvoc20"]
matrix = None  # params.yaml `models`; None: the paper's matrix. A panel whose run is missing says so.
per_template = True  # params.yaml evaluate.per_template (rho_hat needs the single-template IoUs)

# %%
from pathlib import Path

import matplotlib.pyplot as plt

import floss.util.paths
from floss.report import analysis, paper, plots

ROOT = Path(root) if root else floss.util.paths.ROOT
plots.use_style()

# %%
means = {}
for number, model in figures.items():
    docs = {d: analysis.results_or_none(ROOT, matrix, model, d) if per_template else None for d in datasets}
    fig, axes = plt.subplots(len(datasets), 1, figsize=(10, 2.6 * len(datasets)), squeeze=False)
    for ax, (d, res) in zip(axes[:, 0], docs.items()):
        if res is None:
            ax.axis("off")
            ax.set_title(d)
            ax.text(0.5, 0.5, analysis.not_run_message(model, d) if per_template else
                    "Not run: evaluate.per_template is false in params.yaml.", ha="center", va="center", wrap=True,
                    transform=ax.transAxes)
            continue
        base = analysis.class_iou(res, "baseline")
        quality, mean = analysis.quality_per_class(res["experts"], analysis.per_template_iou(res), base, list(base.index))
        means[model, d] = mean
        ax.bar(range(len(quality)), quality.fillna(0), color=plots.FLOSS_COLOR)
        ax.axhline(mean, color="black", linestyle="--", label=f"mean {mean:.0f}%")
        ax.set_xticks(range(len(quality)), list(quality.index), rotation=70, ha="right",
                      fontsize=5 if len(quality) > 40 else 7)
        ax.set_ylim(0, 105)
        ax.set_ylabel("ρ̂ (%)")
        ax.set_title(d)
        ax.legend(loc="upper right")
    fig.suptitle(plots.demo_title(f"Quality of the estimated templates ({paper.model_label(model)})",
                                  analysis.provenance(*docs.values())))
    plots.save_figure(fig, number, f"expert_quality_{model}", root=ROOT)
means
