"""FLOSS: Free Lunch in Open-vocabulary Semantic Segmentation (Benigmim et al., 2025).

A small verb-style API (see README "Library"): rank CLIP's 80 ImageNet templates (or any template set:
``floss.load_templates(path)``) per class by the entropy of single-template predictions on unlabeled images, keep
the top-N class experts, fuse their maps (Eq. 7).

    import floss
    st = floss.TemplateStats(80, K)
    for probs in single_template_probabilities:        # [80, K, h, w] per unlabeled image
        st.update(probs, size=(H, W))
    experts = floss.select_experts(st.rankings(class_names), n=4)
    fused = floss.fuse(expert_probs, fallback_probs)    # [K, K, H, W], [K, H, W] -> [K, H, W]

Models, datasets, the feature cache and the pipeline live in submodules (``floss.models``, ``floss.data.datasets``,
``floss.data.cache``, ``floss.protocol``). The names below are imported on first use, so ``import floss.util.paths`` (the
pipeline's light stages, ``check-params``) does not pay for torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "IMAGENET_TEMPLATES": "floss.core.templates", "CLASS_NAMES": "floss.core.classes", "TemplateStats": "floss.core.stats",
    "select_experts": "floss.core.rankings", "fuse": "floss.core.fusion", "confusion_matrix": "floss.core.evaluation",
    "miou": "floss.core.evaluation", "ConfusionMeter": "floss.core.evaluation", "load_rankings": "floss.core.rankings",
    "save_rankings": "floss.core.rankings", "oracle_experts": "floss.core.rankings", "true_experts": "floss.core.rankings",
    "mixed_experts": "floss.core.rankings", "expert_quality": "floss.core.rankings", "template_embeddings": "floss.core.text",
    "averaged_classifier": "floss.core.text", "expert_classifiers": "floss.core.text", "register_metric": "floss.core.metrics",
    "available_metrics": "floss.core.metrics", "load_templates": "floss.core.templates",
    "TemplateSet": "floss.core.templates", "DEFAULT_TEMPLATES": "floss.core.templates",
    "rankings_templates": "floss.core.rankings",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'floss' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
