"""The per-image kernels behind :class:`floss.core.stats.TemplateStats`: one image's per-(template, class) pixel
counts and metric sums (:func:`accumulate`), and the ITI values of accumulated statistics (:func:`iti_values`).

Upsampling ``size=(H, W)``: probabilities are bilinearly resized (align_corners=False, **not** re-softmaxed,
protocol §3) block by block with :mod:`floss.core.kernels.interp` (bit-identical to ``F.interpolate`` on CPU), so peak
memory is bounded by a few ``max(CHUNK_ELEMENTS, K·W)``-float buffers per worker thread whatever ``M``, ``K``
or the image size.

Speed: the built-in metrics run as fused kernels on each block (:mod:`floss.core.kernels.fused`: an exact argmax from
integer keys, MaNo without per-element divisions and with its softrun branch decided analytically, ITI sums
from soft counts on the feature grid instead of upsampled features), and template chunks run in
``torch.get_num_threads()`` worker threads with single-threaded ops (:mod:`floss.util.threads`; a registered
custom ``pixel_score`` is therefore called from those threads). ``benchmarks/bench_stats.py`` measures it.

May import: torch, floss's bottom helpers (:mod:`floss.core.kernels.fused`, :mod:`floss.core.kernels.interp`, :mod:`floss.util.threads`) and
:mod:`floss.core.metrics`; never :mod:`floss.core.stats` (the container builds on this module, not the reverse).
"""
from __future__ import annotations

from typing import Sequence

import torch

from floss.core.kernels.fused import SoftCounts, entropy_scores, first_argmax, mano_branch, mano_scores
from floss.core.kernels.interp import RowUpsampler
from floss.util.threads import map_single_threaded
from floss.core.metrics import entropy_score, get_metric, mano_score, spatial_of_argmax, spatial_score

__all__ = ["accumulate", "map_sums", "argmax_map_sums", "iti_values", "CHUNK_ELEMENTS", "MIN_ROWS"]

#: floats per work block (m_chunk · K · rows · W): ~2 MiB keeps the fused passes cache-resident
CHUNK_ELEMENTS = 1 << 19
#: output rows per block at least (amortises the width pass and per-op overhead)
MIN_ROWS = 16


