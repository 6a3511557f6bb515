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
# # Figs. 12–15 — entropy vs IoU per template
#
# For each class, every valid template (one that predicts the class on at least one train pixel) is a dot at
# (train entropy, val IoU); the dotted line is the averaged classifier W_CLIP's IoU. The number of valid templates
# is in parentheses. Fig. 12 (CLIP-DINOiser, Cityscapes) can also be drawn from the authors' published data alone
# (their rankings + per-template IoU); its W_CLIP line is drawn only when a baseline evaluation exists.

# %% tags=["parameters"]
root = ""  # repository root; empty means floss.util.paths.ROOT
figures = {"12": ["clipdinoiser", "cityscapes"], "13": ["clipdinoiser", "pascalco59"],
           "14": ["naclip", "cityscapes"], "15": ["naclip", "pascalco59"]}
authors_fig12 = True  # also draw Fig. 12 from the authors' published data (data/authors)
max_classes = 60
matrix = None  # params.yaml `models`; None: the paper's matrix. A figure whose run is missing says so.
per_template = True  # params.yaml evaluate.per_template (the per-template IoUs these figures plot)

# %%
from pathlib import Path

import floss.util.paths
from floss.data.authors import authors_status, unavailable_note
from floss.report import analysis, paper, plots

ROOT = Path(root) if root else floss.util.paths.ROOT
plots.use_style()
COLORS = plots.template_colors()


def draw(pairs, baseline, title):
    classes = list(dict.fromkeys(pairs["class"]))[:max_classes]
    fig, axes = plots.class_grid(len(classes), ncols=5)
    for ax, name in zip(axes, classes):
        g = pairs[(pairs["class"] == name) & pairs.valid]
        ax.scatter(g["value"], g["iou"], c=COLORS[g["template_id"].to_numpy() % len(COLORS)], s=9, linewidths=0)
        if baseline is not None and name in baseline.index:
            ax.axhline(baseline[name], color="black", linestyle=":", linewidth=1)
        ax.set_title(f"{name} ({len(g)})", fontsize=8)
        ax.set_xlabel("entropy (nats)", fontsize=7)
        ax.set_ylabel("IoU (%)", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# %%
correlations = {}
for number, (model, dataset) in figures.items():
    title = f"Entropy and IoU per template ({paper.model_label(model)}, {dataset})"
    if not per_template or not analysis.ran(matrix, model, dataset):
        reason = analysis.not_run_message(model, dataset) if per_template else \
            "Not run: evaluate.per_template is false in params.yaml."
        plots.save_figure(plots.message_figure(title, reason), number, f"entropy_iou_{model}_{dataset}", root=ROOT)
        continue
    res = analysis.load_results(ROOT, model, dataset)
    rankings = analysis.read_json(analysis.rankings_path(ROOT, model, dataset), what="rankings")
    pairs = analysis.metric_iou_pairs(rankings, analysis.per_template_iou(res))
    correlations[model, dataset] = analysis.metric_correlation(rankings, analysis.per_template_iou(res))["spearman"].mean()
    title = plots.demo_title(title, analysis.provenance(res))
    plots.save_figure(draw(pairs, analysis.class_iou(res, "baseline"), title), number,
                      f"entropy_iou_{model}_{dataset}", root=ROOT)
correlations

# %% [markdown]
# Fig. 12 from the authors' files alone (protocol §8.1): x = their train entropy, y = their per-template IoU. When
# the authors' data could not be obtained (offline, no local copy), the figure says so and how to get it.

# %%
authors_title = "Entropy and IoU per template (CLIP-DINOiser, Cityscapes) — the authors' published data"
status = authors_status(ROOT)
authors_rankings = analysis.rankings_path(ROOT, "clipdinoiser", "cityscapes", authors=True)
authors_iou_file = ROOT / "data/authors/iou_per_template_clipdinoiser_cityscapes.json"
if not status["available"]:
    plots.save_figure(plots.message_figure(authors_title, unavailable_note(status)), 12, "entropy_iou_authors",
                      root=ROOT)
    print(unavailable_note(status))
elif authors_fig12:
    rankings = analysis.read_json(authors_rankings)
    iou = analysis.authors_iou(analysis.read_json(authors_iou_file))
    baseline_file = analysis.results_path(ROOT, "clipdinoiser", "cityscapes")
    baseline = None
    if baseline_file.is_file():
        doc = analysis.read_json(baseline_file)
        # a synthetic baseline has nothing to do with the authors' numbers: no line then
        baseline = None if analysis.provenance(doc) else analysis.class_iou(doc, "baseline")
    fig = draw(analysis.metric_iou_pairs(rankings, iou), baseline, authors_title)
    plots.save_figure(fig, 12, "entropy_iou_authors", root=ROOT)
    print("Spearman(entropy, IoU), mean over classes:",
          round(analysis.metric_correlation(rankings, iou)["spearman"].mean(), 3))
else:
    plots.save_figure(plots.message_figure(authors_title, "Not drawn: authors_fig12 is false."), 12,
                      "entropy_iou_authors", root=ROOT)
