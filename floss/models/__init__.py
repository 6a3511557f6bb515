"""Dense open-vocabulary models behind one interface (:class:`DenseModel`) and a registry.

``create_model("maskclip" | "clipdinoiser" | "naclip" | "sclip" | "clearclip" | "gem" | "gem_quoted" | "resclip" |
"scclip", backbone=None, pretrained=None, checkpoint=None, device="cpu", ...)`` builds a model (GEM also takes
``depth``, ``ss_attn_iter``, ``ss_attn_temp``, ``transform="clearclip" | "gem"`` and ``ignore_residual``; ResCLIP
``base``, ``dataset``, ``use_rcs``, ``use_sfr`` ...; SC-CLIP ``detector="lof" | "norm"``); ``register_model(name, factory)``
adds a user's own. Each model's ``extract(image, settings)`` applies the evaluation protocol of
:func:`settings_for`.

Layer 2: the models (on open_clip; imported on first use). :mod:`~floss.models.base` (interface, protocol
settings, registry), :mod:`~floss.models.preprocess` (mmcv/mmseg resize and windows), :mod:`~floss.models.backbone`
(open_clip loading), :mod:`~floss.models.matrix` (the paper's model matrix). May import: :mod:`floss.util`,
:mod:`floss.core`, torch, open_clip. Never data, protocol, the CLI or the pipeline.
"""
from __future__ import annotations

import importlib

from floss.models.matrix import MATRIX_MODELS, base_model
from floss.models.base import (DenseModel, ImageFeatures, ProtocolSettings, authors_precision, available_models,
                               create_model, register_model, settings_for)

__all__ = ["DenseModel", "ImageFeatures", "ProtocolSettings", "settings_for", "register_model", "create_model",
           "available_models", "authors_precision", "OFFICIAL_WEIGHTS", "official_weights", "MaskCLIP", "CLIPDINOiser",
           "NACLIP", "SCLIP", "ClearCLIP", "GEM", "GEMQuoted", "ResCLIP", "SCCLIP"]


#: the (backbone, weights) pairs the published numbers come from, as a cache fingerprint records them
OFFICIAL_WEIGHTS: dict[str, set[tuple[str, str]]] = {}
for _key, (_base, _backbone, _tag) in MATRIX_MODELS.items():
    OFFICIAL_WEIGHTS.setdefault(_base, set()).add((_backbone, f"tag:{_tag}"))


def official_weights(model: str, backbone: str | None, weights: str | None) -> bool:
    """Whether a cache of ``model`` (a registered name or a matrix key such as ``naclip_vitl14``) was extracted
    with official weights (open_clip tags; a local file cannot be recognised and counts as other weights)."""
    return (backbone, weights) in OFFICIAL_WEIGHTS.get(base_model(str(model)), set())


def _no_checkpoint(model: str, checkpoint) -> None:
    if checkpoint is not None:
        raise ValueError(f"checkpoint: {model} takes no head checkpoint (only clipdinoiser), received {checkpoint!r}")


#: the built-in models: name -> (module, class). Imported on first use, so the stages that only read caches never
#: import open_clip (about 3 s per process).
BUILT_IN: dict[str, tuple[str, str]] = {
    "maskclip": ("floss.models.maskclip", "MaskCLIP"), "clipdinoiser": ("floss.models.clipdinoiser", "CLIPDINOiser"),
    "naclip": ("floss.models.naclip", "NACLIP"), "sclip": ("floss.models.sclip", "SCLIP"),
    "clearclip": ("floss.models.clearclip", "ClearCLIP"), "gem": ("floss.models.gem", "GEM"),
    "gem_quoted": ("floss.models.gem", "GEMQuoted"), "resclip": ("floss.models.resclip", "ResCLIP"),
    "scclip": ("floss.models.scclip", "SCCLIP"),
}


def _model_class(name: str) -> type[DenseModel]:
    module, cls = BUILT_IN[name]
    return getattr(importlib.import_module(module), cls)


def __getattr__(attr: str):
    """The model classes (``floss.models.NACLIP`` ...), imported on first use."""
    for name, (_, cls) in BUILT_IN.items():
        if cls == attr:
            return _model_class(name)
    raise AttributeError(f"module 'floss.models' has no attribute {attr!r}")


def _factory(name: str):
    def build(backbone=None, pretrained=None, checkpoint=None, device="cpu", **kw) -> DenseModel:
        if name == "clipdinoiser":          # the only model with a head checkpoint
            return _model_class(name)(backbone, pretrained, checkpoint, device=device, **kw)
        _no_checkpoint(name, checkpoint)
        return _model_class(name)(backbone, pretrained, device=device, **kw)
    build.__name__ = f"build_{name}"
    return build


for _name in BUILT_IN:
    register_model(_name, _factory(_name), authors_precision=lambda _name=_name: _model_class(_name).authors_precision)