def accumulate(probs: torch.Tensor, size: tuple[int, int], features: torch.Tensor | None,
               pixel_metrics: Sequence[str], normalized: bool = True):
    """Per-image ``counts [m, K]`` int64, ``sums [n_metrics, m, K]`` float64, ``fsum [m, K, D]``.

    Blocks of output rows × templates are upsampled into one reused buffer; the built-in metrics run as
    fused kernels (:mod:`floss.core.kernels.fused`) on that block; registered custom metrics get the block as
    ``q [rows·templates, K, W]``.
    """
    m, k, h, w = probs.shape
    out_h, out_w = size
    dev = probs.device
    work = torch.float64 if probs.dtype == torch.float64 else torch.float32
    all_specs = [get_metric(name) for name in pixel_metrics]
    specs = [s for s in all_specs if s.kind != "map"]          # per-pixel scores, block by block
    map_specs = [s for s in all_specs if s.kind == "map"]
    # map metrics that read only the argmax (the built-in spatial): keep the blocks' argmax map instead of
    # upsampling every template's whole map again in map_sums
    argmax_only = bool(map_specs) and all(s.pixel_score is spatial_score for s in map_specs)
    pred_map = None
    if argmax_only:
        pred_map = torch.empty(m, out_h, out_w, dtype=torch.int16 if k <= 1 << 15 else torch.int64, device=dev)
    acc = torch.zeros(len(specs) + 1, m, k, dtype=torch.float64, device=dev)  # [counts, sums...]
    soft = None if features is None else SoftCounts(features.to(dev), m, k, size)
    # block = (rows, templates): >= MIN_ROWS output rows (so that the width pass, done on the input rows
    # a block reads, is shared by many output rows), then as many templates as the budget allows
    row_elems = k * out_w
    rows_per = min(out_h, max(MIN_ROWS, CHUNK_ELEMENTS // (row_elems * m)))
    m_chunk = max(1, min(m, CHUNK_ELEMENTS // (row_elems * rows_per)))
    block = rows_per * m_chunk * row_elems
    fixed = None
    if "mano" in pixel_metrics:
        fixed = mano_branch(k, normalized, None if normalized else float(probs.amax()))
    n_val = len(specs) + 1

    def chunk(t0: int) -> None:   # templates t0 .. t0 + m_chunk: disjoint slices of acc / soft counts
        t1 = min(m, t0 + m_chunk)
        mc = t1 - t0
        q_buf = torch.empty(block, dtype=work, device=dev)
        tmp = torch.empty(block, dtype=work, device=dev)
        key_buf = torch.empty(block, dtype=torch.int64 if work == torch.float64 else torch.int32, device=dev)
        vals = None
        # fp16 canvases are read in fp32 (the authors compute the entropy in fp32)
        src = RowUpsampler(probs[t0:t1].to(work).reshape(mc * k, h, w), size, cache_elements=2 * CHUNK_ELEMENTS)
        for r0 in range(0, out_h, rows_per):
            rows = slice(r0, min(out_h, r0 + rows_per))
            nr = rows.stop - rows.start
            # rows-first [R, m_c·K, W]: (row, template) pairs form the batch dim the metrics see
            q = src.rows(rows, out=q_buf[:nr * mc * row_elems].view(nr, mc * k, out_w))
            q = q.view(-1, k, out_w)
            best = q.amax(dim=1)
            pred = first_argmax(q, best, key_buf).view(-1, mc, out_w)  # first index on ties, like argmax
            if pred_map is not None:
                pred_map[t0:t1, rows].copy_(pred.permute(1, 0, 2))
            # one scatter_add of [1 (count), score_1, ...] per pixel along the class dim of a float64
            # [n + 1, R, m_c, K] table (counts are exact integers in float64), summed over the block's rows
            if vals is None or vals.shape[1:3] != (nr, mc):
                vals = torch.empty(n_val, nr, mc, out_w, dtype=torch.float64, device=dev)
                vals[0].fill_(1.0)
            for j, spec in enumerate(specs):
                if spec.name == "avgprob":  # max_j q_j
                    score = best
                elif spec.name == "entropy" and spec.pixel_score is entropy_score:
                    score = entropy_scores(q, tmp)
                elif spec.name == "mano" and spec.pixel_score is mano_score:
                    score = mano_scores(q, best, fixed, tmp)
                else:
                    score = spec.pixel_score(q)
                vals[j + 1].copy_(score.view(nr, mc, out_w))
            table = torch.zeros(n_val, nr, mc, k, dtype=torch.float64, device=dev)
            table.scatter_add_(3, pred.unsqueeze(0).expand(n_val, -1, -1, -1), vals)
            acc[:, t0:t1] += table.sum(1)
            if soft is not None:
                soft.add(pred, t0, rows)

    # template chunks are independent: worker threads with single-threaded ops (floss.util.threads)
    map_single_threaded(chunk, range(0, m, m_chunk), None if dev.type == "cpu" else 1)
    counts = acc[0].round().to(torch.int64)
    sums = acc[1:]
    if map_specs:     # "map" metrics: whole maps, merged back in the order of pixel_metrics
        maps = iter((argmax_map_sums(pred_map, k, len(map_specs), work) if argmax_only
                     else map_sums(probs, size, map_specs, work)).unbind(0))
        blocks = iter(sums.unbind(0))
        sums = torch.stack([next(maps) if s.kind == "map" else next(blocks) for s in all_specs])
    return counts, sums, (None if soft is None else soft.sums())


def map_sums(probs: torch.Tensor, size: tuple[int, int], specs, work: torch.dtype) -> torch.Tensor:
    """``[n_map, m, K]`` float64 sums of ``kind="map"`` scores (:mod:`floss.core.metrics`) over the pixels each
    template predicts as each class: one template at a time, its whole upsampled map ``[1, K, H, W]`` (the same
    resize as the blocks: :class:`~floss.core.kernels.interp.RowUpsampler`; argmax first index on ties)."""
    m, k, h, w = probs.shape
    out_h, out_w = size
    out = torch.zeros(len(specs), m, k, dtype=torch.float64, device=probs.device)
    for t in range(m):
        q = probs[t].to(work)
        if (out_h, out_w) != (h, w):
            q = RowUpsampler(q, size).rows(slice(0, out_h)).permute(1, 0, 2)      # [H, K, W] -> [K, H, W]
        q = q.contiguous().unsqueeze(0)
        pred = q.argmax(dim=1).reshape(-1)
        for i, spec in enumerate(specs):
            score = spec.pixel_score(q).reshape(-1).to(torch.float64)
            out[i, t].scatter_add_(0, pred, score)
    return out


def argmax_map_sums(pred_map: torch.Tensor, k: int, n_specs: int, work: torch.dtype) -> torch.Tensor:
    """:func:`map_sums` of ``n_specs`` copies of the built-in ``spatial`` metric from the argmax maps
    ``pred_map [m, H, W]`` the blocks computed (the same argmax, the same per-template scatter order)."""
    m = pred_map.shape[0]
    out = torch.zeros(m, k, dtype=torch.float64, device=pred_map.device)
    for t in range(m):
        pred = pred_map[t:t + 1].long()
        score = spatial_of_argmax(pred, work).reshape(-1).to(torch.float64)
        out[t].scatter_add_(0, pred.reshape(-1), score)
    return out.expand(n_specs, m, k).clone()      # every copy is the same sum: computed once


def iti_values(st: dict[str, torch.Tensor], num_classes: int) -> torch.Tensor:
    """Eq. 11. Centroid f̄_k = mean over the images where k is predicted of f̄_k^i; D_intra = E||f̄^i||² −
    ||f̄_k||²; D_inter = mean over the other classes l with a centroid of ||f̄_k − f̄_l||² (the K−1 classes
    of protocol §9.9). ITI = D_inter / D_intra (+inf when D_intra = 0, e.g. a single image)."""
    n = st["iti_images"]
    has = n > 0
    cen = st["iti_sum"] / n.clamp_min(1).unsqueeze(-1)  # [M, K, D]
    sq = (cen * cen).sum(-1)
    intra = (st["iti_sqsum"] / n.clamp_min(1) - sq).clamp_min(0)
    intra = torch.where(n > 1, intra, torch.zeros_like(intra))
    dist = (sq.unsqueeze(2) + sq.unsqueeze(1) - 2 * cen @ cen.transpose(1, 2)).clamp_min(0)  # [M, K, K]
    other = has.unsqueeze(1) & ~torch.eye(num_classes, dtype=torch.bool, device=has.device)
    inter = (dist * other).sum(-1) / other.sum(-1).clamp_min(1)
    iti = torch.where(intra > 0, inter / intra.clamp_min(torch.finfo(torch.float64).tiny),
                      torch.full_like(inter, float("inf")))
    iti = torch.where(other.any(-1), iti, torch.full_like(iti, float("nan")))
    return torch.where(has, iti, torch.full_like(iti, float("nan")))
