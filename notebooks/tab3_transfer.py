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
# # Table 3 — generalisation of experts across datasets
#
# Experts identified on Cityscapes (train) are applied to unseen driving datasets that share its 19 classes
# (ACDC night/fog/rain/snow, BDD, Mapillary). "Avg" is the mean over the out-of-domain sets, as in the paper.

# %% tags=["parameters"]
root = ""  # repository root; empty means floss.paths.ROOT
models = ["maskclip", "naclip", "clipdinoiser"]
transfer_datasets = ["acdc_night", "acdc_fog", "acdc_rain", "acdc_snow", "bdd", "mapillary"]

# %%
from pathlib import Path

import floss.paths
from floss.report import analysis, paper, tables

ROOT = Path(root) if root else floss.paths.ROOT

# %%
rows, synthetic = {}, False
for m in models:
    cs = analysis.load_results(ROOT, m, "cityscapes")
    docs = {d: analysis.load_results(ROOT, m, d, kind="transfer") for d in transfer_datasets}
    synthetic |= analysis.is_synthetic(cs, *docs.values())
    for method, key in (("baseline", m), ("floss", f"{m}+floss")):
        rows[key] = {"cityscapes": analysis.method_miou(cs, method),
                     **{d: analysis.method_miou(doc, method) for d, doc in docs.items()}}
ours = tables.frame_from_nested(rows)
ours["avg"] = ours[transfer_datasets].mean(axis=1)
ours

# %%
reference = paper.table_frame("table3")
labels = {m: paper.model_label(m) for m in reference.index}
labels.update({f"{m}+floss": f"{paper.model_label(m)} + FLOSS" for m in paper.MODEL_LABELS})
table = tables.compare(ours, reference, row_labels=labels, column_labels=paper.DATASET_LABELS)
tables.write_table(table, "transfer", 3, "Experts identified on Cityscapes applied to unseen datasets (mIoU, %): "
                   "reproduced (ours) beside the paper's Table 3; Avg over the out-of-domain sets.", root=ROOT,
                   synthetic=synthetic)
print((ROOT / "tables" / "tab3_transfer.md").read_text())
