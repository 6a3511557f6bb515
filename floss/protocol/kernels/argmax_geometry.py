"""Window-grid geometry, two-tap arithmetic, uniform cells and composed scores of the per-template fast path.

Owns steps 1 and 2 of :mod:`floss.protocol.kernels.argmax` (see its module docstring): the per-axis taps and supports of a window
grid (:class:`_Axis`, :class:`_Geometry`), the renderer's two-tap rounding order (:func:`_lerp`, :class:`_Taps`),
the per-image state (:class:`_Image`: label histogram per cell, which kernels the renderer takes), the uniform
cells (:func:`_cells`) and the composed scores of the other cells (:class:`_Composed`).

Imports: torch, :mod:`floss.core.kernels.interp` and (lazily) :mod:`floss.protocol.rendering`; never :mod:`floss.protocol`. What is
built from these pieces must equal :func:`floss.protocol.kernels.argmax.per_template_confusion_reference` (the rendering loop).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from floss.core.kernels.interp import bilinear_taps


# ------------------------------------------------------------------------------------------- geometry
class _Axis:
    """One axis (rows or columns) of a window grid: taps from the patch grid to the output, and runs.

    ``intervals``: the distinct window intervals ``(lo, hi)`` along the axis (sorted); ``g``: patch-grid
    size; ``n``: resized size; ``out``: output size. Super index of grid cell ``i`` of interval ``a`` is
    ``a·g + i``.
    """

    def __init__(self, intervals: list[tuple[int, int]], g: int, n: int, out: int):
        self.intervals, self.g, self.n, self.out = intervals, g, n, out
        count = [0] * n
        for lo, hi in intervals:
            for r in range(lo, hi):
                count[r] += 1
        self.count = torch.tensor(count, dtype=torch.float32)
        self.win = [_Taps(*bilinear_taps(hi - lo, g)) for lo, hi in intervals]
        if out == n:  # no final resize: identity taps
            idx = torch.arange(n)
            self.taps = _Taps(idx, idx, torch.ones(n), torch.zeros(n))
        else:
            self.taps = _Taps(*bilinear_taps(out, n))
        self.taps.n_in = n
        f0, f1 = self.taps.i0.tolist(), self.taps.i1.tolist()
        # support of every output coordinate: super indices of the grid cells it reads (zero-weight taps
        # included: a larger support only makes the uniformity test stricter)
        win_taps = [(t.i0.tolist(), t.i1.tolist()) for t in self.win]
        supports = []
        for y in range(out):
            s = set()
            for r in {f0[y], f1[y]}:
                for a, (lo, hi) in enumerate(intervals):
                    if lo <= r < hi:
                        s.add(a * g + win_taps[a][0][r - lo])
                        s.add(a * g + win_taps[a][1][r - lo])
            supports.append(tuple(sorted(s)))
        runs, run_of = [], []
        for y, s in enumerate(supports):
            if not runs or runs[-1][2] != s:
                runs.append([y, y + 1, s])
            else:
                runs[-1][1] = y + 1
            run_of.append(len(runs) - 1)
        self.runs = [(a, b) for a, b, _ in runs]
        self.run_support = [list(s) for _, _, s in runs]
        width = max(len(s) for _, _, s in runs)
        self.support = torch.tensor([list(s) + [s[0]] * (width - len(s)) for _, _, s in runs], dtype=torch.long)
        self.run_of = torch.tensor(run_of, dtype=torch.long)
        self.run_start = torch.tensor([a for a, _ in self.runs], dtype=torch.long)

    @property
    def num_runs(self) -> int:
        return len(self.runs)

    @functools.cached_property
    def composed(self) -> torch.Tensor:
        """``[out, n_super]`` float32 weights of the linear map grid -> output (window upsampling, division by
        the window count, final resize), composed in float64."""
        def dense(t: _Taps, n_out: int, n_in: int) -> torch.Tensor:
            m = torch.zeros(n_out, n_in, dtype=torch.float64)
            rows = torch.arange(n_out)
            m.index_put_((rows, t.i0), t.w0.double(), accumulate=True)
            m.index_put_((rows, t.i1), t.w1.double(), accumulate=True)
            return m
        fin = dense(self.taps, self.out, self.n)
        inv = 1.0 / self.count.double()
        comp = torch.cat([fin[:, lo:hi] @ (dense(t, hi - lo, self.g) * inv[lo:hi, None])
                          for (lo, hi), t in zip(self.intervals, self.win)], dim=1)
        return comp.float()


class _Geometry:
    def __init__(self, boxes: tuple, resized: tuple[int, int], orig: tuple[int, int], grid: tuple[int, int]):
        row_iv = sorted({(b[0], b[1]) for b in boxes})
        col_iv = sorted({(b[2], b[3]) for b in boxes})
        self.grid_ok = len(boxes) == len(row_iv) * len(col_iv) and len(set(boxes)) == len(boxes)
        if not self.grid_ok:
            return
        self.boxes = boxes
        self.window_ab = [(row_iv.index((b[0], b[1])), col_iv.index((b[2], b[3]))) for b in boxes]
        self.rows = _Axis(row_iv, grid[0], resized[0], orig[0])
        self.cols = _Axis(col_iv, grid[1], resized[1], orig[1])
        self.grid = grid


@functools.lru_cache(maxsize=32)
def _geometry(boxes: tuple, resized: tuple[int, int], orig: tuple[int, int], grid: tuple[int, int]) -> _Geometry:
    return _Geometry(boxes, resized, orig, grid)


@functools.lru_cache(maxsize=64)
def _f_interpolate_is_two_tap(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> bool:
    """Whether ``F.interpolate`` (bilinear, float32, CPU) computes this resize as width pass then height pass of
    ``fma(x0, w0, x1·w1)`` (:func:`_lerp`), checked on a random probe. True at protocol sizes; PyTorch takes
    another code path for tiny widths (``floss.core.kernels.interp``), where the shortcut defers to the reference loop."""
    x = torch.rand(1, 2, *in_hw, generator=torch.Generator().manual_seed(0))
    ref = F.interpolate(x, size=out_hw, mode="bilinear", align_corners=False)[0]
    rt = _Taps(*bilinear_taps(out_hw[0], in_hw[0])) if out_hw[0] != in_hw[0] else None
    ct = _Taps(*bilinear_taps(out_hw[1], in_hw[1])) if out_hw[1] != in_hw[1] else None
    y = x[0]
    if ct is not None:
        y = _lerp(y[..., ct.i0], ct.w0, y[..., ct.i1], ct.w1, False)
    if rt is not None:
        y = _lerp(y[:, rt.i0], rt.w0.view(-1, 1), y[:, rt.i1], rt.w1.view(-1, 1), False)
    return bool(torch.equal(y, ref))


# ------------------------------------------------------------------------------------------ arithmetic
def _lerp(a: torch.Tensor, w0: torch.Tensor, b: torch.Tensor, w1: torch.Tensor, matrix: bool,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """Two-tap interpolation ``a·w0 + b·w1`` in the rounding order of the renderer's kernel.

    ``matrix=False``: ``F.interpolate`` (``fma(a, w0, b·w1)``; every window upsampling); ``matrix=True``: a matmul
    with the interpolation matrix (an FMA chain over the non-zero entries: ``fma(b, w1, a·w0)``; pass the matrix
    weights, where the two taps of a clamped border are one entry ``w0 + w1`` and ``w1 = 0``; only the renderer's
    banded final resize off the CPU, :func:`floss.core.kernels.interp.separable`).
    """
    if matrix:
        a, w0, b, w1 = b, w1, a, w0
    out = torch.mul(b, w1) if out is None else torch.mul(b, w1, out=out)
    # fma(a, w0, out) emulated: a·w0 is exact in float64, so the sum is rounded once (then to float32; a double
    # rounding matters only on an exact float32 midpoint). torch.addcmul_ is not used: on CPU its vectorised
    # loop fuses the multiply-add but the scalar tail of a short or odd-length loop does not
    return out.copy_((a.double() * w0.double()).add_(out.double()))


class _Taps:
    """Two-tap weights of one 1-D resize in both rounding orders (``F`` and ``M``atrix weights)."""

    def __init__(self, i0: torch.Tensor, i1: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor):
        self.i0, self.i1, self.w0, self.w1 = i0, i1, w0.float(), w1.float()
        same = i0 == i1
        self.m0 = torch.where(same, self.w0 + self.w1, self.w0)
        self.m1 = torch.where(same, torch.zeros_like(self.w1), self.w1)

    def weights(self, matrix: bool, sl=slice(None), device=None):
        w0, w1 = (self.m0, self.m1) if matrix else (self.w0, self.w1)
        return w0[sl].to(device), w1[sl].to(device)


# ------------------------------------------------------------------------------------------ per image
class _Image:
    """Per-image state: geometry, label histogram per cell, the renderer's arithmetic choices."""

    def __init__(self, record, label: torch.Tensor, num_classes: int, device):
        from floss.protocol.rendering import _Renderer

        boxes = tuple(tuple(int(v) for v in b) for b in record.boxes.tolist())
        gh, gw = (int(s) for s in record.feats.shape[-2:])
        self.geo = _geometry(boxes, tuple(int(s) for s in record.resized_size),
                             tuple(int(s) for s in record.orig_size), (gh, gw))
        if not self.geo.grid_ok:
            return
        k = num_classes
        rows, cols = self.geo.rows, self.geo.cols
        gt = label.to(device).long()
        bad = (gt != 255) & ((gt < 0) | (gt >= k))
        if bool(bad.any()):
            raise ValueError(f"gt: expected labels in [0, {k - 1}] or the ignore index 255, received "
                             f"{torch.unique(gt[bad])[:10].tolist()}")
        self.gt = gt
        self.valid = gt != 255
        cell = rows.run_of.to(device).view(-1, 1) * cols.num_runs + cols.run_of.to(device).view(1, -1)
        key = (cell * k + gt.clamp(max=k - 1))[self.valid]
        self.hist = torch.bincount(key, minlength=rows.num_runs * cols.num_runs * k).view(
            rows.num_runs, cols.num_runs, k)
        self.renderer = _Renderer(record, "orig", device)
        self.device = device

    def arithmetic(self, channels: int) -> None:
        """Which kernels the renderer uses for ``channels`` rendered channels (rendering._Renderer.render):
        window upsampling always with F.interpolate's arithmetic (a window over the band budget: only the band's
        rows, :func:`floss.core.kernels.interp.upsample_rows`, the same bits), final resize by F.interpolate when one band
        covers the image (else matrices)."""
        first = next(iter(self.renderer.bands(channels)))
        self.final_matrix = self.renderer.resize and first != (0, self.renderer.out_size[0])

    def replicable(self) -> bool:
        """Whether the ``F.interpolate`` steps the renderer takes (per :meth:`arithmetic`) are the two-tap
        formulas replicated in :func:`_renderer_values` at this geometry."""
        gh, gw = self.geo.grid
        for y1, y2, x1, x2 in self.geo.boxes:
            if not _f_interpolate_is_two_tap((gh, gw), (y2 - y1, x2 - x1)):
                return False
        r = self.renderer
        return self.final_matrix or not r.resize or _f_interpolate_is_two_tap((r.h, r.w), r.out_size)


