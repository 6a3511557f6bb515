"""The plug-in point for dense models, the per-model protocol settings and the model registry.

A dense model only supplies :meth:`DenseModel.encode_text` and :meth:`DenseModel.window_features`; the
whole evaluation protocol (keep-ratio or stretched resize, sliding windows, optional padding, CLIP
normalisation) is implemented once in :meth:`DenseModel.extract`, so a user's own model gets exactly the same
treatment as MaskCLIP, CLIP-DINOiser, NACLIP, SCLIP, ClearCLIP, GEM, ResCLIP and SC-CLIP.
"""
from __future__ import annotations

import abc
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch

import floss.models.preprocess as preprocess

logger = logging.getLogger(__name__)

__all__ = [
    "ProtocolSettings", "settings_for", "ImageFeatures", "DenseModel", "register_model", "create_model",
    "available_models", "authors_precision", "KNOWN_DATASETS", "DRIVING_DATASETS", "PROTOCOLS", "SOFTMAX_STAGES",
    "RESIZE_MODES",
]

PROTOCOLS = ("authors", "paper")
SOFTMAX_STAGES = ("window", "final")
#: "keep_ratio": mmcv keep-ratio resize to ``scale = (long_max, short_max)`` (every segmentor's pipeline);
#: "stretch_bicubic": GEM's library transform, PIL bicubic to exactly ``scale = (h, w)``, aspect ratio not kept
RESIZE_MODES = ("keep_ratio", "stretch_bicubic")
#: Cityscapes and the datasets of the paper's transfer table (evaluated with the Cityscapes classes)
DRIVING_DATASETS = ("cityscapes", "bdd", "acdc_night", "acdc_fog", "acdc_rain", "acdc_snow", "mapillary")
KNOWN_DATASETS = ("pascalvoc20", "pascalco59", "ade20k", "cocostuff") + DRIVING_DATASETS
#: models with a protocol table (``settings_for``)
PROTOCOL_MODELS = ("maskclip", "clipdinoiser", "naclip", "sclip", "clearclip", "gem", "gem_448", "gem_quoted", "resclip",
                   "scclip")

# CLIP-DINOiser dataset configs (shared by FLOSS's MaskCLIP): mmcv Resize scale per dataset
_DINOISER_SCALES = {"cityscapes": (896, 448), "bdd": (1280, 448), "mapillary": (1920, 448),
                    **{f"acdc_{c}": (796, 448) for c in ("night", "fog", "rain", "snow")}}
_FP16_WINDOW_DATASETS = ("ade20k", "cocostuff")
# SCLIP's configs: Resize short side per dataset (default 336; the driving sets follow Cityscapes' 560)
_SCLIP_SHORT_SIDE = {"cocostuff": 448, **{name: 560 for name in DRIVING_DATASETS}}
# ResCLIP's and SC-CLIP's configs: as SCLIP's, but COCO-Stuff at 336 (OVSS-models-2025 §1.5, §2.4)
_SHORT_SIDE_2025 = {name: 560 for name in DRIVING_DATASETS}


