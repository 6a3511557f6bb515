"""Window maps -> per-pixel maps: cosines, per-window softmax, window upsampling, averaging over windows and the
resize to the output size, band by band of output rows (the renderer), and the query -> class merge.

The authors' computation is the reference: each window's map bilinearly upsampled (``F.interpolate``,
align_corners=False) into a canvas, divided by the per-pixel window count, one ``F.interpolate`` of the whole
canvas to the original size. Bands of rows make the same computation fit a memory budget: a band covering every
output row resizes the whole canvas with ``F.interpolate``; other bands use the separable interpolation matrices
(:mod:`floss.core.kernels.interp`), exact to about one float32 ulp; ``tests/test_render_sizes.py`` checks every path against
the reference over a grid of sizes and every model's settings.

Layer: imports torch, :mod:`floss.core.kernels.interp` and :mod:`floss.data.cache` (records) only; :mod:`floss.protocol` (ranking,
evaluation) and :mod:`floss.protocol.kernels.argmax` (the per-template fast path) build on it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from floss.core.kernels.interp import (interp_matrix as _interp_matrix, rows_matmul as _rows_matmul, separable as _separable,
                           upsample_rows)
from floss.data.cache import CacheError, ImageRecord

__all__ = ["MAX_BAND_ELEMENTS", "IGNORE_INDEX", "window_scores", "cosines", "stable_softmax", "classify",
           "merge_queries"]

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
            else:                        # only the rows of the band: the same bits as F.interpolate above
                up = upsample_rows(m.contiguous(), (y2 - y1, x2 - x1), slice(ys0 - y1, ys1 - y1)).transpose(0, 1)
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