def _super_grid(maps: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """``[Nw, T, Q, gh, gw]`` -> ``[T, Q, n_super_rows, n_super_cols]`` (windows placed on the grid)."""
    nw, t, q, gh, gw = maps.shape
    out = torch.empty(t, q, len(geo.rows.intervals) * gh, len(geo.cols.intervals) * gw, dtype=maps.dtype,
                      device=maps.device)
    for w, (a, b) in enumerate(geo.window_ab):
        out[:, :, a * gh:(a + 1) * gh, b * gw:(b + 1) * gw] = maps[w]
    return out


def _cell_reduce(x: torch.Tensor, geo: _Geometry, op: str) -> torch.Tensor:
    """min/max of ``x [..., n_super_rows, n_super_cols]`` over every cell's support -> ``[..., n_rr, n_cr]``.

    Support slots are gathered along the leading dimension (whole-row copies; gathers along the last
    dimension are an order of magnitude slower on CPU) and folded in one slot at a time."""
    dev = x.device
    rs, cs = geo.rows.support.to(dev), geo.cols.support.to(dev)
    red = torch.minimum if op == "min" else torch.maximum
    lead = x.shape[:-2]
    r, c = x.shape[-2:]

    def fold(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:       # t [N, M], idx [n, L] -> [n, M]
        out = t.index_select(0, idx[:, 0])
        for slot in range(1, idx.shape[1]):
            red(out, t.index_select(0, idx[:, slot]), out=out)
        return out

    xt = x.reshape(-1, r, c).permute(2, 0, 1).reshape(c, -1)                    # [C, lead·R]
    y = fold(xt, cs).view(cs.shape[0], -1, r).permute(2, 1, 0).reshape(r, -1)   # [R, lead·n_cr]
    z = fold(y, rs)                                                              # [n_rr, lead·n_cr]
    return z.view(rs.shape[0], -1, cs.shape[0]).permute(1, 0, 2).reshape(*lead, rs.shape[0], cs.shape[0])


def _cells(maps: torch.Tensor, geo: _Geometry, groups, tau: float):
    """Per template and cell: ``uniform [T, n_rr, n_cr]`` and its first-argmax query ``[T, n_rr, n_cr]``.

    Uniform: every support vector has the same first-argmax query, beating the queries of every other class
    by more than ``τ`` (module docstring, step 1).
    """
    grid = _super_grid(maps, geo)                                               # [T, Q, R, C]
    scale = max(1.0, float(grid.abs().amax()))
    tau = tau * scale
    cls = grid if groups is None else torch.stack([grid[:, g].amax(dim=1) for g in groups], dim=1)
    if cls.shape[1] >= 2:
        top = cls.topk(2, dim=1).values
        margin = top[:, 0] - top[:, 1]
    else:
        margin = torch.full_like(cls[:, 0], math.inf)
    qstar = grid.argmax(dim=1)
    key = torch.where(margin > tau, qstar, torch.full_like(qstar, -1))         # [T, R, C]
    lo, hi = _cell_reduce(key, geo, "min"), _cell_reduce(key, geo, "max")
    uniform = (lo == hi) & (lo >= 0)
    query = lo.clamp(min=0)
    return uniform, query


class _Composed:
    """fp32 maps (no per-window fp16 cast): the window-merged, resized scores are the linear map
    ``Σ_ab A_a P_ab B_bᵀ`` of the patch grid (:attr:`_Axis.composed`), applied as one matmul over the grid
    columns (``G = P B_bᵀ``, ``[C, n_super_rows, W]``) and, per output row, a two-to-four-term sum over its
    row support. Equal to the renderer's values up to float rounding (~1e-7 relative); argmax can differ only
    at such near-ties."""

    def __init__(self, maps: torch.Tensor, img: _Image):
        geo = img.geo
        grid = _super_grid(maps.unsqueeze(2), geo)[:, 0]                         # [C, n_sr, n_sc]
        # |p| < 2^-60 -> 0 (moves a score by < 2^-60): keeps the products out of the subnormal range, whose
        # arithmetic is ~100x slower on x86 (saturated softmax maps are full of such values)
        grid = torch.where(grid.abs() < 2.0 ** -60, torch.zeros_like(grid), grid)
        self.g = torch.matmul(grid, geo.cols.composed.to(maps.device).t())       # [C, n_sr, W]
        self.axis = geo.rows
        self.w = geo.rows.composed.to(maps.device)

    def rows(self, ya: int, yb: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """``[C, yb − ya, W]`` scores of output rows ``ya:yb`` (one row run)."""
        support = self.axis.run_support[int(self.axis.run_of[ya])]
        for n, s in enumerate(support):
            w = self.w[ya:yb, s].view(1, -1, 1)
            if n == 0:
                out = torch.mul(self.g[:, s:s + 1], w) if out is None else torch.mul(self.g[:, s:s + 1], w, out=out)
            else:
                out.addcmul_(self.g[:, s:s + 1], w)
        return out