@dataclass(frozen=True)
class ProtocolSettings:
    """How one model is evaluated on one dataset (see docs/architecture.md)."""

    scale: tuple[int, int]        # keep_ratio: mmcv Resize(scale=(long_max, short_max)); stretch_bicubic: (h, w)
    crop: int | None              # sliding window size; None = whole image
    stride: int | None
    softmax_stage: str            # "window" (MaskCLIP, CLIP-DINOiser) | "final" (NACLIP)
    logit_scale: float
    renormalize_experts: bool
    renormalize_fallback: bool
    window_fp16: bool
    protocol: str                 # "authors" | "paper"
    #: cosines rounded to fp16 before anything else (an fp16 model on CUDA: the authors' NACLIP, protocol §1.2)
    logits_fp16: bool = False
    #: the window-averaged canvas of the single-template maps (ranking, per-template evaluation) is fp16: the
    #: authors' compute_metric on ADE20K/COCO-Stuff (protocol §2.4); the baseline and FLOSS keep an fp32 canvas
    canvas_fp16: bool = False
    # optional (defaults omitted by to_dict, so settings stored before the field existed read back equal)
    resize: str = "keep_ratio"    # one of RESIZE_MODES

    def __post_init__(self):
        if (not isinstance(self.scale, tuple) or len(self.scale) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in self.scale)):
            raise ValueError(f"scale: expected a tuple of two positive ints (long_max, short_max), "
                             f"received {self.scale!r}")
        if (self.crop is None) != (self.stride is None):
            raise ValueError(f"crop/stride: expected both None (whole image) or both set, received "
                             f"crop={self.crop!r}, stride={self.stride!r}")
        for name in ("crop", "stride"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ValueError(f"{name}: expected a positive int or None, received {v!r}")
        if self.softmax_stage not in SOFTMAX_STAGES:
            raise ValueError(f"softmax_stage: expected one of {SOFTMAX_STAGES}, received {self.softmax_stage!r}")
        if isinstance(self.logit_scale, bool) or not isinstance(self.logit_scale, (int, float)) \
                or not self.logit_scale > 0:
            raise ValueError(f"logit_scale: expected a positive number, received {self.logit_scale!r}")
        for name in ("renormalize_experts", "renormalize_fallback", "window_fp16", "logits_fp16", "canvas_fp16"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, received {getattr(self, name)!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol: expected one of {PROTOCOLS}, received {self.protocol!r}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize: expected one of {RESIZE_MODES}, received {self.resize!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (``scale`` as a list); optional fields at their default are left out, so caches
        and fingerprints written before such a field existed stay valid."""
        d = dataclasses.asdict(self)
        d["scale"] = list(self.scale)
        d["logit_scale"] = float(self.logit_scale)
        for f in dataclasses.fields(self):
            if f.default is not dataclasses.MISSING and d[f.name] == f.default:
                del d[f.name]
        d.pop("canvas_fp16", None)   # written only where it differs from what settings without it imply
        if self.canvas_fp16 != _implied_canvas_fp16(d):
            d["canvas_fp16"] = self.canvas_fp16
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProtocolSettings":
        """Inverse of :meth:`to_dict`; missing or unknown keys are errors (fields with a default may be absent:
        caches written before they existed)."""
        if not isinstance(d, dict):
            raise TypeError(f"settings: expected a dict, received {type(d).__name__}")
        fields = dataclasses.fields(cls)
        names = [f.name for f in fields]
        required = [f.name for f in fields if f.default is dataclasses.MISSING]
        missing, unknown = sorted(set(required) - set(d)), sorted(set(d) - set(names))
        if missing or unknown:
            raise ValueError(f"settings: expected the keys {required} (optional: "
                             f"{[n for n in names if n not in required]}); missing {missing}, unknown {unknown}")
        kw = dict(d)
        if isinstance(kw["scale"], list):   # JSON has no tuples
            kw["scale"] = tuple(kw["scale"])
        if isinstance(kw["logit_scale"], int) and not isinstance(kw["logit_scale"], bool):
            kw["logit_scale"] = float(kw["logit_scale"])
        kw.setdefault("canvas_fp16", _implied_canvas_fp16(kw))
        return cls(**kw)


def _implied_canvas_fp16(d: dict[str, Any]) -> bool:
    """``canvas_fp16`` of settings stored without it (before the field existed, the fp16 canvas went with the fp16
    window cast of per-window softmax models)."""
    return d["softmax_stage"] == "window" and bool(d["window_fp16"])


def settings_for(model: str, dataset: str, protocol: str = "authors", precision: str = "fp32") -> ProtocolSettings:
    """Protocol settings of FLOSS protocol §2.4 (``"authors"``) or of the paper's text (``"paper"``).

    * authors — MaskCLIP and CLIP-DINOiser both use CLIP-DINOiser's configs: short side 448 (Cityscapes
      (896, 448), BDD (1280, 448), ACDC (796, 448), Mapillary (1920, 448), others (2048, 448)), 448 windows
      with stride 224, per-window softmax, un-renormalised expert/fallback classifiers. NACLIP: (2048, 336),
      driving sets (2048, 560), 224/112 windows (VOC20: whole image), softmax after the final resize,
      renormalised classifiers. Window outputs are cast to fp16 on ADE20K/COCO-Stuff, where the canvas of the
      single-template maps (ranking, per-template evaluation) is fp16 too, for every model (``canvas_fp16``).
    * paper — every classifier renormalised, no fp16 cast; MaskCLIP at (2048, 336) (driving sets 560) with
      224/112 windows as the paper's text says; CLIP-DINOiser and NACLIP as above.

    ``precision="fp16"`` (the model runs in fp16, e.g. the authors' NACLIP on CUDA): cosines are rounded to fp16
    and every upsampled window output is fp16 (their fp16 logits are interpolated in fp16), on every dataset.
    The paper never ran SCLIP, ClearCLIP, GEM, ResCLIP or SC-CLIP: for them ``"paper"`` equals ``"authors"`` except
    the fp16 cast. All of them take the softmax after the final resize (as NACLIP) with renormalised classifiers.

    * sclip — SCLIP's configs: (2048, 336), COCO-Stuff (2048, 448), driving sets (2048, 560); 224/112 windows
      on every dataset including VOC20; logit scale 40.
    * clearclip — ClearCLIP's configs: (2048, 448); 448/224 windows, driving sets 224/224; logit scale 50.
    * gem — ClearCLIP's re-run protocol (GEM ships no evaluation code): exactly ClearCLIP's settings.
    * gem_quoted — GEM as ClearCLIP re-ran it (last block's self-self output only): ClearCLIP's settings too.
    * resclip — ResCLIP's configs (OVSS-models-2025 §1.5): (2048, 336), driving sets (2048, 560) (COCO-Stuff 336,
      not SCLIP's 448); 224/112 windows, VOC20 whole image (NACLIP's ``slide_crop=0``); logit scale 40. Its
      per-dataset temp_thd / tau / lambda live in :data:`floss.models.resclip.DATASET_PARAMS`.
    * scclip — SC-CLIP's configs (§2.4): as resclip but 224/112 windows on every dataset including VOC20.
    * gem_448 — GEM's own library transform: PIL bicubic to 448x448 ignoring the aspect ratio
      (``resize="stretch_bicubic"``), whole image, no sliding window; logit scale 50 as the re-run protocol.
    """
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"precision: expected 'fp32' or 'fp16', received {precision!r}")
    if model not in PROTOCOL_MODELS:
        raise ValueError(f"model: expected one of {PROTOCOL_MODELS} (a custom model builds ProtocolSettings "
                         f"itself), received {model!r}")
    if dataset not in KNOWN_DATASETS:
        raise ValueError(f"dataset: expected one of {KNOWN_DATASETS}, received {dataset!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {PROTOCOLS}, received {protocol!r}")
    authors = protocol == "authors"
    driving = dataset in DRIVING_DATASETS
    fp16 = (authors and dataset in _FP16_WINDOW_DATASETS) or precision == "fp16"
    # the fp16 canvas of the authors' compute_metric (ADE/COCO), and of an fp16 per-window softmax model
    stage = "window" if model in ("maskclip", "clipdinoiser") else "final"
    canvas16 = (authors and dataset in _FP16_WINDOW_DATASETS) or (precision == "fp16" and stage == "window")
    if model in ("sclip", "clearclip", "gem", "gem_448", "gem_quoted", "resclip", "scclip"):
        resize = "keep_ratio"
        if model in ("resclip", "scclip"):
            whole = model == "resclip" and dataset == "pascalvoc20"
            scale, logit_scale = (2048, _SHORT_SIDE_2025.get(dataset, 336)), 40.0
            crop, stride = (None, None) if whole else (224, 112)
        elif model == "sclip":
            scale, crop, stride, logit_scale = (2048, _SCLIP_SHORT_SIDE.get(dataset, 336)), 224, 112, 40.0
        elif model == "gem_448":
            scale, crop, stride, logit_scale, resize = (448, 448), None, None, 50.0, "stretch_bicubic"
        else:   # ClearCLIP, and GEM under ClearCLIP's re-run (both forms); Cityscapes windows do not overlap
            scale, (crop, stride), logit_scale = (2048, 448), (224, 224) if driving else (448, 224), 50.0
        return ProtocolSettings(scale=scale, crop=crop, stride=stride, softmax_stage="final",
                                logit_scale=logit_scale, renormalize_experts=True, renormalize_fallback=True,
                                window_fp16=fp16, protocol=protocol, resize=resize,
                                logits_fp16=precision == "fp16", canvas_fp16=canvas16)
    if model == "naclip" or (model == "maskclip" and not authors):
        scale = (2048, 560) if driving else (2048, 336)
        whole = model == "naclip" and dataset == "pascalvoc20"   # NACLIP's slide_crop=0 on VOC20
        crop, stride = (None, None) if whole else (224, 112)
    else:
        scale, crop, stride = _DINOISER_SCALES.get(dataset, (2048, 448)), 448, 224
    renorm = model == "naclip" or not authors
    return ProtocolSettings(scale=scale, crop=crop, stride=stride,
                            softmax_stage=stage, logit_scale=100.0, renormalize_experts=renorm,
                            renormalize_fallback=renorm, window_fp16=fp16, protocol=protocol,
                            logits_fp16=precision == "fp16", canvas_fp16=canvas16)


class ImageFeatures(NamedTuple):
    """Per-window dense features of one image (what the cache stores)."""

    feats: torch.Tensor            # [Nw, D, gh, gw] float32, L2-normalised per patch
    boxes: np.ndarray              # [Nw, 4] int32 (y1, y2, x1, x2) in resized-image coordinates
    resized_size: tuple[int, int]  # (h, w) after the resize (keep-ratio or stretched)
    orig_size: tuple[int, int]     # (H, W) of the input image


class DenseModel(abc.ABC):
    """A frozen image-text model producing L2-normalised dense features.

    Subclasses set ``name``, ``feature_dim``, ``patch_size`` (and ``device``) and implement
    :meth:`encode_text` and :meth:`window_features`. ``pad_to_patch = True`` zero-pads each window
    (bottom/right, in [0, 1] space, before normalisation) to a multiple of ``patch_size``, as CLIP-DINOiser.
    """

    name: str = "dense-model"
    feature_dim: int
    patch_size: int
    device: torch.device = torch.device("cpu")
    #: the precision the original implementation runs in on CUDA ("fp16" for OpenAI-loader models like NACLIP);
    #: ``precision="auto"`` resolves to it on CUDA and to fp32 on CPU (floss.protocol.extraction.resolve_precision)
    authors_precision: str = "fp32"
    precision: str = "fp32"
    pad_to_patch: bool = False
    window_batch_size: int = 8

    @abc.abstractmethod
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings [n, D] (float32)."""

    @abc.abstractmethod
    def window_features(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised windows [B, 3, h, w] -> L2-normalised features [B, D, h // p, w // p]."""

    def protocol_settings(self, dataset: str, protocol: str = "authors") -> ProtocolSettings:
        """Resizing, windows and softmax placement of this model on ``dataset``.

        The built-in models use the authors' table (:func:`settings_for`); a plug-in model overrides this
        method (or sets ``protocol_model`` to borrow a built-in model's settings)."""
        return settings_for(getattr(self, "protocol_model", None) or self.name, dataset, protocol,
                            precision=getattr(self, "precision", "fp32"))

    def prepare(self, image: np.ndarray, settings: ProtocolSettings) -> preprocess.PreparedImage:
        """The CPU half of :meth:`extract` (resize, windows, padding, normalisation); safe in worker processes."""
        if not isinstance(settings, ProtocolSettings):
            raise TypeError(f"settings: expected ProtocolSettings, received {type(settings).__name__}")
        return preprocess.prepare_image(image, settings, self.patch_size if self.pad_to_patch else None)

    @torch.inference_mode()
    def encode(self, prepared: preprocess.PreparedImage, *, batch_size: int | None = None) -> ImageFeatures:
        """The encoder half of :meth:`extract`: window features on ``device`` (fp16-rounded for fp16 models)."""
        batch_size = batch_size or self.window_batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, received {batch_size}")
        crops = prepared.crops.to(self.device, non_blocking=True)
        outs = [self._checked_window_features(crops[i:i + batch_size]) for i in range(0, len(crops), batch_size)]
        feats = torch.cat(outs).float()
        if getattr(self, "precision", "fp32") == "fp16":
            feats = feats.half().float()      # the fp16 model's features are fp16 values (the authors' NACLIP)
        return ImageFeatures(feats, prepared.boxes, prepared.resized_size, prepared.orig_size)

    def extract(self, image: np.ndarray, settings: ProtocolSettings, *,
                batch_size: int | None = None) -> ImageFeatures:
        """Resize, cut into windows and encode one uint8 RGB (H, W, 3) image; features stay on ``device``."""
        return self.encode(self.prepare(image, settings), batch_size=batch_size)

    def _checked_window_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.window_features(x)
        p = self.patch_size
        want = [x.shape[0], self.feature_dim, x.shape[2] // p, x.shape[3] // p]
        if not isinstance(out, torch.Tensor) or list(out.shape) != want:
            got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"{type(self).__name__}.window_features: expected shape {want} for input "
                             f"{list(x.shape)}, received {got}")
        norms = out.float().norm(dim=1)
        if not bool(((norms - 1).abs() < 1e-2).all()):
            raise ValueError(f"{type(self).__name__}.window_features: expected L2-normalised features along "
                             f"dim 1, received norms in [{float(norms.min()):.4g}, {float(norms.max()):.4g}]")
        return out


# ---------------------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, Callable[..., DenseModel]] = {}
_PRECISION: dict[str, str | Callable[[], str]] = {}
_PRECISIONS = ("fp32", "fp16")


def register_model(name: str, factory: Callable[..., DenseModel], *, overwrite: bool = False,
                   authors_precision: str | Callable[[], str] = "fp32") -> None:
    """Register ``factory(**kwargs) -> DenseModel`` under ``name`` (``overwrite=True`` to replace).

    ``authors_precision`` is the precision the original runs in on CUDA (``precision="auto"`` picks it there), or
    a function returning it (the built-in models read it from their class, imported only when asked)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string, received {name!r}")
    if not callable(factory):
        raise TypeError(f"factory: expected a callable returning a DenseModel, received {type(factory).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"model {name!r} is already registered; pass overwrite=True to replace it")
    if not callable(authors_precision) and authors_precision not in _PRECISIONS:
        raise ValueError(f"authors_precision: expected 'fp32' or 'fp16', received {authors_precision!r}")
    _REGISTRY[name] = factory
    _PRECISION[name] = authors_precision


def authors_precision(name: str) -> str:
    """The precision model ``name``'s original implementation runs in on CUDA (fp32 unless registered otherwise)."""
    if name not in _REGISTRY:
        raise ValueError(f"model: expected one of {available_models()}, received {name!r}")
    precision = _PRECISION.get(name, "fp32")
    precision = precision() if callable(precision) else precision
    if precision not in _PRECISIONS:
        raise ValueError(f"model {name!r}: authors_precision must be 'fp32' or 'fp16', received {precision!r}")
    return precision


def available_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> DenseModel:
    """Build a registered model, e.g. ``create_model("naclip", pretrained="openai", device="cuda")``."""
    if name not in _REGISTRY:
        raise ValueError(f"model: expected one of {available_models()} (or register_model(name, factory) "
                         f"first), received {name!r}")
    model = _REGISTRY[name](**kwargs)
    if not isinstance(model, DenseModel):
        raise TypeError(f"the factory registered as {name!r} returned {type(model).__name__}, not a DenseModel")
    return model
