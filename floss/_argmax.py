"""Per-template confusion matrices without rendering full-resolution class maps (exact).

``evaluate_cache(per_template=True)`` needs, for each of the M single-template classifiers, the argmax class
of every original-resolution pixel: window maps ``P_w [Q, gh, gw]`` on the patch grid are bilinearly
upsampled to their windows (optionally cast to fp16), averaged where windows overlap, bilinearly resized to
the original size, query scores are merged into class scores (max over synonyms), and the argmax is compared
with the label. Rendering ``M·Q·H·W`` values (3.2e9 at Cityscapes size) is slow. Here:

1. **Uniform cells** (skipped). Every step is linear with non-negative weights summing to one, so the vector
   at an output pixel is a convex combination of the patch-grid vectors in its *support* (the grid cells with
   a non-zero weight). On a window grid the support of pixel ``(Y, X)`` is a row support (depending on ``Y``)
   times a column support (``X``): the output splits into rectangular *cells* sharing one support. If every
   vector of a cell's support has the same first-argmax query ``q*`` beating every query of another class by
   more than ``τ`` (1e-5; 2e-3 with the fp16 window cast, which moves a value <= 1 by <= 2^-12; 2e-2 with the
   fp16 canvas), so does every convex combination, by more than the renderer's rounding: the whole cell
   predicts ``class(q*)``; its confusion counts are its label histogram (once per image) added to one column.
2. **Composed scores** elsewhere: the same linear map applied as ``Σ_ab A_a P_ab B_bᵀ`` (``A``, ``B``: window
   upsampling, division by the window count and final resize composed per axis in float64): one matmul over
   the grid columns, then a 2–4 term sum per output row, in cache-sized tiles of rows.
3. **Exact repair of near ties.** Composed scores differ from the renderer's by rounding: <= ~1.4e-6 of the
   largest |value| in fp32, <= 2.5e-4 with the fp16 cast, <= 2.2e-3 with the fp16 canvas (neither applied by
   the composed map). Pixels whose composed top two classes are within ``δ`` (1e-5, 1e-3, resp. 1e-2 of that
   scale) are recomputed with the renderer's own arithmetic for the classes within ``δ``:
   window upsampling by fused multiply-adds in the order of the kernel the renderer uses (``F.interpolate``:
   ``fma(x0, w0, x1·w1)``; the matrix products it uses for large channel counts: MKL's FMA chain
   ``fma(x1, w1, x0·w0)``; both checked bit for bit), the fp16 cast, the canvas sum in window order (each sum
   rounded to fp16 on an fp16 canvas), the division by the window count, then the final resize in the
   renderer's order and kernel. Classes outside ``δ`` cannot win or tie. The renderer's band path
   (``floss._interp.separable``: two exact products summed once per pass, in float64) is replicated.
   Remaining difference: the fused multiply-adds are emulated in float64 (exact products, then a rounding to
   float64 and one to float32), which differs from a true FMA only when that double rounding meets a float32
   midpoint (probability ~2⁻²⁹ per value); an argmax can then differ only where the renderer's two top classes
   tie to the last bit. The renderer upsamples contiguous copies of the window maps (``F.interpolate`` takes
   another kernel, with other rounding, on a channels-last-like layout).

Non-grid layouts, small fp32 images (the renderer's composed shortcut), fp16 canvases over 4 windows deep and
tiny sizes where ``F.interpolate`` is not two-tap take the reference (:func:`per_template_confusion_reference`).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from floss._interp import bilinear_taps
from floss._threads import map_single_threaded

__all__ = ["per_template_confusion", "per_template_confusion_reference", "TAU_FP32", "TAU_FP16", "TAU_CANVAS16",
           "NEAR_TIE_FP32", "NEAR_TIE_FP16", "NEAR_TIE_CANVAS16"]

#: uniform-cell margins and near-tie widths (of max(1, max |grid value|)) per level: fp32, fp16 window cast, fp16
#: canvas (its sums and division move a value by <= (2^-12 + 4·2^-11)·scale, <= 4 windows per pixel)
TAU_FP32, TAU_FP16, TAU_CANVAS16 = 1e-5, 2e-3, 2e-2
NEAR_TIE_FP32, NEAR_TIE_FP16, NEAR_TIE_CANVAS16 = 1e-5, 1e-3, 1e-2
#: float budget of one tile of output scores (channels · output rows · output columns), ~cache sized
TILE_ELEMENTS = 1 << 20


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
    another code path for tiny widths (``floss._interp``), where the shortcut defers to the reference loop."""
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

    ``matrix=False``: ``F.interpolate`` (``fma(a, w0, b·w1)``); ``matrix=True``: a matmul with the
    interpolation matrix (MKL's FMA chain over the non-zero entries: ``fma(b, w1, a·w0)``; pass the matrix
    weights, where the two taps of a clamped border are one entry ``w0 + w1`` and ``w1 = 0``).
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


