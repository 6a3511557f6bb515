"""The protocol step: the only place that turns cached window features into per-pixel class scores.

Per window, cosines ``feats · Wᵀ`` on the patch grid; then, by ``settings.softmax_stage`` (protocol §2.3–2.4):

* ``"window"`` (MaskCLIP, CLIP-DINOiser): softmax(logit_scale·cos) per window on the patch grid, bilinear
  upsampling (align_corners=False) to the window, average of the *probabilities* over windows, bilinear resize
  to the original size;
* ``"final"`` (NACLIP): the same with raw cosines, softmax(logit_scale·) after the resize to the original size.

``settings.window_fp16`` casts every upsampled window output to fp16 before accumulation (authors, ADE/COCO).
Queries -> classes: class score = max over the class's query words (NACLIP VOC20 synonyms; unnormalised on
purpose). FLOSS (``protocol="authors"``): per window, expert and fallback softmax on the patch grid, upsampled
to the window, fused per pixel (:func:`floss.core.fusion.fuse`), fused vectors averaged over windows, resized, argmax
(§4.1). ``protocol="paper"``: every expert map is classified as above and Eq. 7 is applied at the final size.

Memory is bounded for K = 171 experts: maps are rendered band by band of output rows with separable bilinear
matrices (exactly the weights of ``F.interpolate``), so a [K, K, H, W] tensor never exists.

Layer 4, the evaluation protocol. This package (``floss.protocol``) ranks and evaluates from a cache; beside it,
:mod:`~floss.protocol.rendering` (window maps -> per-pixel maps, the renderer), :mod:`~floss.protocol.extraction`
(images -> window features and statistics), :mod:`~floss.protocol.experiments` (the paper's analyses on caches)
and :mod:`~floss.protocol.kernels` (the per-template fast path). May import: :mod:`floss.util`,
:mod:`floss.core`, :mod:`floss.models`, :mod:`floss.data`. Never the CLI, the report or the pipeline.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from floss.protocol.kernels.argmax import per_template_confusion
from floss.data.cache import CacheError, FeatureCache, ImageRecord
from floss.core.evaluation import confusion_matrix, miou
from floss.core.fusion import fuse_many
# the renderer and the per-window scores: floss.protocol.rendering (shared with the per-template fast path); re-exported
from floss.protocol import rendering
from floss.protocol.rendering import (IGNORE_INDEX, _device, _Renderer, classify, cosines, merge_queries,  # noqa: F401
                             stable_softmax, window_scores)
from floss.core.text import averaged_classifier, expand_experts_to_queries, expert_classifiers

logger = logging.getLogger(__name__)


def _window_averaged_features(record: ImageRecord, device: torch.device) -> torch.Tensor:
    """Window-averaged features [D, h', w'] on the patch-grid resolution of the resized image (for ITI).

    Averaging at pixel resolution would cost D·h·w floats per image; the patch grid keeps the same information.
    """
    y1, y2, x1, x2 = (int(v) for v in record.boxes[0])
    gh, gw = record.feats.shape[-2:]
    h, w = record.resized_size
    size = (max(1, round(h * gh / (y2 - y1))), max(1, round(w * gw / (x2 - x1))))
    renderer = _Renderer(record, size, device)
    feats = record.feats.to(device, torch.float32)
    out = torch.cat([renderer.render(feats, band) for band in renderer.bands(feats.shape[1])], dim=1)
    return F.normalize(out, dim=0)


def new_template_stats(metrics: Sequence[str], num_templates: int, num_classes: int, feature_dim: int,
                       track_images: bool, device):
    """The :class:`floss.core.stats.TemplateStats` that :func:`rank_record` fills."""
    from floss.core.stats import TemplateStats   # imported here: only ranking needs it
    return TemplateStats(num_templates, num_classes, metrics=tuple(metrics),
                         feature_dim=feature_dim if "iti" in metrics else None, track_images=track_images,
                         device=device)


def rank_record(st, record: ImageRecord, text: torch.Tensor, settings, query_to_class: Sequence[int],
                template_chunk: int = 8) -> None:
    """Add one image to the statistics ``st`` of the M single-template classifiers (protocol §3).

    ``text`` [M, Q, D] on the device of the computation. ``"window"``: window-averaged probabilities resized to the
    original size (no re-softmax). ``"final"``: cosines are averaged, resized to the original size, then
    softmax(logit_scale·), then the synonym max (unnormalised, ``normalized=False``). ``settings.canvas_fp16``:
    the averaged canvas is fp16 (the authors' compute_metric on ADE/COCO), read in fp32 for the resize.
    """
    device = text.device
    M, Q, _ = text.shape
    K = st.num_classes
    metrics = st.metrics
    # "window" with the fp16 canvas: the canvas at the resized size, upsampled by TemplateStats; otherwise the
    # map at the original size directly (the same bilinear resize, cheapest path chosen per image)
    resampled = settings.canvas_fp16 and settings.softmax_stage == "window"
    canvas_dtype = torch.float16 if settings.canvas_fp16 else torch.float32
    feats = _window_averaged_features(record, device) if "iti" in metrics else None
    out = "resized" if resampled else "orig"
    H, W = record.resized_size if resampled else record.orig_size
    chunk = max(1, min(template_chunk, rendering.MAX_BAND_ELEMENTS // max(1, Q * H * W)))
    for start in range(0, M, chunk):
        ids = list(range(start, min(start + chunk, M)))
        # the fp16 canvas comes back as float32 (an exact copy); TemplateStats reads either in float32
        probs = classify(record, text[ids], settings, out=out, device=device, canvas_dtype=canvas_dtype)
        probs = merge_queries(probs, query_to_class, K)
        st.update(probs, size=tuple(record.orig_size) if resampled else None, templates=ids, features=feats,
                  image_id=record.id if st.track_images else None, normalized=Q == K)


def rank_cache(cache: FeatureCache, metrics: Sequence[str] = ("entropy",), track_images: bool = False,
               device=None, progress: bool = True, template_chunk: int = 8):
    """Sufficient statistics of the M single-template classifiers over every cached image (protocol §3);
    see :func:`rank_record`. Templates are processed ``template_chunk`` at a time (fewer when the maps would
    exceed the memory budget)."""
    device = _device(device)
    text = cache.text.to(device)
    st = new_template_stats(metrics, text.shape[0], cache.num_classes, text.shape[2], track_images, device)
    settings = cache.settings
    for record in tqdm(cache, desc="rank", disable=None if progress else True):
        rank_record(st, record, text, settings, cache.query_to_class, template_chunk)
    return st


def _iou_dict(conf: torch.Tensor, class_names: Sequence[str], absent: str = "nan") -> dict:
    iou, mean = miou(conf, absent=absent)
    return {"miou": None if math.isnan(mean) else round(100.0 * float(mean), 4),
            "iou": {n: None if math.isnan(v) else 100.0 * float(v) for n, v in zip(class_names, iou.tolist())}}


class Predictor:
    """Per-pixel decisions at the original size of the baseline (W_CLIP) and of FLOSS (one per fusion) for cached
    or freshly encoded images: the decision rules of protocol §2–§4, shared by evaluation and ``floss segment``.

    ``text`` [M, Q, D] on the computation device; ``experts``: one template-id list per class (or None).
    """

    def __init__(self, text: torch.Tensor, settings, query_to_class: Sequence[int], num_classes: int,
                 experts: Sequence[Sequence[int]] | None = None, fusions: Sequence[str] = ("highest",)):
        self.settings, self.q2c, self.K = settings, list(query_to_class), num_classes
        self.Q = text.shape[1]
        self.fusions = list(dict.fromkeys(fusions))
        if experts is not None and len(experts) != num_classes:
            raise ValueError(f"experts: expected one template-id list per class ({num_classes} classes), "
                             f"received {len(experts)}")
        if experts is not None and not self.fusions:
            raise ValueError("fusions: expected at least one fusion strategy with experts")
        self.experts = experts
        self.base_w = averaged_classifier(text, renormalize=True)[None]
        self.floss_w = None
        if experts is not None:
            expert_w = expert_classifiers(text, expand_experts_to_queries(experts, self.q2c),
                                          renormalize=settings.renormalize_experts)
            fallback_w = averaged_classifier(text, renormalize=settings.renormalize_fallback)[None]
            self.floss_w = torch.cat([expert_w, fallback_w])                      # [Q + 1, Q, D]

    @property
    def names(self) -> list[str]:
        """The methods :meth:`bands` yields, in order."""
        return ["baseline"] + ([f"floss_{s}" for s in self.fusions] if self.experts is not None else [])

    def _argmax(self, scores: torch.Tensor) -> torch.Tensor:
        return merge_queries(scores, self.q2c, self.K).argmax(dim=-3)

    def bands(self, record: ImageRecord, renderer: "_Renderer"):
        """Yield ``(method, (row0, row1), prediction [rows, W] int64)`` band by band at the original size."""
        settings, Q, device = self.settings, self.Q, self.base_w.device
        final = settings.softmax_stage == "final"
        # baseline: softmax is monotone per pixel, so the argmax (and the synonym max) needs no softmax
        maps = window_scores(record, self.base_w, settings, softmax=not final, device=device)[:, 0]
        for a, b in renderer.bands(Q):
            yield "baseline", (a, b), self._argmax(renderer.render(maps, (a, b), window_fp16=settings.window_fp16))
        if self.floss_w is None:
            return
        fusions = self.fusions
        paper = settings.protocol == "paper"

        def fuse_all(window: torch.Tensor) -> torch.Tensor:   # [(Q+1)·Q, r, c] -> [S·Q, r, c]
            window = window.reshape(Q + 1, Q, *window.shape[1:])
            return torch.cat(fuse_many(window[:Q], window[Q], fusions))   # checks and agreement shared

        maps = window_scores(record, self.floss_w, settings, softmax=not (paper and final), device=device)
        maps = maps.reshape(maps.shape[0], -1, *maps.shape[3:])
        for a, b in renderer.bands(maps.shape[1], out_channels=len(fusions) * Q):
            if paper:       # Eq. 7 at the final resolution on each expert's window-averaged map
                band = renderer.render(maps, (a, b), window_fp16=settings.window_fp16)
                band = band.reshape(Q + 1, Q, b - a, -1)
                if final:
                    band = stable_softmax(settings.logit_scale * band, dim=1)
                band = torch.cat(fuse_many(band[:Q], band[Q], fusions))
            else:           # the authors: fusion per window at crop resolution (§4.1)
                band = renderer.render(maps, (a, b), per_window=fuse_all, window_fp16=settings.window_fp16)
            for i, s in enumerate(fusions):
                yield f"floss_{s}", (a, b), self._argmax(band[i * Q:(i + 1) * Q])

    def predict(self, record: ImageRecord) -> dict[str, torch.Tensor]:
        """``{method: [H, W] int64}`` class maps of one image at its original size."""
        renderer = _Renderer(record, "orig", self.base_w.device)
        H, W = renderer.out_size
        out = {name: torch.empty(H, W, dtype=torch.int64, device=self.base_w.device) for name in self.names}
        for name, (a, b), pred in self.bands(record, renderer):
            out[name][a:b] = pred
        return out


def evaluate_cache(cache: FeatureCache, experts: Sequence[Sequence[int]] | None = None,
                   fusions: Sequence[str] = ("highest",), per_template: bool = False, device=None,
                   progress: bool = True) -> dict:
    """Confusion matrices and IoU (percent) of the baseline, FLOSS (one entry per fusion) and optionally the M
    single-template classifiers; returns the results.json dict plus ``"confusion": {method: [K, K] int64}``
    (``"per_template"``: [M, K, K]). ``experts``: one template-id list per class (class order of the cache).
    """
    device = _device(device)
    settings = cache.settings
    text = cache.text.to(device)
    M, Q, D = text.shape
    K, q2c = cache.num_classes, cache.query_to_class
    fusions = list(dict.fromkeys(fusions))
    predictor = Predictor(text, settings, q2c, K, experts, fusions)
    conf = {name: torch.zeros(K, K, dtype=torch.int64, device=device) for name in predictor.names}
    if per_template:
        conf["per_template"] = torch.zeros(M, K, K, dtype=torch.int64, device=device)

    for record in tqdm(cache, desc="evaluate", disable=None if progress else True):
        if record.label is None:
            raise CacheError(f"image {record.id!r} of {cache.root} has no label: evaluation needs a labelled split")
        label = record.label.to(device).long()
        renderer = _Renderer(record, "orig", device)
        for name, (a, b), pred in predictor.bands(record, renderer):
            conf[name] += confusion_matrix(pred, label[a:b], K, ignore_index=IGNORE_INDEX).to(device)
        if per_template:   # exact shortcut of rendering every template's map (floss.protocol.kernels.argmax)
            conf["per_template"] += per_template_confusion(record, text, settings, q2c, K, label, device)

    conf = {k: v.cpu() for k, v in conf.items()}
    names = cache.class_names
    methods = {"baseline": _iou_dict(conf["baseline"], names)}
    if experts is not None:
        methods["floss"] = _iou_dict(conf[f"floss_{fusions[0]}"], names)
        methods.update({f"floss_{s}": _iou_dict(conf[f"floss_{s}"], names) for s in fusions})
    m = cache.manifest
    results = {"model": m["model"], "dataset": m["dataset"], "split": m["split"], "methods": methods,
               # per-template IoU as the authors' EntropyMetric computes it (absent classes count 0; §9.12)
               "per_template": ({str(t): _iou_dict(conf["per_template"][t], names, absent="zero") for t in range(M)}
                                if per_template else {}),
               "experts": [list(map(int, e)) for e in experts] if experts is not None else None,
               "config": {"protocol": settings.protocol, "fusions": fusions if experts is not None else [],
                          "num_images": len(cache), "skipped_images": len(m.get("skipped", [])),
                          "settings": m["settings"], "fingerprint": m["fingerprint"]},
               "confusion": conf}
    templates = cache.templates
    if not templates.is_default:       # which prompts the per-template ids and experts mean (CLIP's 80: as before)
        results["templates"] = list(templates)
    return results
