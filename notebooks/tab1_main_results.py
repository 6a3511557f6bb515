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
# # Table 1 — OVSS across datasets and models
#
# mIoU of MaskCLIP, NACLIP and CLIP-DINOiser with the averaged 80-template classifier (W_CLIP) and with FLOSS
# (entropy-selected top-4 experts per class, Expert-Highest fusion), on the validation sets. Each value is shown
# beside the paper's and their difference. The other methods' rows are quoted from the paper (not reproduced), but
# GEM's: its quoted numbers come from ClearCLIP's re-run of GEM, which `gem_quoted` reproduces (README "GEM").
# (`metrics/miou.json`, for `dvc metrics diff`, is written by the pipeline's metrics stage from the same files.)

# %% tags=["parameters"]
root = ""  # repository root; empty means floss.util.paths.ROOT
models = ["maskclip", "naclip", "clipdinoiser", "gem_quoted"]   # gem_quoted: the GEM row the paper quotes
datasets = ["cityscapes", "pascalvoc20", "pascalco59", "ade20k", "cocostuff"]
matrix = None  # params.yaml `models` (model -> datasets run); None: the paper's matrix. Cells not run say so.

# %%
from pathlib import Path

import floss.util.paths
from floss.report import analysis, paper, tables

ROOT = Path(root) if root else floss.util.paths.ROOT

# %% [markdown]
# Load every results file the matrix ran; a missing one is an error that names the file and the stage that writes
# it. A (model, dataset) pair not in the matrix is shown as "not run", and so is an average over an incomplete row.

# %%
results = {(m, d): analysis.results_or_none(ROOT, matrix, m, d) for m in models for d in datasets}
synthetic = analysis.provenance(*results.values())
ours, not_run = {}, set()
for m in models:
    for method, row in ((m, "baseline"), (f"{m}+floss", "floss")):
        ours[method] = {d: analysis.method_miou(results[m, d], row) for d in datasets if results[m, d]}
        not_run |= {(method, d) for d in datasets if results[m, d] is None}
ours = tables.frame_from_nested(ours, rows=[r for m in models for r in (m, f"{m}+floss")], columns=datasets)
ours["avg"] = ours[datasets].mean(axis=1, skipna=False)
not_run |= {(r, "avg") for r, _ in not_run}
ours

# %% [markdown]
# Side by side with the paper (rows quoted from the paper are marked). The average is over the datasets run.

# %%
reference = paper.table_frame("table1")
labels = {m: paper.model_label(m) for m in reference.index}
labels.update({f"{m}+floss": f"{paper.model_label(m)} + FLOSS" for m in list(models) + list(paper.MODEL_LABELS)})
table = tables.compare(ours, reference, row_labels=labels, column_labels=paper.DATASET_LABELS, not_run=not_run)
written = tables.write_table(table, "main_results", 1, "OVSS across datasets and models (mIoU, %): reproduced "
                             "(ours), the paper's Table 1 (paper) and the difference.", root=ROOT,
                             synthetic=synthetic)
print((ROOT / "tables" / "tab1_main_results.md").read_text())

