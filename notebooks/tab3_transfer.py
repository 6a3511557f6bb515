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
root = ""  # repository root; empty means floss.util.paths.ROOT
models = ["maskclip", "naclip", "clipdinoiser"]
transfer_datasets = ["acdc_night", "acdc_fog", "acdc_rain", "acdc_snow", "bdd", "mapillary"]
matrix = None  # params.yaml `models`; None: the paper's matrix
transfer = None  # params.yaml `transfer` ({models, datasets} run); None: every model x transfer set above

# %%
from pathlib import Path

import floss.util.paths
from floss.report import analysis, paper, tables

ROOT = Path(root) if root else floss.util.paths.ROOT

# %%
rows, synthetic, not_run = {}, False, set()
for m in models:
    cs = analysis.results_or_none(ROOT, matrix, m, "cityscapes")
    ran_transfer = transfer is None or (m in transfer["models"])
    docs = {d: analysis.load_results(ROOT, m, d, kind="transfer")
            for d in transfer_datasets if ran_transfer and (transfer is None or d in transfer["datasets"])}
    synthetic = synthetic or analysis.provenance(cs, *docs.values())
    for method, key in (("baseline", m), ("floss", f"{m}+floss")):
        rows[key] = {**({"cityscapes": analysis.method_miou(cs, method)} if cs else {}),
                     **{d: analysis.method_miou(doc, method) for d, doc in docs.items()}}
        not_run |= {(key, d) for d in ["cityscapes", *transfer_datasets] if d not in rows[key]}
        if any(d not in rows[key] for d in transfer_datasets):
            not_run.add((key, "avg"))
ours = tables.frame_from_nested(rows, rows=[r for m in models for r in (m, f"{m}+floss")],
                                columns=["cityscapes", *transfer_datasets])
ours["avg"] = ours[transfer_datasets].mean(axis=1, skipna=False)
ours

# %%
reference = paper.table_frame("table3")
labels = {m: paper.model_label(m) for m in reference.index}
labels.update({f"{m}+floss": f"{paper.model_label(m)} + FLOSS" for m in paper.MODEL_LABELS})
table = tables.compare(ours, reference, row_labels=labels, column_labels=paper.DATASET_LABELS, not_run=not_run)
tables.write_table(table, "transfer", 3, "Experts identified on Cityscapes applied to unseen datasets (mIoU, %): "
                   "reproduced (ours) beside the paper's Table 3; Avg over the out-of-domain sets.", root=ROOT,
                   synthetic=synthetic)
print((ROOT / "tables" / "tab3_transfer.md").read_text())
