"""Input validation shared by the core: clear errors naming the argument, the expected and the received.

Nothing is silently coerced: a wrong rank, shape, dtype, NaN/Inf, negative value or a probability row that
does not sum to one raises :class:`ValueError` (or :class:`TypeError` for a non-tensor).
"""
from __future__ import annotations

from typing import Sequence

import torch

#: tolerance on |sum_k p_k - 1| for probability vectors (fp16 inputs reach ~1e-3)
SUM_TOLERANCE = 2e-3


def check_tensor(name: str, x, ndim: int | None = None, shape: Sequence[int | None] | None = None,
                 floating: bool = False) -> torch.Tensor:
    """Check that ``x`` is a tensor of the given rank/shape (``None`` entries in ``shape`` match anything)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, received {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, received shape {tuple(x.shape)} ({x.ndim}-d)")
    if shape is not None:
        if len(shape) != x.ndim or any(s is not None and s != d for s, d in zip(shape, x.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name}: expected shape {want}, received {list(x.shape)}")
    if floating and not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, received dtype {x.dtype}")
    return x


def check_finite(name: str, x: torch.Tensor) -> None:
    # amin/amax propagate NaN and expose ±Inf at a fraction of the cost of isfinite(x).all() on large tensors
    if x.numel() == 0 or not x.is_floating_point():
        return
    if bool(torch.isfinite(x.amin()) & torch.isfinite(x.amax())):
        return
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: expected finite values, received {bad} NaN/Inf entries")


def check_probabilities(name: str, probs: torch.Tensor, dim: int = -3, normalized: bool = True,
                        tolerance: float = SUM_TOLERANCE) -> None:
    """Check finite, non-negative values that (when ``normalized``) sum to 1 along ``dim``.

    ``normalized=False`` is for the one protocol that produces unnormalised class scores on purpose
    (NACLIP's max over VOC20 synonyms); it must be passed explicitly.
    """
    check_finite(name, probs)
    mn = float(probs.min()) if probs.numel() else 0.0
    if mn < 0:
        raise ValueError(f"{name}: expected non-negative probabilities, received a minimum of {mn:.4g}")
    if normalized and probs.numel():
        sums = probs.sum(dim=dim, dtype=torch.float32)
        dev = float((sums - 1).abs().max())
        if dev > tolerance:
            raise ValueError(
                f"{name}: expected probabilities summing to 1 over dim {dim} (tolerance {tolerance}), received "
                f"a maximal deviation of {dev:.4g}; pass normalized=False only for protocols that produce "
                "unnormalised class scores on purpose")