def _merge(scores: torch.Tensor, groups: list[list[int]] | None) -> torch.Tensor:
    """``[B, Q, P]`` query scores -> ``[B, K, P]`` class scores (max over synonyms), as ``merge_queries``."""
    if groups is None:
        return scores
    return torch.stack([scores[:, g].amax(dim=1) for g in groups], dim=1)


# --------------------------------------------------------------------------------------------- driver
class _Image:
    """Per-image state: geometry, label histogram per cell, the renderer's arithmetic choices."""

    def __init__(self, record, label: torch.Tensor, num_classes: int, device):
        from floss.rendering import _Renderer

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
        rows, :func:`floss._interp.upsample_rows`, the same bits), final resize by F.interpolate when one band
        covers the image (else matrices)."""
        self.window_matrix = [False] * len(self.geo.boxes)
        first = next(iter(self.renderer.bands(channels)))
        self.final_matrix = self.renderer.resize and first != (0, self.renderer.out_size[0])

    def replicable(self) -> bool:
        """Whether the ``F.interpolate`` steps the renderer takes (per :meth:`arithmetic`) are the two-tap
        formulas replicated in :func:`_renderer_values` at this geometry."""
        gh, gw = self.geo.grid
        for (y1, y2, x1, x2), m in zip(self.geo.boxes, self.window_matrix):
            if not m and not _f_interpolate_is_two_tap((gh, gw), (y2 - y1, x2 - x1)):
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


def _renderer_values(flat: torch.Tensor, img: _Image, ch: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor,
                     fp16: int, window_matrix: list[bool], final_matrix: bool) -> torch.Tensor:
    """Scores of channels ``ch`` at output pixels ``(ys, xs)`` (1-D, same length) with the renderer's arithmetic
    (module docstring, step 3); ``flat [Nw, C, gh, gw]`` window maps."""
    geo = img.geo
    rows, cols = geo.rows, geo.cols
    dev = flat.device
    fin = final_matrix
    rt, ct = rows.taps, cols.taps
    r_taps = (rt.i0.to(dev)[ys], rt.i1.to(dev)[ys])
    s_taps = (ct.i0.to(dev)[xs], ct.i1.to(dev)[xs])
    canvas = {}
    for ri in (0, 1):
        for si in (0, 1):
            rr, ss = r_taps[ri], s_taps[si]
            acc = torch.zeros(len(ch), device=dev)
            for w, (y1, y2, x1, x2) in enumerate(geo.boxes):       # the renderer's window order
                cover = ((rr >= y1) & (rr < y2) & (ss >= x1) & (ss < x2)).nonzero().flatten()
                if cover.numel() == 0:
                    continue
                a, b = geo.window_ab[w]
                m = window_matrix[w]
                u, v = rr[cover] - y1, ss[cover] - x1
                wr, wc = rows.win[a], cols.win[b]
                i0, i1 = wr.i0.to(dev)[u], wr.i1.to(dev)[u]
                j0, j1 = wc.i0.to(dev)[v], wc.i1.to(dev)[v]
                rw0, rw1 = (x[u] for x in wr.weights(m, device=dev))
                cw0, cw1 = (x[v] for x in wc.weights(m, device=dev))
                grid, c = flat[w], ch[cover]
                top = _lerp(grid[c, i0, j0], cw0, grid[c, i0, j1], cw1, m)      # width pass, row i0
                bot = _lerp(grid[c, i1, j0], cw0, grid[c, i1, j1], cw1, m)      # width pass, row i1
                up = _lerp(top, rw0, bot, rw1, m)                                # height pass
                if fp16:
                    up = up.half().float()
                acc[cover] = acc[cover] + up if fp16 < 2 else (acc[cover] + up).half().float()  # fp16 canvas
            canvas[ri, si] = acc / (rows.count.to(dev)[rr] * cols.count.to(dev)[ss])
            canvas[ri, si] = canvas[ri, si] if fp16 < 2 else canvas[ri, si].half().float()
    fc0, fc1 = (x[xs] for x in ct.weights(fin, device=dev))
    fr0, fr1 = (x[ys] for x in rt.weights(fin, device=dev))
    if fin and dev.type == "cpu":
        # the renderer's banded final resize (floss._interp.separable): per pass two exact float64 products summed,
        # rounded to float32; columns first
        def pass64(x0, w0, x1, w1):
            return (x0.double() * w0.double() + x1.double() * w1.double()).float()
        wide0 = pass64(canvas[0, 0], fc0, canvas[0, 1], fc1)
        wide1 = pass64(canvas[1, 0], fc0, canvas[1, 1], fc1)
        return pass64(wide0, fr0, wide1, fr1)
    wide0 = _lerp(canvas[0, 0], fc0, canvas[0, 1], fc1, fin)                    # columns first
    wide1 = _lerp(canvas[1, 0], fc0, canvas[1, 1], fc1, fin)
    return _lerp(wide0, fr0, wide1, fr1, fin)


def _repair(flat: torch.Tensor, img: _Image, q: int, k: int, groups, t_idx: torch.Tensor, ys: torch.Tensor,
            xs: torch.Tensor, cls: torch.Tensor, fp16: int, window_matrix: list[bool],
            final_matrix: bool) -> torch.Tensor:
    """First-argmax class (renderer arithmetic) of pixels ``(t_idx, ys, xs)`` [n], among candidate classes
    ``cls [n, L]`` (-1 = none; the classes within ``δ`` of the composed top score)."""
    dev = flat.device
    n = len(t_idx)
    pix, slot = (cls >= 0).nonzero(as_tuple=True)
    pair_cls = cls[pix, slot]
    if groups is None:
        pair_q, pair_pix, pair_c = pair_cls, pix, pair_cls
    else:                                      # every query of each candidate class
        qs = [torch.tensor(g, device=dev) for g in groups]
        counts = torch.tensor([len(g) for g in groups], device=dev)[pair_cls]
        pair_pix = pix.repeat_interleave(counts)
        pair_c = pair_cls.repeat_interleave(counts)
        pair_q = torch.cat([qs[c] for c in pair_cls.tolist()]) if len(pair_cls) else pair_cls
    vals = _renderer_values(flat, img, t_idx[pair_pix] * q + pair_q, ys[pair_pix], xs[pair_pix], fp16,
                            window_matrix, final_matrix)
    # class score = max over its queries; pixel class = first class with the largest score
    key = pair_pix * k + pair_c
    score = torch.full((n * k,), -math.inf, device=dev).scatter_reduce_(0, key, vals, "amax")
    best = torch.full((n,), -math.inf, device=dev).scatter_reduce_(0, pair_pix, vals, "amax")
    hit = score[key] == best[pair_pix]
    out = torch.full((n,), k, dtype=torch.long, device=dev)
    return out.scatter_reduce_(0, pair_pix[hit], pair_c[hit], "amin")


def _chunk_confusion(maps: torch.Tensor, img: _Image, groups, q2c: torch.Tensor, num_classes: int,
                     fp16: int, window_matrix: list[bool], final_matrix: bool) -> torch.Tensor:
    """``[T, K, K]`` confusion matrices of the T templates whose window maps are ``maps [Nw, T, Q, gh, gw]``;
    ``window_matrix``/``final_matrix``: the renderer's kernels for this chunk (:meth:`_Image.arithmetic`)."""
    geo, dev = img.geo, maps.device
    nw, t, q, gh, gw = maps.shape
    k = num_classes
    uniform, query = _cells(maps, geo, groups, (TAU_FP32, TAU_FP16, TAU_CANVAS16)[fp16])
    conf = torch.zeros(t * k, k, dtype=torch.long, device=dev)                  # [pred-major]
    tidx = torch.arange(t, device=dev).view(-1, 1, 1).expand_as(uniform)
    pred = (tidx * k + q2c[query])[uniform]
    conf.index_add_(0, pred, img.hist.unsqueeze(0).expand(t, -1, -1, -1)[uniform])
    conf = conf.view(t, k, k).transpose(1, 2).contiguous().view(-1)             # [T, gt, pred] flat
    todo = ~uniform                                                              # [T, n_rr, n_cr]
    if not bool(todo.any()):
        return conf.view(t, k, k)
    # the other cells, row run by row run (its rows share one support): composed scores
    rows, cols = geo.rows, geo.cols
    col_run_of = cols.run_of.to(dev)
    flat = maps.reshape(nw, t * q, gh, gw)
    composed = _Composed(flat, img)
    scale = max(1.0, float(flat.abs().amax()))
    delta = (NEAR_TIE_FP32, NEAR_TIE_FP16, NEAR_TIE_CANVAS16)[fp16] * scale
    run_has_work = todo.any(2).any(0).tolist()
    dump = t * k * k
    n_x = cols.out
    tbase = torch.arange(t, device=dev).view(-1, 1, 1) * k
    ramp = torch.arange(max(q, k) + 1, dtype=torch.float32, device=dev).view(1, -1, 1)
    near = []                                                                    # (t, y, x, classes) to repair
    for rr in range(rows.num_runs):
        if not run_has_work[rr]:
            continue
        y0, y1 = rows.runs[rr]
        need = todo[:, rr]                                                       # [T, n_cr]
        # which (template, pixel) to count, and the confusion row offset of its label
        gt = img.gt[y0:y1]
        base = (tbase + gt.unsqueeze(0)) * k                                     # [T, nY, W]
        mask = img.valid[y0:y1].unsqueeze(0)
        if not bool(need.all()):
            mask = mask & need[:, col_run_of].unsqueeze(1)
        base.masked_fill_(~mask, dump)
        tile = max(1, min(y1 - y0, TILE_ELEMENTS // max(1, t * q * n_x)))
        buf = torch.empty(t * q, tile, n_x, device=dev)
        ubuf = torch.empty(t * (k if groups is not None else q) * tile * n_x, device=dev)
        for ya in range(y0, y1, tile):
            yb = min(y1, ya + tile)
            scores = composed.rows(ya, yb, out=buf if yb - ya == tile else None).view(t, q, -1)
            if groups is not None:
                scores = _merge(scores, groups)
            # top class and near ties in one sweep: u = relu(v − (top − 2δ)) leaves the top class at ~2δ and
            # any class within δ of it at >= δ; without a near tie the others hold almost nothing, so the top
            # class is round(Σ_j j·u_j / Σ_j u_j) (checked: its u must be ~2δ); ties are repaired exactly
            best = scores.amax(dim=1)                                            # [T, P]
            u = torch.sub(scores, (best - 2 * delta).unsqueeze(1), out=ubuf[:scores.numel()].view(scores.shape))
            u.clamp_min_(0)
            mass = u.sum(dim=1)
            idx = u.mul_(ramp[:, :u.shape[1]]).sum(dim=1).div_(mass).round_().long().clamp_(0, u.shape[1] - 1)
            got = scores.gather(1, idx.unsqueeze(1)).squeeze(1)
            tie = (mass > 2.5 * delta) | (got < best)
            key = base[:, ya - y0:yb - y0].reshape(t, -1) + idx
            tie &= key < dump
            if bool(tie.any()):
                tt, pp = tie.nonzero(as_tuple=True)
                vec = scores.permute(0, 2, 1)[tt, pp]                            # [n, C]
                close = vec >= (best[tt, pp] - delta).unsqueeze(1)
                ids = torch.arange(vec.shape[1], device=dev).expand_as(vec)
                near.append((tt, ya + pp // n_x, pp % n_x, torch.where(close, ids, torch.full_like(ids, -1))))
                key[tt, pp] = dump
            key.clamp_(max=dump)
            conf += torch.bincount(key.view(-1), minlength=dump + 1)[:dump]
    if near:
        width = max(c.shape[1] for *_, c in near)
        tt, ys, xs = (torch.cat([x[i] for x in near]) for i in range(3))
        cls = torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1]), value=-1) for *_, c in near])
        fixed = _repair(flat, img, q, k, groups, tt, ys, xs, cls, fp16, window_matrix, final_matrix)
        conf += torch.bincount((tt * k + img.gt[ys, xs]) * k + fixed, minlength=dump)
    return conf.view(t, k, k)


