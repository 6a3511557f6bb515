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
   window upsampling by fused multiply-adds in the order of ``F.interpolate``'s kernel, ``fma(x0, w0, x1·w1)``
   (checked bit for bit), which the renderer always uses: a window over the band budget is upsampled over the
   band's rows only, by ``floss.core.kernels.interp.upsample_rows`` (the same bits as ``F.interpolate``; no matrix
   products), then the fp16 cast, the canvas sum in window order (each sum rounded to fp16 on an fp16 canvas),
   the division by the window count, then the final resize in the renderer's order and kernel. Classes outside
   ``δ`` cannot win or tie. The final resize is ``F.interpolate`` when one band covers the image, else the
   renderer's band path (``floss.core.kernels.interp.separable``), replicated: on CPU two exact products summed once per
   pass, in float64; on other devices matrix products, emulated as the FMA chain ``fma(x1, w1, x0·w0)``.
   Remaining difference: the fused multiply-adds are emulated in float64 (exact products, then a rounding to
   float64 and one to float32), which differs from a true FMA only when that double rounding meets a float32
   midpoint (probability ~2⁻²⁹ per value); an argmax can then differ only where the renderer's two top classes
   tie to the last bit. The renderer upsamples contiguous copies of the window maps (``F.interpolate`` takes
   another kernel, with other rounding, on a channels-last-like layout).

Non-grid layouts, small fp32 images (the renderer's composed shortcut), fp16 canvases over 4 windows deep and
tiny sizes where ``F.interpolate`` is not two-tap take the reference (:func:`per_template_confusion_reference`).

Layout: this module holds the entry points, the margins and the chunk driver (:func:`_chunk_confusion`);
:mod:`floss.protocol.kernels.argmax_geometry` the window-grid geometry, taps, per-image state, uniform cells and composed scores
(steps 1–2); :mod:`floss.protocol.kernels.argmax_repair` the exact near-tie repair (step 3). They build on torch,
:mod:`floss.core.kernels.interp` and :mod:`floss.protocol.rendering` (this module also on :mod:`floss.util.threads` and, for the reference,
:mod:`floss.core.evaluation`) and import each other only downwards; never :mod:`floss.protocol`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from floss.protocol.kernels.argmax_geometry import _cells, _Composed, _Image
from floss.protocol.kernels.argmax_repair import _repair
from floss.util.threads import map_single_threaded

__all__ = ["per_template_confusion", "per_template_confusion_reference", "TAU_FP32", "TAU_FP16", "TAU_CANVAS16",
           "NEAR_TIE_FP32", "NEAR_TIE_FP16", "NEAR_TIE_CANVAS16"]

#: uniform-cell margins and near-tie widths (of max(1, max |grid value|)) per level: fp32, fp16 window cast, fp16
#: canvas (its sums and division move a value by <= (2^-12 + 4·2^-11)·scale, <= 4 windows per pixel)
TAU_FP32, TAU_FP16, TAU_CANVAS16 = 1e-5, 2e-3, 2e-2
NEAR_TIE_FP32, NEAR_TIE_FP16, NEAR_TIE_CANVAS16 = 1e-5, 1e-3, 1e-2
#: float budget of one tile of output scores (channels · output rows · output columns), ~cache sized
TILE_ELEMENTS = 1 << 20


# ------------------------------------------------------------------------------------------------ merge
def _merge(scores: torch.Tensor, groups: list[list[int]] | None) -> torch.Tensor:
    """``[B, Q, P]`` query scores -> ``[B, K, P]`` class scores (max over synonyms), as ``merge_queries``."""
    if groups is None:
        return scores
    return torch.stack([scores[:, g].amax(dim=1) for g in groups], dim=1)


# --------------------------------------------------------------------------------------------- driver
def _chunk_confusion(maps: torch.Tensor, img: _Image, groups, q2c: torch.Tensor, num_classes: int,
                     fp16: int, final_matrix: bool) -> torch.Tensor:
    """``[T, K, K]`` confusion matrices of the T templates whose window maps are ``maps [Nw, T, Q, gh, gw]``;
    ``final_matrix``: the renderer's final-resize kernel for this chunk (:meth:`_Image.arithmetic`)."""
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
        fixed = _repair(flat, img, q, k, groups, tt, ys, xs, cls, fp16, final_matrix)
        conf += torch.bincount((tt * k + img.gt[ys, xs]) * k + fixed, minlength=dump)
    return conf.view(t, k, k)


def per_template_confusion(record, text: torch.Tensor, settings, query_to_class: Sequence[int], num_classes: int,
                           label: torch.Tensor, device, chunk: int = 8) -> torch.Tensor:
    """``[M, K, K]`` int64 confusion matrices (rows = ground truth) of the M single-template classifiers
    ``text [M, Q, D]`` on one cached image; equal to :func:`per_template_confusion_reference` (see the module
    docstring for the exactness argument). Non-grid window layouts use the reference."""
    from floss.protocol.rendering import window_scores

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
            arith[channels] = img.final_matrix

    img.geo.rows.composed, img.geo.cols.composed        # built once here, read by the workers
    level = 2 if settings.canvas_fp16 else int(settings.window_fp16)    # fp16: none, window cast, canvas

    def run(item):
        start, maps = item
        return start, _chunk_confusion(maps, img, groups, q2c_t, k, level, arith[maps.shape[1] * q])

    out = torch.zeros(m, k, k, dtype=torch.long, device=device)
    workers = None if torch.device(device).type == "cpu" else 1
    for start, conf in map_single_threaded(run, chunks, workers):
        out[start:start + conf.shape[0]] = conf
    return out


def per_template_confusion_reference(record, text: torch.Tensor, settings, query_to_class: Sequence[int],
                                     num_classes: int, label: torch.Tensor, device, chunk: int = 8) -> torch.Tensor:
    """The rendering loop: ``chunk`` templates at a time, every band of the original-size map rendered by
    :class:`floss.protocol.rendering._Renderer`, merged, argmaxed and compared with the label."""
    from floss.core.evaluation import confusion_matrix
    from floss.protocol.rendering import IGNORE_INDEX, _Renderer, merge_queries, window_scores

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
