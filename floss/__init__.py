"""FLOSS: Free Lunch in Open-vocabulary Semantic Segmentation (Benigmim et al., 2025).

A small verb-style API (see README "Library"): rank CLIP's 80 ImageNet templates per class by the entropy of
single-template predictions on unlabeled images, keep the top-N class experts, fuse their maps (Eq. 7).

    import floss
    st = floss.TemplateStats(80, K)
    for probs in single_template_probabilities:        # [80, K, h, w] per unlabeled image
        st.update(probs, size=(H, W))
    experts = floss.select_experts(st.rankings(class_names), n=4)
    fused = floss.fuse(expert_probs, fallback_probs)    # [K, K, H, W], [K, H, W] -> [K, H, W]

Models, datasets, the feature cache and the pipeline live in submodules (``floss.models``, ``floss.datasets``,
``floss.cache``, ``floss.protocol``) and are imported on demand.
"""
from floss.classes import CLASS_NAMES
from floss.evaluation import ConfusionMeter, confusion_matrix, miou
from floss.fusion import fuse
from floss.metrics_registry import available_metrics, register_metric
from floss.rankings import (expert_quality, load_rankings, mixed_experts, oracle_experts, save_rankings,
                            select_experts, true_experts)
from floss.stats import TemplateStats
from floss.templates import IMAGENET_TEMPLATES
from floss.text import averaged_classifier, expert_classifiers, template_embeddings

__version__ = "0.1.0"

__all__ = [
    "IMAGENET_TEMPLATES", "CLASS_NAMES", "TemplateStats", "select_experts", "fuse", "confusion_matrix", "miou",
    "ConfusionMeter", "load_rankings", "save_rankings", "oracle_experts", "true_experts", "mixed_experts",
    "expert_quality", "template_embeddings", "averaged_classifier", "expert_classifiers", "register_metric",
    "available_metrics", "__version__",
]