def per_template_confusion(record, text: torch.Tensor, settings, query_to_class: Sequence[int], num_classes: int,
                           label: torch.Tensor, device, chunk: int = 8) -> torch.Tensor:
    """``[M, K, K]`` int64 confusion matrices (rows = ground truth) of the M single-template classifiers
    ``text [M, Q, D]`` on one cached image; equal to :func:`per_template_confusion_reference` (see the module
    docstring for the exactness argument). Non-grid window layouts use the reference."""
    from floss.rendering import window_scores

    m, q, _ = text.shape
    k = num_classes
    final = settings.softmax_stage == "final"
    img = _Image(record, label, k, device)
    # the reference loop: non-grid layouts, small fp32 images (the renderer's composed shortcut: not the canvas
    # arithmetic replicated here), fp16 canvases over 4 windows deep (beyond the margins of TAU_CANVAS16)
    if not img.geo.grid_ok or (not settings.window_fp16 and img.renderer.fast_ok(record.feats)) or (
            settings.canvas_fp16 and int(img.renderer.count.max()) > 4):
        return per_template_confusion_reference(record, text, settings, query_to_class, num_classes, label,
                                                device, chunk)
    q2c = list(query_to_class)
    groups = None if q2c == list(range(k)) else [[i for i, c in enumerate(q2c) if c == j] for j in range(k)]
    q2c_t = torch.tensor(q2c, dtype=torch.long, device=device)
    # the renderer's template chunks (bit-identical window maps), computed here; chunks then run in parallel
    chunks = []
    for start in range(0, m, chunk):
        ids = list(range(start, min(start + chunk, m)))
        chunks.append((start, window_scores(record, text[ids], settings, softmax=not final, device=device)))
    arith = {}
    for _, maps in chunks:
        channels = maps.shape[1] * q
        if channels not in arith:
            img.arithmetic(channels)
            if not img.replicable():
                return per_template_confusion_reference(record, text, settings, query_to_class, num_classes,
                                                        label, device, chunk)
            arith[channels] = (img.window_matrix, img.final_matrix)

    img.geo.rows.composed, img.geo.cols.composed        # built once here, read by the workers
    level = 2 if settings.canvas_fp16 else int(settings.window_fp16)    # fp16: none, window cast, canvas

    def run(item):
        start, maps = item
        wm, fm = arith[maps.shape[1] * q]
        return start, _chunk_confusion(maps, img, groups, q2c_t, k, level, wm, fm)

    out = torch.zeros(m, k, k, dtype=torch.long, device=device)
    workers = None if torch.device(device).type == "cpu" else 1
    for start, conf in map_single_threaded(run, chunks, workers):
        out[start:start + conf.shape[0]] = conf
    return out


