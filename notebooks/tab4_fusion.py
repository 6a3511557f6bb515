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
# # Table 4 — fusion strategies for the expert predictions
#
# Cityscapes mIoU of each model + FLOSS with four ways to combine the K expert maps: Average-all (ignores
# expertise), and, when several experts claim a pixel, Expert Default (fall back to W_CLIP), Expert Average
# (average the claiming experts) and Expert Highest (the most confident claimer, Eq. 7 — FLOSS).

# %% tags=["parameters"]
root = ""  # repository root; empty means floss.util.paths.ROOT
models = ["maskclip", "naclip", "clipdinoiser"]
dataset = "cityscapes"
fusions = ["average_all", "default", "average", "highest"]
matrix = None  # params.yaml `models`; None: the paper's matrix
evaluated_fusions = None  # params.yaml evaluate.fusions (those run); None: all of the above

# %%
from pathlib import Path

import floss.util.paths
from floss.report import analysis, paper, tables

ROOT = Path(root) if root else floss.util.paths.ROOT

# %%
docs = {m: analysis.results_or_none(ROOT, matrix, m, dataset) for m in models}
synthetic = analysis.provenance(*docs.values())
run = [f for f in fusions if evaluated_fusions is None or f in evaluated_fusions]
ours = tables.frame_from_nested({m: {f: analysis.method_miou(docs[m], f"floss_{f}") for f in run} if docs[m] else {}
                                 for m in models}, rows=models, columns=fusions)
not_run = {(m, f) for m in models for f in fusions if docs[m] is None or f not in run}
ours

# %%
labels = paper.paper_numbers()["table4"]["labels"]
reference = paper.table_frame("table4")
table = tables.compare(ours, reference, row_labels={m: f"{paper.model_label(m)} + FLOSS" for m in reference.index},
                       column_labels=labels, not_run=not_run)
tables.write_table(table, "fusion", 4, f"Fusion strategies on {dataset} (mIoU, %): reproduced (ours) beside the "
                   "paper's Table 4.", root=ROOT, synthetic=synthetic)
print((ROOT / "tables" / "tab4_fusion.md").read_text())
