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
# # Fig. 4 — ablation of the experts: selection metric (4c) and number of experts N (4d)
#
# (c) Entropy replaced by other unsupervised metrics (average probability, MaNo, ITI, and any metric registered
# with `floss.core.stats.register_metric`) to pick the top-N templates per class. Besides the mIoU, each metric's
# quality as a proxy is measured directly: the Spearman correlation, per class, between the metric and the
# true per-template IoU (oriented so that higher = better proxy), averaged over classes.
# (d) FLOSS with N = 1, 2, ... experts per class.

# %% tags=["parameters"]
root = ""  # repository root; empty means floss.util.paths.ROOT
model = "clipdinoiser"
dataset = "cityscapes"
metrics = ["avgprob", "mano", "iti", "entropy"]
ns = [1, 2, 3, 4, 5, 6, 8, 10, 15, 20]
n = 4
matrix = None  # params.yaml `models`; None: the paper's matrix. Without the (model, dataset) run, both outputs say so.
per_template = True  # params.yaml evaluate.per_template (the Spearman column needs the single-template IoUs)

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

import floss.util.paths
from floss.protocol import experiments
from floss.report import analysis, paper, plots, tables

ROOT = Path(root) if root else floss.util.paths.ROOT
plots.use_style()

# %%
run = analysis.ran(matrix, model, dataset)
if not run:
    reason = analysis.not_run_message(model, dataset, "the metric ablation and the top-N sweep")
    fig4c = paper.paper_numbers()["fig4c"]
    reference = tables.frame_from_nested({m: {"miou": v} for m, v in fig4c["miou"].items()})
    table = tables.compare(tables.frame_from_nested({}, rows=list(reference.index), columns=["miou"]), reference,
                           row_labels=fig4c["labels"], column_labels={"miou": "mIoU"},
                           not_run={(m, "miou") for m in reference.index})
    tables.write_table(table, "metrics", "fig4c", f"Unsupervised metrics for expert identification. {reason}",
                       root=ROOT, precision=2)
    plots.save_figure(plots.message_figure("Ablation of experts", reason), 4, "metrics_topn", root=ROOT)

# %%
if run:
    stats = experiments.load_stats(ROOT, model, dataset)
    val = experiments.open_cache(ROOT, model, dataset, "val")
    res = analysis.load_results(ROOT, model, dataset)
    synthetic = analysis.provenance(res, val.manifest)
    ablation = experiments.metric_ablation(stats, val, val.class_names, metrics, n=n)
    if per_template:
        iou = analysis.per_template_iou(res)
        corr = {m: analysis.metric_correlation(ablation.at[m, "rankings"], iou, m) for m in metrics}
        ablation["spearman_oriented"] = [corr[m]["oriented"].mean() for m in metrics]
    else:
        ablation["spearman_oriented"] = float("nan")
    ablation[["miou", "spearman_oriented"]]

# %%
if run:
    fig4c = paper.paper_numbers()["fig4c"]
    ours = tables.frame_from_nested({m: {"miou": ablation.at[m, "miou"]} for m in metrics})
    reference = tables.frame_from_nested({m: {"miou": v} for m, v in fig4c["miou"].items()})
    table = tables.compare(ours, reference, row_labels=fig4c["labels"], column_labels={"miou": "mIoU"})
    table[("Spearman vs IoU", "ours")] = [ablation.at[m, "spearman_oriented"] if m in metrics else float("nan")
                                          for m in [*reference.index, *[x for x in metrics if x not in reference.index]]]
    tables.write_table(table, "metrics", "fig4c", f"Unsupervised metrics for expert identification ({paper.model_label(model)}, "
                       f"{dataset}, N={n}): mIoU (%) beside the paper's Fig. 4(c), and the mean over classes of the "
                       "oriented Spearman correlation between the metric and the true per-template IoU.", root=ROOT,
                       synthetic=synthetic, precision=2)
    print((ROOT / "tables" / "tabfig4c_metrics.md").read_text())

# %%
if run:
    rankings = ablation.at["entropy", "rankings"] if "entropy" in metrics else stats.rankings(val.class_names)
    sweep = experiments.topn_sweep(rankings, val, ns)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].bar([fig4c["labels"].get(m, m) for m in metrics], ablation["miou"], color=plots.FLOSS_COLOR, label="ours")
    axes[0].scatter([fig4c["labels"].get(m, m) for m in metrics if m in fig4c["miou"]],
                    [fig4c["miou"][m] for m in metrics if m in fig4c["miou"]], color=plots.PAPER_COLOR, zorder=3,
                    label="paper")
    axes[0].axhline(sweep["baseline"].iloc[0], color=plots.BASELINE_COLOR, linestyle="--", label="W_CLIP")
    axes[0].set_ylabel("mIoU (%)")
    axes[0].set_title("(c) expert metric")
    axes[0].legend(loc="lower right")
    axes[1].plot(sweep.index, sweep["miou"], marker="o", color=plots.FLOSS_COLOR, label="FLOSS")
    axes[1].axhline(sweep["baseline"].iloc[0], color=plots.BASELINE_COLOR, linestyle="--", label="W_CLIP")
    axes[1].set_xlabel("N experts per class")
    axes[1].set_ylabel("mIoU (%)")
    axes[1].set_title("(d) top-N")
    axes[1].legend(loc="lower right")
    fig.suptitle(plots.demo_title(f"Ablation of experts — {paper.model_label(model)}, {dataset}", synthetic))
    plots.save_figure(fig, 4, "metrics_topn", root=ROOT)
    sweep