def per_template_confusion_reference(record, text: torch.Tensor, settings, query_to_class: Sequence[int],
                                     num_classes: int, label: torch.Tensor, device, chunk: int = 8) -> torch.Tensor:
    """The rendering loop: ``chunk`` templates at a time, every band of the original-size map rendered by
    :class:`floss.rendering._Renderer`, merged, argmaxed and compared with the label."""
    from floss.evaluation import confusion_matrix
    from floss.rendering import IGNORE_INDEX, _Renderer, merge_queries, window_scores

    m, q, _ = text.shape
    k = num_classes
    final = settings.softmax_stage == "final"
    renderer = _Renderer(record, "orig", device)
    label = label.to(device).long()
    out = torch.zeros(m, k, k, dtype=torch.long, device=device)
    for start in range(0, m, chunk):
        ids = list(range(start, min(start + chunk, m)))
        maps = window_scores(record, text[ids], settings, softmax=not final, device=device)
        maps = maps.reshape(maps.shape[0], -1, *maps.shape[3:])
        for a, b in renderer.bands(maps.shape[1]):
            band = renderer.render(maps, (a, b), window_fp16=settings.window_fp16,
                                   canvas_dtype=torch.float16 if settings.canvas_fp16 else torch.float32)
            band = band.reshape(len(ids), q, b - a, -1)
            for j, t in enumerate(ids):
                pred = merge_queries(band[j], query_to_class, k).argmax(dim=-3)
                out[t] += confusion_matrix(pred, label[a:b], k, ignore_index=IGNORE_INDEX).to(device)
    return out
