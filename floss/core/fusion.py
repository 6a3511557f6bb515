"""Fusion of the K expert soft maps into one map: Eq. 7 as implemented ("highest") and Table 4's variants.

Per pixel x, expert k *agrees* when the argmax of its probability vector S_k(x) is k (first index on ties, as
``torch.argmax``). Strategies (protocol §4):

* ``"highest"`` (FLOSS, Eq. 7): one agreeing expert -> its full vector; none -> the fallback (W_CLIP) vector;
  several -> the agreeing expert with the highest S_k(x)[k], ties to the smallest class index.
* ``"average"`` (Expert Average): several -> the mean of the agreeing experts' vectors.
* ``"default"`` (Expert Default): several -> the fallback vector.
* ``"average_all"`` (Average-all): the mean of all expert maps, ignoring expertise.

Memory: the expert maps of COCO-Stuff at 448×448 are [171, 171, 448, 448] fp32 = 23 GB, so :func:`fuse`
works through bounded pixel chunks of a given tensor and :func:`fuse_rows` pulls the expert maps band by band
from a callable (e.g. :func:`upsampling_expert_fn`, which bilinearly upsamples patch-grid maps per band).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from floss.core.checks import SUM_TOLERANCE, check_probabilities, check_tensor
from floss.core.kernels.interp import bilinear_matrix

logger = logging.getLogger(__name__)

STRATEGIES = ("highest", "average", "default", "average_all")
#: ``source`` map codes for pixels not decided by a single expert
SOURCE_FALLBACK = -1
SOURCE_AVERAGED = -2
#: default bytes of expert values processed per chunk (bounds the temporaries, not the given input)
CHUNK_BYTES = 256 * 2**20


def _check_strategy(strategy) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {', '.join(STRATEGIES)}, received {strategy!r}")
    return strategy


def _weighted_sum(experts: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``sum_e weights[e] * experts[e]`` accumulated expert by expert: element-wise only, so the result does not
    depend on the chunking (a reduction kernel's summation order would)."""
    total = experts[0].clone() if weights is None else experts[0] * weights[0]
    for e in range(1, experts.shape[0]):
        total += experts[e] if weights is None else experts[e] * weights[e]
    return total


