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
# # Fig. 5 — effect of class-expert quality, and the oracle upper bound
#
# With labels, the true experts of each class are known (templates beating W_CLIP, Eq. 4). Sets of N=4 experts
# with a ratio ρ of true experts (the rest non-experts) are drawn at random over seeds; the oracle takes the
# top-N templates by true IoU (paper: 37.1/37.0/37.3/37.5 for N=1..4; ρ=100 %: 34.1).

# %% tags=["parameters"]
root = ""  # repository root; empty means floss.util.paths.ROOT
model = "clipdinoiser"
dataset = "cityscapes"
rhos = [0.0, 0.25, 0.5, 0.75, 1.0]
seeds = 10
oracle_ns = [1, 2, 3, 4]
n = 4
matrix = None  # params.yaml `models`; None: the paper's matrix. Without the run, both outputs say so.
per_template = True  # params.yaml evaluate.per_template (true experts need the single-template IoUs)

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import floss.util.paths
from floss.protocol import experiments
from floss.report import analysis, paper, plots, tables

ROOT = Path(root) if root else floss.util.paths.ROOT
plots.use_style()

# %%
run = per_template and analysis.ran(matrix, model, dataset)
if not run:
    reason = analysis.not_run_message(model, dataset, "the oracle and rho sweeps") if per_template else \
        "Not run: evaluate.per_template is false in params.yaml (true experts need the single-template IoUs)."
    reference = {f"oracle N={k}": {"miou": v} for k, v in paper.paper_numbers()["oracle"]["miou"].items()}
    reference["rho=100%"] = {"miou": paper.rho_100_miou()}
    reference["FLOSS (entropy)"] = {"miou": paper.paper_miou("clipdinoiser", "cityscapes")}
    table = tables.compare(tables.frame_from_nested({}, rows=list(reference), columns=["miou"]),
                           tables.frame_from_nested(reference), column_labels={"miou": "mIoU"},
                           not_run={(r, "miou") for r in reference})
    tables.write_table(table, "oracle", "fig5", f"Oracle experts and rho = 100 % true experts. {reason}", root=ROOT,
                       precision=2)
    plots.save_figure(plots.message_figure("Effect of class-expert quality", reason), 5, "oracle", root=ROOT)

# %%
if run:
    res = analysis.load_results(ROOT, model, dataset)
    val = experiments.open_cache(ROOT, model, dataset, "val")
    synthetic = analysis.provenance(res, val.manifest)
    names = val.class_names
    iou = torch.tensor(analysis.per_template_iou(res)[names].to_numpy(), dtype=torch.float64)
    base = torch.tensor(analysis.class_iou(res, "baseline")[names].to_numpy(), dtype=torch.float64)
    mix = experiments.rho_sweep(iou, base, val, rhos, seeds, n=n)
    oracle = experiments.oracle_sweep(iou, val, oracle_ns)
    summary = experiments.summarize(mix, "rho")
    summary

# %%
if run:
    ours = {f"oracle N={k}": {"miou": oracle.at[k, "miou"]} for k in oracle.index}
    ours["rho=100%"] = {"miou": summary.at[100.0, "mean"]} if 100.0 in summary.index else {}
    ours["FLOSS (entropy)"] = {"miou": analysis.method_miou(res, "floss")}
    reference = {f"oracle N={k}": {"miou": v} for k, v in paper.paper_numbers()["oracle"]["miou"].items()}
    reference["rho=100%"] = {"miou": paper.rho_100_miou()}
    reference["FLOSS (entropy)"] = {"miou": paper.paper_miou("clipdinoiser", "cityscapes")}
    table = tables.compare(tables.frame_from_nested(ours), tables.frame_from_nested(reference),
                           column_labels={"miou": "mIoU"})
    tables.write_table(table, "oracle", "fig5", f"Oracle experts (top-N by true IoU) and rho = 100 % true experts "
                       f"({paper.model_label(model)}, {dataset}, mIoU %), beside the paper (Sec. 5.2, Fig. 5).",
                       root=ROOT, synthetic=synthetic, precision=2)
    print((ROOT / "tables" / "tabfig5_oracle.md").read_text())

# %%
if run:
    fig, ax = plt.subplots(figsize=(4.6, 3.3))
    plots.mean_std_line(ax, summary.index, summary["mean"], summary["std"], label=f"{paper.model_label(model)} + FLOSS (ρ mix)")
    ax.axhline(analysis.method_miou(res, "baseline"), color=plots.BASELINE_COLOR, linestyle="--", label=paper.model_label(model))
    ax.axhline(analysis.method_miou(res, "floss"), color=plots.FLOSS_COLOR, linestyle=":", label="FLOSS (entropy experts)")
    ax.set_xlabel("ratio ρ of true experts (%)")
    ax.set_ylabel("mIoU (%)")
    ax.legend(loc="lower right")
    ax.set_title(plots.demo_title(f"Effect of class-expert quality — {dataset}", synthetic))
    plots.save_figure(fig, 5, "oracle", root=ROOT)
