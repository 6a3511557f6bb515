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
root = ""  # repository root; empty means floss.util.paths.ROOT
models = ["maskclip", "naclip", "clipdinoiser"]
datasets = ["cityscapes", "pascalvoc20", "pascalco59", "ade20k", "cocostuff"]
n = 4
matrix = None  # params.yaml `models`; None: the paper's matrix

# %%
from pathlib import Path

import pandas as pd

import floss.util.paths
from floss.data.authors import authors_status, unavailable_note
from floss.core.rankings import select_experts
from floss.report import analysis, paper, tables

ROOT = Path(root) if root else floss.util.paths.ROOT

# %%
status = authors_status(ROOT)
parts, summary, synthetic = [], {}, False
for m in models:
    for d in datasets:
        if not status["available"] or not analysis.ran(matrix, m, d):
            continue
        ours_path = analysis.rankings_path(ROOT, m, d)
        authors = analysis.load_authors_top4(ROOT, m, d)
        if authors is None or not ours_path.is_file():
            continue
        rankings = analysis.read_json(ours_path)
        results_file = analysis.results_path(ROOT, m, d)
        if results_file.is_file():
            synthetic = synthetic or analysis.provenance(analysis.read_json(results_file))
        synthetic = synthetic or analysis.provenance(rankings)
        names = list(rankings["classes"])
        # the authors' rule (as the evaluate stage): classes with fewer than n valid templates keep those
        ours = dict(zip(names, select_experts(rankings, n=n)))
        table = analysis.overlap_table(authors, ours, names)
        table.index = [f"{paper.model_label(m)} / {d} / {c}" for c in table.index]
        parts.append(table)
        summary[f"{m}/{d}"] = {"mean overlap": table["overlap"].mean(), "classes": len(table)}
summary = pd.DataFrame(summary).T
summary

# %%
caption = f"Top-{n} entropy experts per class: the authors' published rankings against ours, and their overlap."
if not status["available"]:
    # the table is still written, saying why it is empty and how to fill it
    note = pd.DataFrame({"status": [unavailable_note(status)]}, index=["authors' data"])
    tables.write_table(note, "authors_vs_ours", "A", f"{caption} {unavailable_note(status)}", root=ROOT, best=None)
    tables.write_table(note, "authors_vs_ours_summary", "A", f"Mean top-{n} overlap per model and dataset. "
                       f"{unavailable_note(status)}", root=ROOT, best=None)
    print(unavailable_note(status))
elif parts:
    tables.write_table(pd.concat(parts), "authors_vs_ours", "A", caption, root=ROOT, synthetic=synthetic,
                       best=None, precision=0)
    tables.write_table(summary.astype(float), "authors_vs_ours_summary", "A", f"Mean top-{n} overlap per model and "
                       "dataset (authors' experts vs ours).", root=ROOT, synthetic=synthetic, best=None, precision=2)
else:
    reason = "No (model, dataset) of params.yaml's models matrix has both the authors' rankings and ours."
    note = pd.DataFrame({"status": [reason]}, index=["comparison"])
    tables.write_table(note, "authors_vs_ours", "A", f"{caption} {reason}", root=ROOT, best=None)
    tables.write_table(note, "authors_vs_ours_summary", "A", reason, root=ROOT, best=None)
