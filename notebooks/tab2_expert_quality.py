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
# # Table 2 — quality of the estimated class-experts
#
# For each class, ρ̂_k = 100·|Ê_k ∩ E_k| / |Ê_k| (Eq. 8): the share of our entropy-selected experts Ê_k that are
# true experts E_k, i.e. single templates whose val IoU beats the averaged classifier W_CLIP (Eq. 4). The table
# reports the mean over classes. It needs the per-template IoU of the evaluation stage (`per_template`).

# %% tags=["parameters"]
root = ""  # repository root; empty means floss.util.paths.ROOT
models = ["maskclip", "naclip", "clipdinoiser"]
datasets = ["cityscapes", "pascalvoc20", "pascalco59", "ade20k", "cocostuff"]
matrix = None  # params.yaml `models`; None: the paper's matrix. Pairs not run are shown as "not run".
per_template = True  # params.yaml evaluate.per_template: rho_hat needs the 80 single-template IoUs

# %%
from pathlib import Path

import floss.util.paths
from floss.report import analysis, paper, tables

ROOT = Path(root) if root else floss.util.paths.ROOT

# %%
rows, synthetic, not_run = {}, False, set()
for m in models:
    rows[m] = {}
    for d in datasets:
        res = analysis.results_or_none(ROOT, matrix, m, d) if per_template else None
        if res is None:
            not_run |= {(m, d), (m, "avg")}
            continue
        synthetic = synthetic or analysis.provenance(res)
        baseline = analysis.class_iou(res, "baseline")
        quality, mean = analysis.quality_per_class(res["experts"], analysis.per_template_iou(res), baseline,
                                                   list(baseline.index))
        rows[m][d] = mean
ours = tables.frame_from_nested(rows, rows=models, columns=datasets)
ours["avg"] = ours[datasets].mean(axis=1, skipna=False)
ours

# %%
reference = paper.table_frame("table2")
table = tables.compare(ours, reference, row_labels={m: f"{paper.model_label(m)} + FLOSS" for m in reference.index},
                       column_labels=paper.DATASET_LABELS, not_run=not_run)
tables.write_table(table, "expert_quality", 2, "Quality of the estimated class-experts: mean over classes of "
                   "rho_hat_k (Eq. 8, %), reproduced (ours) beside the paper's Table 2.", root=ROOT,
                   synthetic=synthetic, precision=0)
print((ROOT / "tables" / "tab2_expert_quality.md").read_text())