def _self_predicting(experts: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """``argmax_j experts[k, j] == k`` (first index on ties) for every expert k and pixel.

    ``argmax`` over the class dim of ``[E, K, p]`` is ~15x slower than ``amax`` on CPU, so: candidates are the
    (k, pixel) pairs whose own probability is the maximum (about one or two per pixel), and the exact argmax
    (tie rule included) is taken on the gathered vectors of those candidates only.
    """
    agree = own == experts.amax(dim=1)
    ks, ps = agree.nonzero(as_tuple=True)
    if ks.numel():
        agree[ks, ps] = experts[ks, :, ps].argmax(dim=1) == ks
    return agree


def _check_chunk(name: str, x: torch.Tensor, dim: int, normalized: bool) -> None:
    """Fast pass (min/max propagate NaN; one float32 sum) before the detailed ``check_probabilities``, whose
    ``isfinite(x).all()`` costs ~10 reductions on large chunks; it runs only to produce the error message."""
    lo, hi = x.amin(), x.amax()
    ok = bool(torch.isfinite(lo) & torch.isfinite(hi) & (lo >= 0))
    if ok and normalized:
        ok = float((x.sum(dim=dim, dtype=torch.float32) - 1).abs().max()) <= SUM_TOLERANCE
    if not ok:
        check_probabilities(name, x, dim=dim, normalized=normalized)


def _agreement(experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``own [E, p]`` (S_k(x)[k]) and ``agree [E, p]`` of ``experts [E, K, p]`` (E = K)."""
    idx = torch.arange(experts.shape[0], device=experts.device)
    own = experts[idx, idx]                                            # [E, p]: S_k(x)[k]
    return own, _self_predicting(experts, own)


def _fuse_flat(experts: torch.Tensor, fallback: torch.Tensor, strategy: str,
               agreement: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse ``experts [E, K, p]`` with ``fallback [K, p]``; returns ``(fused [K, p], source [p] int64)``.
    ``agreement``: :func:`_agreement` of ``experts`` when already computed (shared by several strategies)."""
    num_experts, num_classes, p = experts.shape
    if strategy == "average_all":
        return (_weighted_sum(experts, None) / num_experts,
                torch.full((p,), SOURCE_AVERAGED, dtype=torch.long, device=experts.device))
    own, agree = _agreement(experts) if agreement is None else agreement
    n_agree = agree.sum(dim=0)                                         # [p]
    none, single = n_agree == 0, n_agree == 1
    if strategy == "highest" or strategy == "default":
        score = torch.where(agree, own, torch.full_like(own, -1.0))    # probabilities are >= 0
        winner = score.argmax(dim=0)                                   # first maximum = smallest class index
        fused = experts.gather(0, winner.view(1, 1, p).expand(1, num_classes, p))[0]
        use_fallback = none if strategy == "highest" else ~single
        fused = torch.where(use_fallback[None], fallback, fused)
        source = torch.where(use_fallback, torch.full_like(winner, SOURCE_FALLBACK), winner)
        return fused, source
    # "average": mean of the agreeing experts' vectors (equals the vector itself when one agrees)
    fused = _weighted_sum(experts, agree.to(experts.dtype)) / n_agree.clamp(min=1).to(experts.dtype)
    fused = torch.where(none[None], fallback, fused)
    winner = agree.to(torch.uint8).argmax(dim=0)
    source = torch.where(none, torch.full_like(winner, SOURCE_FALLBACK),
                         torch.where(single, winner, torch.full_like(winner, SOURCE_AVERAGED)))
    return fused, source


def _check_inputs(expert_probs: torch.Tensor, fallback_probs: torch.Tensor, strategy: str) -> None:
    check_tensor("expert_probs", expert_probs, ndim=4, floating=True)
    num_experts, num_classes = expert_probs.shape[:2]
    check_tensor("fallback_probs", fallback_probs, shape=[num_classes, *expert_probs.shape[2:]], floating=True)
    if strategy != "average_all" and num_experts != num_classes:
        raise ValueError(f"expert_probs: expected one expert per class, i.e. shape [K, K, H, W], received "
                         f"{list(expert_probs.shape)} ({num_experts} experts for {num_classes} classes)")
    if fallback_probs.dtype != expert_probs.dtype or fallback_probs.device != expert_probs.device:
        raise ValueError(f"fallback_probs: expected dtype {expert_probs.dtype} on {expert_probs.device} like "
                         f"expert_probs, received {fallback_probs.dtype} on {fallback_probs.device}")


def _flat_inputs(expert_probs: torch.Tensor, fallback_probs: torch.Tensor, chunk_pixels: int | None,
                 normalized: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``[E, K, P]`` experts and ``[K, P]`` fallback (views for contiguous inputs, fallback checked) and the
    pixels per chunk (default: about ``CHUNK_BYTES`` of expert values)."""
    num_experts, num_classes, height, width = expert_probs.shape
    if chunk_pixels is None:
        chunk_pixels = max(1, CHUNK_BYTES // max(1, num_experts * num_classes * expert_probs.element_size()))
    elif isinstance(chunk_pixels, bool) or not isinstance(chunk_pixels, int) or chunk_pixels < 1:
        raise ValueError(f"chunk_pixels: expected a positive int or None, received {chunk_pixels!r}")
    experts = expert_probs.reshape(num_experts, num_classes, height * width)
    fallback = fallback_probs.reshape(num_classes, height * width)
    _check_chunk("fallback_probs", fallback, dim=0, normalized=normalized)
    return experts, fallback, chunk_pixels


def fuse(expert_probs: torch.Tensor, fallback_probs: torch.Tensor, strategy: str = "highest",
         chunk_pixels: int | None = None, *, return_source: bool = False, normalized: bool = True):
    """Fuse expert soft maps into one soft map.

    Args:
        expert_probs: ``[K, K, H, W]``: ``expert_probs[k]`` is expert k's probability map over the K classes
            (query words for NACLIP VOC20). ``"average_all"`` also accepts ``[E, K, H, W]``.
        fallback_probs: ``[K, H, W]``, the averaged classifier's map (W_CLIP).
        strategy: ``"highest"`` | ``"average"`` | ``"default"`` | ``"average_all"`` (module docstring).
        chunk_pixels: pixels per chunk (default: about ``CHUNK_BYTES`` of expert values per chunk).
        return_source: also return the ``[H, W]`` int64 map of the deciding expert (``-1`` fallback,
            ``-2`` averaged from several experts).
        normalized: require vectors summing to 1 (``False`` only for NACLIP's unnormalised synonym maxima).

    Returns:
        fused ``[K, H, W]`` (same dtype/device as the inputs), or ``(fused, source)``.
    """
    _check_strategy(strategy)
    _check_inputs(expert_probs, fallback_probs, strategy)
    experts, fallback, chunk_pixels = _flat_inputs(expert_probs, fallback_probs, chunk_pixels, normalized)
    num_classes, pixels = fallback.shape
    height, width = expert_probs.shape[-2:]
    fused = torch.empty_like(fallback)
    source = torch.empty(pixels, dtype=torch.long, device=fallback.device) if return_source else None
    for start in range(0, pixels, chunk_pixels):
        stop = min(start + chunk_pixels, pixels)
        chunk = experts[:, :, start:stop]
        _check_chunk("expert_probs", chunk, dim=1, normalized=normalized)  # per chunk: no full-size temporaries
        out, src = _fuse_flat(chunk, fallback[:, start:stop], strategy)
        fused[:, start:stop] = out
        if source is not None:
            source[start:stop] = src
    fused = fused.reshape(num_classes, height, width)
    return (fused, source.reshape(height, width)) if return_source else fused


def fuse_many(expert_probs: torch.Tensor, fallback_probs: torch.Tensor, strategies, chunk_pixels: int | None = None,
              *, normalized: bool = True) -> list[torch.Tensor]:
    """``[fuse(expert_probs, fallback_probs, s) for s in strategies]`` (same values), with the input checks and
    the per-expert self-prediction test computed once per pixel chunk instead of once per strategy."""
    strategies = [_check_strategy(s) for s in strategies]
    if not strategies:
        return []
    needs_agreement = any(s != "average_all" for s in strategies)
    _check_inputs(expert_probs, fallback_probs, "highest" if needs_agreement else "average_all")
    experts, fallback, chunk_pixels = _flat_inputs(expert_probs, fallback_probs, chunk_pixels, normalized)
    num_classes, pixels = fallback.shape
    height, width = expert_probs.shape[-2:]
    fused = [torch.empty_like(fallback) for _ in strategies]
    for start in range(0, pixels, chunk_pixels):
        stop = min(start + chunk_pixels, pixels)
        chunk = experts[:, :, start:stop]
        _check_chunk("expert_probs", chunk, dim=1, normalized=normalized)
        agreement = _agreement(chunk) if needs_agreement else None
        for out, strategy in zip(fused, strategies):
            out[:, start:stop] = _fuse_flat(chunk, fallback[:, start:stop], strategy, agreement)[0]
    return [f.reshape(num_classes, height, width) for f in fused]


def fuse_rows(expert_fn: Callable[[slice], torch.Tensor], fallback_probs: torch.Tensor,
              strategy: str = "highest", *, num_experts: int | None = None, rows_per_band: int | None = None,
              return_source: bool = False, normalized: bool = True, progress: bool = False):
    """:func:`fuse` for expert maps too large to hold: ``expert_fn(slice(r0, r1))`` returns the expert maps
    ``[E, K, r1 - r0, W]`` of a band of rows (E = K unless ``"average_all"``); only one band lives at a time.

    ``rows_per_band`` defaults to about ``CHUNK_BYTES`` of expert values per band. Other arguments and the
    result as :func:`fuse`.
    """
    from tqdm.auto import tqdm

    _check_strategy(strategy)
    if not callable(expert_fn):
        raise TypeError(f"expert_fn: expected a callable slice -> Tensor [E, K, rows, W], received "
                        f"{type(expert_fn).__name__}")
    check_tensor("fallback_probs", fallback_probs, ndim=3, floating=True)
    num_classes, height, width = fallback_probs.shape
    num_experts = num_classes if num_experts is None else num_experts
    if rows_per_band is None:
        row_bytes = num_experts * num_classes * width * fallback_probs.element_size()
        rows_per_band = max(1, CHUNK_BYTES // max(1, row_bytes))
    elif isinstance(rows_per_band, bool) or not isinstance(rows_per_band, int) or rows_per_band < 1:
        raise ValueError(f"rows_per_band: expected a positive int or None, received {rows_per_band!r}")
    fused = torch.empty_like(fallback_probs)
    source = torch.empty(height, width, dtype=torch.long, device=fallback_probs.device) if return_source else None
    for start in tqdm(range(0, height, rows_per_band), desc="fusion bands", disable=None if progress else True):
        rows = slice(start, min(start + rows_per_band, height))
        band = expert_fn(rows)
        check_tensor(f"expert_fn({rows.start}:{rows.stop})", band,
                     shape=[num_experts, num_classes, rows.stop - rows.start, width], floating=True)
        out = fuse(band, fallback_probs[:, rows], strategy, return_source=return_source, normalized=normalized)
        if return_source:
            fused[:, rows], source[rows] = out
        else:
            fused[:, rows] = out
    return (fused, source) if return_source else fused


def upsampling_expert_fn(low_res: torch.Tensor, size: tuple[int, int]) -> Callable[[slice], torch.Tensor]:
    """An ``expert_fn`` for :func:`fuse_rows` that bilinearly upsamples ``low_res [E, K, h, w]`` (e.g. per-expert
    softmax on the patch grid, as the authors, protocol §2.3) to ``size = (H, W)`` one band of rows at a time."""
    check_tensor("low_res", low_res, ndim=4, floating=True)
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f"size: expected (H, W) positive ints, received {size!r}")
    # A_rows[band] @ x @ A_cols^T: two small matmuls per band, 4-5x faster on CPU than gather-and-lerp; equal to
    # F.interpolate up to float rounding (~1e-7 in fp32)
    rows_matrix = bilinear_matrix(size[0], low_res.shape[2], low_res.dtype, low_res.device)
    cols_matrix_t = bilinear_matrix(size[1], low_res.shape[3], low_res.dtype, low_res.device).T

    def expert_fn(rows: slice) -> torch.Tensor:
        return torch.matmul(torch.matmul(rows_matrix[rows], low_res), cols_matrix_t)

    return expert_fn
