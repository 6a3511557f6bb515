"""The protocol step: the only place that turns cached window features into per-pixel class scores.

Per window, cosines ``feats · Wᵀ`` on the patch grid; then, by ``settings.softmax_stage`` (protocol §2.3–2.4):

* ``"window"`` (MaskCLIP, CLIP-DINOiser): softmax(logit_scale·cos) per window on the patch grid, bilinear
  upsampling (align_corners=False) to the window, average of the *probabilities* over windows, bilinear resize
  to the original size;
* ``"final"`` (NACLIP): the same with raw cosines, softmax(logit_scale·) after the resize to the original size.

``settings.window_fp16`` casts every upsampled window output to fp16 before accumulation (authors, ADE/COCO).
Queries -> classes: class score = max over the class's query words (NACLIP VOC20 synonyms; unnormalised on
purpose). FLOSS (``protocol="authors"``): per window, expert and fallback softmax on the patch grid, upsampled
to the window, fused per pixel (:func:`floss.fusion.fuse`), fused vectors averaged over windows, resized, argmax
(§4.1). ``protocol="paper"``: every expert map is classified as above and Eq. 7 is applied at the final size.

Memory is bounded for K = 171 experts: maps are rendered band by band of output rows with separable bilinear
matrices (exactly the weights of ``F.interpolate``), so a [K, K, H, W] tensor never exists.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from floss._argmax import per_template_confusion
from floss._interp import (interp_matrix as _interp_matrix, matrix_upsample_rows, rows_matmul as _rows_matmul,
                           separable as _separable)
from floss.cache import CacheError, FeatureCache, ImageRecord
from floss.evaluation import confusion_matrix, miou
from floss.fusion import fuse_many
from floss.text import averaged_classifier, expand_experts_to_queries, expert_classifiers

logger = logging.getLogger(__name__)

#: float elements per rendered band (window upsampling temporaries and outputs), ~512 MB in fp32
MAX_BAND_ELEMENTS = 1 << 27
IGNORE_INDEX = 255


class _Renderer:
    """Window maps [Nw, N, gh, gw] -> bands of the window-averaged map, at the resized or the original size."""

    def __init__(self, record: ImageRecord, out: str | tuple[int, int], device: torch.device):
        if out not in ("orig", "resized") and not isinstance(out, tuple):
            raise ValueError(f"out: expected 'orig' or 'resized', received {out!r}")
        self.dev = str(device)
        self.boxes = [tuple(int(v) for v in b) for b in record.boxes.tolist()]
        self.h, self.w = (int(s) for s in record.resized_size)
        size = {"orig": record.orig_size, "resized": record.resized_size}.get(out, out)
        self.out_size = (int(size[0]), int(size[1]))
        self.resize = self.out_size != (self.h, self.w)
        count = torch.zeros(self.h, self.w, device=device)
        for y1, y2, x1, x2 in self.boxes:
            count[y1:y2, x1:x2] += 1
        if bool((count == 0).any()):
            raise CacheError(f"record {record.id!r}: the windows {self.boxes} do not cover the resized image "
                             f"{self.h}x{self.w}")
        self.count = count
        if self.resize:
            self.rows = _interp_matrix(self.h, self.out_size[0], self.dev)
            self.cols = _interp_matrix(self.w, self.out_size[1], self.dev)
            nz = self.rows != 0
            self.lo = nz.int().argmax(1).tolist()                               # first source row per output row
            self.hi = (self.h - nz.flip(1).int().argmax(1)).tolist()            # one past the last
        row_iv = sorted({(y1, y2) for y1, y2, _, _ in self.boxes})
        col_iv = sorted({(x1, x2) for _, _, x1, x2 in self.boxes})
        self.grid = len(self.boxes) == len(row_iv) * len(col_iv)   # windows = row intervals x column intervals
        self._composed: dict = {}

    def _axis_matrix(self, interval: tuple[int, int], n_grid: int, axis: int) -> torch.Tensor:
        """[n_out, n_grid]: grid -> window upsampling, / window count along the axis, -> final resize, composed."""
        key = (interval, n_grid, axis)
        if key not in self._composed:
            lo, hi = interval
            n_in, n_out = (self.h, self.out_size[0]) if axis == 0 else (self.w, self.out_size[1])
            ivs = {(b[2 * axis], b[2 * axis + 1]) for b in self.boxes}
            count = torch.zeros(n_in, device=self.dev)
            for a, b in ivs:
                count[a:b] += 1
            # composed in float64 (exact weights, no GEMM-kernel dependence); render_composed keeps float64 on CPU
            up = _interp_matrix(n_grid, hi - lo, self.dev).double() / count[lo:hi, None].double()
            final = (self.rows if axis == 0 else self.cols) if self.resize else torch.eye(n_in, device=self.dev)
            self._composed[key] = final[:, lo:hi].double() @ up
        return self._composed[key]

    def fast_ok(self, maps: torch.Tensor) -> bool:
        """Whether composing the linear steps is cheaper than rendering the canvas (small outputs, e.g. tests)."""
        if not self.grid:
            return False
        gh, gw = maps.shape[-2:]
        H, W = self.out_size
        composed = sum(gh * W * (gw + H) for _ in self.boxes)
        canvas = sum(4 * (y2 - y1) * (x2 - x1) for y1, y2, x1, x2 in self.boxes) + 4 * H * W + self.h * self.w
        return composed < canvas

    def render_composed(self, maps: torch.Tensor, rows: tuple[int, int]) -> torch.Tensor:
        """Linear path (no per-window cast or fusion): sum over windows of A_w · P_w · B_wᵀ, A/B composed
        from upsampling, count division (separable on a window grid) and final resize; equal up to rounding.
        On CPU in float64, rounded once to float32: the same bits whatever BLAS kernel the CPU selects."""
        a, b = rows
        out = None
        wide = torch.float64 if maps.device.type == "cpu" else torch.float32
        for (y1, y2, x1, x2), m in zip(self.boxes, maps):
            A = self._axis_matrix((y1, y2), m.shape[-2], 0)[a:b].to(wide)
            B = self._axis_matrix((x1, x2), m.shape[-1], 1).to(wide)
            part = _rows_matmul(A, torch.matmul(m.to(wide), B.T))
            out = part if out is None else out + part
        return out.to(maps.dtype)

    def bands(self, channels: int, out_channels: int | None = None, max_elements: int | None = None):
        """Output row ranges whose rendering stays within ``max_elements`` floats: ``channels`` per-window
        channels at window width, ``out_channels`` (default ``channels``) canvas/output channels at image width."""
        max_elements = MAX_BAND_ELEMENTS if max_elements is None else max_elements
        window_width = max(x2 - x1 for _, _, x1, x2 in self.boxes)
        per_row = max(channels * window_width, (out_channels or channels) * max(self.w, self.out_size[1]), 1)
        budget_rows = max(1, max_elements // per_row)
        start, H = 0, self.out_size[0]
        while start < H:
            stop = start + 1
            while stop < H and stop - start < budget_rows:
                r0, r1 = self.canvas_rows(start, stop + 1)
                if r1 - r0 > budget_rows:
                    break
                stop += 1
            yield start, stop
            start = stop

    def canvas_rows(self, a: int, b: int) -> tuple[int, int]:
        """Canvas rows ``[r0, r1)`` behind output rows ``[a, b)``: the whole canvas for the whole output (resized
        by ``F.interpolate`` of the whole canvas, the authors' computation), else the rows the band reads."""
        if not self.resize:
            return a, b
        return (0, self.h) if (a, b) == (0, self.out_size[0]) else (self.lo[a], self.hi[b - 1])

    def render(self, maps: torch.Tensor, rows: tuple[int, int],
               per_window: Callable[[torch.Tensor], torch.Tensor] | None = None,
               window_fp16: bool = False, canvas_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N', r1 - r0, W_out] band of the merged map (N' = N, or the channels ``per_window`` returns)."""
        if per_window is None and not window_fp16 and canvas_dtype == torch.float32 and self.fast_ok(maps):
            return self.render_composed(maps, rows)
        a, b = rows
        r0, r1 = self.canvas_rows(a, b)
        canvas = None
        for (y1, y2, x1, x2), m in zip(self.boxes, maps):
            ys0, ys1 = max(y1, r0), min(y2, r1)
            if ys0 >= ys1:
                continue
            if m.shape[0] * (y2 - y1) * (x2 - x1) <= MAX_BAND_ELEMENTS:   # the window fits: native kernel
                # contiguous: a channels-last-like layout takes another kernel, with other rounding
                up = F.interpolate(m.contiguous()[None], size=(y2 - y1, x2 - x1), mode="bilinear",
                                   align_corners=False)[0]
                up = up[:, ys0 - y1:ys1 - y1]   # (bit-identical to mmseg's resize)
            else:                        # a band of rows: the same weights as matrices, only those rows
                # (= _rows_matmul(uh[rows], m @ uwᵀ) bit for bit, without the dense products)
                up = matrix_upsample_rows(m, (y2 - y1, x2 - x1), slice(ys0 - y1, ys1 - y1))
            if window_fp16:
                up = up.half()
            if per_window is not None:
                up = per_window(up)
            if canvas is None:
                canvas = torch.zeros(up.shape[0], r1 - r0, self.w, dtype=canvas_dtype, device=up.device)
            canvas[:, ys0 - r0:ys1 - r0, x1:x2] += up.to(canvas_dtype)
        canvas = canvas / self.count[r0:r1].to(canvas_dtype)
        if not self.resize:
            return canvas
        canvas = canvas.float()
        if (a, b) == (0, self.out_size[0]):
            return F.interpolate(canvas[None], size=self.out_size, mode="bilinear", align_corners=False)[0]
        return _separable(self.rows[a:b, r0:r1], canvas, self.cols)


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def window_scores(record: ImageRecord, classifiers: torch.Tensor, settings, softmax: bool,
                  device=None) -> torch.Tensor:
    """Per-window cosines (or softmax(logit_scale·cos) over queries) on the patch grid: [Nw, C, Q, gh, gw]."""
    if not isinstance(classifiers, torch.Tensor) or classifiers.ndim != 3:
        got = tuple(classifiers.shape) if isinstance(classifiers, torch.Tensor) else type(classifiers).__name__
        raise ValueError(f"classifiers: expected a tensor [C, Q, D], received {got}")
    if classifiers.shape[2] != record.feats.shape[1]:
        raise ValueError(f"classifiers: expected feature dimension D = {record.feats.shape[1]} (cache), received "
                         f"{classifiers.shape[2]}")
    device = _device(device) if device is not None else classifiers.device
    cos = cosines(record.feats.to(device), classifiers.to(device))
    if getattr(settings, "logits_fp16", False):        # an fp16 model's logits are fp16 values (protocol §1.2)
        cos = cos.half().float()
    return stable_softmax(settings.logit_scale * cos, dim=2) if softmax else cos


def cosines(feats: torch.Tensor, classifiers: torch.Tensor) -> torch.Tensor:
    """``[Nw, D, gh, gw] · [C, Q, D] -> [Nw, C, Q, gh, gw]`` float32.

    On CPU the dot products are accumulated in float64 and rounded once to float32 — the correctly rounded fp32
    cosine (up to a double rounding), so the result does not depend on which BLAS kernel the CPU's instruction
    set selects (a float32 GEMM rounds differently on AVX2 and AVX-512 machines). On CUDA: a float32 GEMM."""
    if feats.device.type == "cpu":
        return torch.einsum("ndhw,cqd->ncqhw", feats.double(), classifiers.double()).float()
    return torch.einsum("ndhw,cqd->ncqhw", feats.float(), classifiers.float())


def stable_softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``exp(x − max) / Σ exp(x − max)`` as separate elementwise ops and one sum: the same bits on every CPU
    (``torch.softmax``'s fused kernel rounds differently with the vector width of the instruction set)."""
    e = torch.exp(x - x.amax(dim=dim, keepdim=True))
    return e / e.sum(dim=dim, keepdim=True)


def classify(record: ImageRecord, classifiers: torch.Tensor, settings, out: str = "orig", logits: bool = False,
             device=None, canvas_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-pixel query scores [C, Q, H, W] of C classifiers [C, Q, D] for one cached image.

    ``out="orig"``: at the label size (the authors' protocol); ``"resized"``: the window-averaged map before the
    final resize (for ``"final"`` the softmax is then taken at that size). ``logits=True``: window-averaged raw
    cosines without any softmax. ``canvas_dtype``: of the window-averaged canvas (ranking: fp16 where
    ``settings.canvas_fp16``). Merge queries into classes with :func:`merge_queries`.
    """
    device = _device(device) if device is not None else classifiers.device
    renderer = _Renderer(record, out, device)
    final = settings.softmax_stage == "final" or logits
    maps = window_scores(record, classifiers, settings, softmax=not final, device=device)
    nw, c, q = maps.shape[:3]
    maps = maps.reshape(nw, c * q, *maps.shape[3:])
    result = torch.empty(c * q, *renderer.out_size, device=device)
    for a, b in renderer.bands(c * q):
        result[:, a:b] = renderer.render(maps, (a, b), window_fp16=settings.window_fp16, canvas_dtype=canvas_dtype)
    result = result.reshape(c, q, *renderer.out_size)
    if settings.softmax_stage == "final" and not logits:
        result = stable_softmax(settings.logit_scale * result, dim=1)
    return result


def merge_queries(scores: torch.Tensor, query_to_class: Sequence[int], num_classes: int) -> torch.Tensor:
    """[..., Q, H, W] query scores -> [..., K, H, W] class scores (max over each class's query words)."""
    q2c = list(query_to_class)
    if scores.shape[-3] != len(q2c):
        raise ValueError(f"scores: expected Q = {len(q2c)} queries on dim -3, received shape {tuple(scores.shape)}")
    if q2c == list(range(num_classes)):
        return scores
    groups = [[q for q, k in enumerate(q2c) if k == c] for c in range(num_classes)]
    return torch.stack([scores[..., g, :, :].amax(dim=-3) for g in groups], dim=-3)


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
    """The :class:`floss.stats.TemplateStats` that :func:`rank_record` fills."""
    from floss.stats import TemplateStats   # imported here: only ranking needs it
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
    chunk = max(1, min(template_chunk, MAX_BAND_ELEMENTS // max(1, Q * H * W)))
    for start in range(0, M, chunk):
        ids = list(range(start, min(start + chunk, M)))
        if resampled:
            renderer = _Renderer(record, out, device)
            maps = window_scores(record, text[ids], settings, softmax=True, device=device)
            maps = maps.reshape(maps.shape[0], -1, *maps.shape[3:])
            probs = torch.cat([renderer.render(maps, band, window_fp16=settings.window_fp16, canvas_dtype=canvas_dtype)
                               for band in renderer.bands(maps.shape[1])], dim=1)
            probs = probs.reshape(len(ids), Q, H, W)
        else:
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
        if per_template:   # exact shortcut of rendering every template's map (floss._argmax)
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
    return results
