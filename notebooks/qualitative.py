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
# # Qualitative results and the fallback rate
#
# For a few val images: the image (for synthetic data, its label field stands in for the picture), the ground
# truth, the baseline (W_CLIP) prediction, FLOSS's prediction and the pixels where FLOSS changed the decision.
# The table measures how often no expert claims a pixel so that W_CLIP decides (paper, Sec. 4.2: ≈2 %) and how
# many pixels FLOSS changes. Eq. 7 is applied here on the window-averaged maps at the resized resolution.

# %% tags=["parameters"]
root = ""  # repository root; empty means floss.util.paths.ROOT
model = "clipdinoiser"
dataset = "cityscapes"
num_images = 3
max_images_fallback = 50
data_root = ""  # dataset folder for real images (profile paper); empty: show the label field
matrix = None  # params.yaml `models`; None: the paper's matrix. Without the run, both outputs say so.

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import floss.util.paths
from floss.protocol import experiments
from floss.report import analysis, paper, plots, tables

ROOT = Path(root) if root else floss.util.paths.ROOT
plots.use_style()

# %%
run = analysis.ran(matrix, model, dataset)
if not run:
    reason = analysis.not_run_message(model, dataset, "the qualitative figure and the fallback share")
    plots.save_figure(plots.message_figure(f"Qualitative results — {paper.model_label(model)}, {dataset}", reason),
                      "Q", "qualitative", root=ROOT)
    reference = tables.frame_from_nested({"fallback to W_CLIP": {"percent": paper.fallback_percent()}})
    table = tables.compare(tables.frame_from_nested({}, rows=["fallback to W_CLIP", "changed by FLOSS"],
                                                    columns=["percent"]), reference,
                           column_labels={"percent": "% of pixels"},
                           not_run={("fallback to W_CLIP", "percent"), ("changed by FLOSS", "percent")})
    tables.write_table(table, "fallback", "Q", f"Share of val pixels where W_CLIP decides. {reason}", root=ROOT,
                       best=None, precision=2)

# %%
if run:
    res = analysis.load_results(ROOT, model, dataset)
    val = experiments.open_cache(ROOT, model, dataset, "val")
    synthetic = analysis.provenance(res, val.manifest)
    experts = res["experts"]
    K = val.num_classes
    cmap = plt.get_cmap("tab20", max(K, 2))

    def colour(label):
        rgb = cmap(np.asarray(label, dtype=np.int64) % cmap.N)[..., :3]
        rgb[np.asarray(label) == 255] = 0.0
        return rgb

    def picture(record):
        if data_root and not synthetic:
            from floss.data.datasets.reader import open_dataset
            ds = open_dataset(dataset, data_root, "val").subset([record.id])
            return ds[0].image
        return colour(record.label.numpy())


    count = min(num_images, len(val))
    fig, axes = plt.subplots(count, 5, figsize=(13, 2.6 * count), squeeze=False)
    for row, i in zip(axes, range(count)):
        record = val[i]
        maps = experiments.decision_maps(record, val, experts)
        label = maps["label"].numpy()
        panels = [("image" if not synthetic else "label field (synthetic image)", picture(record)),
                  ("ground truth", colour(label)), ("baseline (W_CLIP)", colour(maps["baseline"].numpy())),
                  ("FLOSS", colour(maps["floss"].numpy())), ("changed by FLOSS", maps["changed"].numpy())]
        for ax, (title, img) in zip(row, panels):
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.suptitle(plots.demo_title(f"Qualitative results — {paper.model_label(model)}, {dataset}", synthetic))
    plots.save_figure(fig, "Q", "qualitative", root=ROOT)

# %%
if run:
    stats = experiments.fallback_stats(val, experts, max_images=max_images_fallback)
    ours = tables.frame_from_nested({"fallback to W_CLIP": {"percent": stats["fallback_percent"]},
                                     "changed by FLOSS": {"percent": stats["changed_percent"]}})
    reference = tables.frame_from_nested({"fallback to W_CLIP": {"percent": paper.fallback_percent()}})
    table = tables.compare(ours, reference, column_labels={"percent": "% of pixels"})
    tables.write_table(table, "fallback", "Q", f"Share of val pixels where no expert claims its class (W_CLIP decides) "
                       f"and where FLOSS changes the baseline's decision ({paper.model_label(model)}, {dataset}, "
                       f"{stats['images']} images), beside the paper's approximately 2 % (Sec. 4.2).", root=ROOT,
                       synthetic=synthetic, best=None, precision=2)
    stats
