"""Dense open-vocabulary models behind one interface (:class:`DenseModel`) and a registry.

``create_model("maskclip" | "clipdinoiser" | "naclip" | "sclip" | "clearclip" | "gem", backbone=None,
pretrained=None, checkpoint=None, device="cpu", ...)`` builds a model (GEM also takes ``depth``,
``ss_attn_iter``, ``ss_attn_temp`` and ``transform="clearclip" | "gem"``); ``register_model(name, factory)``
adds a user's own. Each model's ``extract(image, settings)`` applies the evaluation protocol of
:func:`settings_for`.
"""
from __future__ import annotations

from floss.model_matrix import MATRIX_MODELS, base_model
from floss.models.base import (DenseModel, ImageFeatures, ProtocolSettings, authors_precision, available_models,
                               create_model, register_model, settings_for)
from floss.models.clearclip import ClearCLIP
from floss.models.clipdinoiser import CLIPDINOiser
from floss.models.gem import GEM
from floss.models.maskclip import MaskCLIP
from floss.models.naclip import NACLIP
from floss.models.sclip import SCLIP

__all__ = ["DenseModel", "ImageFeatures", "ProtocolSettings", "settings_for", "register_model", "create_model",
           "available_models", "authors_precision", "OFFICIAL_WEIGHTS", "official_weights", "MaskCLIP", "CLIPDINOiser",
           "NACLIP", "SCLIP", "ClearCLIP", "GEM"]


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


def _maskclip(backbone=None, pretrained=None, checkpoint=None, device="cpu", **kw) -> MaskCLIP:
    _no_checkpoint("maskclip", checkpoint)
    return MaskCLIP(backbone, pretrained, device=device, **kw)


def _clipdinoiser(backbone=None, pretrained=None, checkpoint=None, device="cpu", **kw) -> CLIPDINOiser:
    return CLIPDINOiser(backbone, pretrained, checkpoint, device=device, **kw)


def _naclip(backbone=None, pretrained=None, checkpoint=None, device="cpu", **kw) -> NACLIP:
    _no_checkpoint("naclip", checkpoint)
    return NACLIP(backbone, pretrained, device=device, **kw)


def _sclip(backbone=None, pretrained=None, checkpoint=None, device="cpu", **kw) -> SCLIP:
    _no_checkpoint("sclip", checkpoint)
    return SCLIP(backbone, pretrained, device=device, **kw)


def _clearclip(backbone=None, pretrained=None, checkpoint=None, device="cpu", **kw) -> ClearCLIP:
    _no_checkpoint("clearclip", checkpoint)
    return ClearCLIP(backbone, pretrained, device=device, **kw)


def _gem(backbone=None, pretrained=None, checkpoint=None, device="cpu", **kw) -> GEM:
    _no_checkpoint("gem", checkpoint)
    return GEM(backbone, pretrained, device=device, **kw)


register_model("maskclip", _maskclip)
register_model("clipdinoiser", _clipdinoiser)
register_model("naclip", _naclip, authors_precision=NACLIP.authors_precision)
register_model("sclip", _sclip, authors_precision=SCLIP.authors_precision)
register_model("clearclip", _clearclip, authors_precision=ClearCLIP.authors_precision)
register_model("gem", _gem, authors_precision=GEM.authors_precision)
