"""Exact repair of near ties in the per-template fast path: the renderer's own arithmetic at chosen pixels.

Owns step 3 of :mod:`floss.protocol.kernels.argmax` (see its module docstring): :func:`_renderer_values` recomputes the scores of
chosen channels at chosen output pixels exactly as :meth:`floss.protocol.rendering._Renderer.render` does (window
upsampling, fp16 casts, canvas sum in window order, division by the window count, final resize), and
:func:`_repair` takes the first-argmax class among the near-tie candidates from them.

Imports: torch and :mod:`floss.protocol.kernels.argmax_geometry` (which builds on :mod:`floss.core.kernels.interp` and
:mod:`floss.protocol.rendering`); never :mod:`floss.protocol`. Its values must equal, bit for bit, those of the renderer
that :func:`floss.protocol.kernels.argmax.per_template_confusion_reference` argmaxes.
"""
from __future__ import annotations

import math

import torch

from floss.protocol.kernels.argmax_geometry import _Image, _lerp


def _renderer_values(flat: torch.Tensor, img: _Image, ch: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor,
                     fp16: int, final_matrix: bool) -> torch.Tensor:
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
                u, v = rr[cover] - y1, ss[cover] - x1
                wr, wc = rows.win[a], cols.win[b]
                i0, i1 = wr.i0.to(dev)[u], wr.i1.to(dev)[u]
                j0, j1 = wc.i0.to(dev)[v], wc.i1.to(dev)[v]
                rw0, rw1 = (x[u] for x in wr.weights(False, device=dev))      # F.interpolate's weights
                cw0, cw1 = (x[v] for x in wc.weights(False, device=dev))
                grid, c = flat[w], ch[cover]
                top = _lerp(grid[c, i0, j0], cw0, grid[c, i0, j1], cw1, False)  # width pass, row i0
                bot = _lerp(grid[c, i1, j0], cw0, grid[c, i1, j1], cw1, False)  # width pass, row i1
                up = _lerp(top, rw0, bot, rw1, False)                            # height pass
                if fp16:
                    up = up.half().float()
                acc[cover] = acc[cover] + up if fp16 < 2 else (acc[cover] + up).half().float()  # fp16 canvas
            canvas[ri, si] = acc / (rows.count.to(dev)[rr] * cols.count.to(dev)[ss])
            canvas[ri, si] = canvas[ri, si] if fp16 < 2 else canvas[ri, si].half().float()
    fc0, fc1 = (x[xs] for x in ct.weights(fin, device=dev))
    fr0, fr1 = (x[ys] for x in rt.weights(fin, device=dev))
    if fin and dev.type == "cpu":
        # the renderer's banded final resize (floss.core.kernels.interp.separable): per pass two exact float64 products summed,
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
            xs: torch.Tensor, cls: torch.Tensor, fp16: int, final_matrix: bool) -> torch.Tensor:
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
    vals = _renderer_values(flat, img, t_idx[pair_pix] * q + pair_q, ys[pair_pix], xs[pair_pix], fp16, final_matrix)
    # class score = max over its queries; pixel class = first class with the largest score
    key = pair_pix * k + pair_c
    score = torch.full((n * k,), -math.inf, device=dev).scatter_reduce_(0, key, vals, "amax")
    best = torch.full((n,), -math.inf, device=dev).scatter_reduce_(0, pair_pix, vals, "amax")
    hit = score[key] == best[pair_pix]
    out = torch.full((n,), k, dtype=torch.long, device=dev)
    return out.scatter_reduce_(0, pair_pix[hit], pair_c[hit], "amin")
