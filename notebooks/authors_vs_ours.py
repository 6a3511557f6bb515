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
# # The authors' top-4 experts against ours
#
# For every (model, dataset) with both rankings — the authors' (`data/authors/...`) and ours
# (`results/rankings/...`) — the per-class top-4 entropy experts side by side and their overlap |∩| (0–4).
# On real data, equal sets mean the ranking is reproduced; on synthetic data the comparison is only a demo.

# %% tags=["parameters"]
root = ""  # repository root; empty means floss.paths.ROOT
models = ["maskclip", "naclip", "clipdinoiser"]
datasets = ["cityscapes", "pascalvoc20", "pascalco59", "ade20k", "cocostuff"]
n = 4

# %%
from pathlib import Path

import pandas as pd

import floss.paths
from floss.experiments import lenient_experts
from floss.report import analysis, paper, tables

ROOT = Path(root) if root else floss.paths.ROOT

# %%
parts, summary, synthetic = [], {}, False
for m in models:
    for d in datasets:
        ours_path = analysis.rankings_path(ROOT, m, d)
        authors = analysis.load_authors_top4(ROOT, m, d)
        if authors is None or not ours_path.is_file():
            continue
        rankings = analysis.read_json(ours_path)
        results_file = analysis.results_path(ROOT, m, d)
        if results_file.is_file():
            synthetic |= analysis.is_synthetic(analysis.read_json(results_file))
        synthetic |= analysis.is_synthetic(rankings)
        names = list(rankings["classes"])
        # the authors' rule (as the evaluate stage): classes with fewer than n valid templates keep those
        ours = dict(zip(names, lenient_experts(rankings, n=n)[0]))
        table = analysis.overlap_table(authors, ours, names)
        table.index = [f"{paper.model_label(m)} / {d} / {c}" for c in table.index]
        parts.append(table)
        summary[f"{m}/{d}"] = {"mean overlap": table["overlap"].mean(), "classes": len(table)}
summary = pd.DataFrame(summary).T
summary

# %%
if parts:
    tables.write_table(pd.concat(parts), "authors_vs_ours", "A", f"Top-{n} entropy experts per class: the authors' "
                       "published rankings against ours, and their overlap.", root=ROOT, synthetic=synthetic,
                       best=None, precision=0)
    tables.write_table(summary.astype(float), "authors_vs_ours_summary", "A", f"Mean top-{n} overlap per model and "
                       "dataset (authors' experts vs ours).", root=ROOT, synthetic=synthetic, best=None, precision=2)
else:
    print("no (model, dataset) with both the authors' and our rankings")
