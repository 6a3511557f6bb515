"""Fused per-pixel kernels of :class:`floss.core.stats.TemplateStats` (exact argmax, entropy, MaNo, ITI soft counts).

Everything here works on a block ``q [B, K, W]`` of non-negative class scores (B = rows × templates, W = image
width; the class dimension in the middle, so reductions over K are contiguous SIMD loops over W) and writes
its element-wise temporaries into caller-owned buffers (no page-faulting fresh allocations per block).

* :func:`first_argmax`: ``torch.argmax(q, 1)`` (first index on ties) from ``amax`` and one integer pass.
  Non-negative floats order like their bit patterns ``b``; the candidate ``p = argmax_j (b_j − j)`` is read
  back as ``p = b(max) − max_j (b_j − j)``. If ``q_p`` equals the maximum, ``p`` is the first maximal index
  (an earlier maximal ``j`` would have a larger key; a later one a smaller key). Otherwise (two classes
  within ``K`` units in the last place of each other, or an all-zero vector, where ±0 compare equal) the
  pixel is recomputed with ``argmax``. ~5x faster than ``max(dim=1)`` on CPU.
* :func:`entropy_scores`: the same three element-wise steps and sum as
  :func:`floss.core.metrics.entropy_score` (equal values up to an ulp of ``log``, whose SIMD and scalar
  paths can differ for the elements that fall in a vector tail).
* :func:`mano_scores`: ``Σ_j softrun(q)_j⁴ / K`` without per-element divisions: Taylor branch
  ``Σ v⁴ / (Σ v)⁴`` with ``v = f(q) − min f(q)``, softmax branch ``Σ e⁴ / (Σ e)⁴`` with ``e = exp(q − max q)``;
  values agree with ``mano_score`` to a few ulps (pixels where ``Σ v`` is tiny or huge, where fp32 powers
  could underflow/overflow, are recomputed with ``mano_score``). The softrun criterion
  ``c = logsumexp(q) − mean(q)`` is bounded without looking at the pixels (:func:`mano_branch`).
"""
from __future__ import annotations

import math

import torch

from floss.core.metrics import ENTROPY_EPS, MANO_CRITERION, mano_score

__all__ = ["first_argmax", "entropy_scores", "mano_scores", "mano_branch", "SoftCounts"]

#: criterion margin kept on each side of MANO_CRITERION by the analytic bounds (fp32 error is ~1e-6)
_MARGIN = 1e-3


def _int_dtype(dtype: torch.dtype) -> torch.dtype:
    return {torch.float32: torch.int32, torch.float64: torch.int64}[dtype]


def first_argmax(q: torch.Tensor, best: torch.Tensor, key_buf: torch.Tensor | None = None) -> torch.Tensor:
    """``q.argmax(1)`` of ``q [B, K, W]`` (float32/64, values >= 0 or -0.0) given ``best = q.amax(1)``; int64."""
    b, k, w = q.shape
    itype = _int_dtype(q.dtype)
    bits = q.view(itype) if q.is_contiguous() else q.contiguous().view(itype)
    key = torch.empty(q.shape, dtype=itype, device=q.device) if key_buf is None else key_buf[:q.numel()].view(q.shape)
    # candidate p = argmax_j (b_j − j), read back as b(best) − max_j (b_j − j); it satisfies p <= the first
    # maximal index j*, with equality iff q_p == best (module docstring); p < 0 clamps to 0, which is j* iff
    # q_0 == best. ±0 compare equal with different bits: all-zero vectors (best == 0) are recomputed.
    torch.sub(bits, torch.arange(k, dtype=itype, device=q.device).view(1, k, 1), out=key)
    top = key.amax(dim=1)
    pred = torch.sub(best.view(itype), top, out=top).long().clamp_(0, k - 1)
    got = q.gather(1, pred.unsqueeze(1)).view(b, w)
    bad = (got != best).logical_or_(best == 0)
    if bool(bad.any()):
        idx = bad.nonzero(as_tuple=True)
        pred[idx] = q.permute(0, 2, 1)[idx].argmax(dim=-1)
    return pred


def entropy_scores(q: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """``-Σ_j q_j ln(q_j + 1e-10)`` over dim 1 of ``q [B, K, W]`` -> ``[B, W]`` (``buf``: scratch like ``q``)."""
    t = torch.add(q, ENTROPY_EPS, out=buf[:q.numel()].view(q.shape))
    t.log_()
    t.mul_(q)
    return t.sum(dim=1).neg_()


def mano_branch(num_classes: int, normalized: bool, max_value: float | None = None) -> str:
    """Which softrun branch holds for *every* pixel: ``"taylor"``, ``"softmax"`` or ``"mixed"``.

    With ``c = logsumexp(q) − mean(q)``: ``c >= ln K`` for any ``q`` (Jensen), so ``K >= 149`` (ln K > 5) is
    always softmax. For a probability vector ``c`` is convex on the simplex, hence at most its value at a
    vertex, ``ln(K − 1 + e) − 1/K``, which stays below 5 up to ``K = 147`` (sums off by δ move ``c`` by at
    most δ, and inputs are checked to |δ| <= 2e-3). For non-negative unnormalised scores ``c <= ln K + max q``.
    A margin of 1e-3 is kept on each side of the threshold; anything else is ``"mixed"`` (per pixel).
    """
    k = num_classes
    if math.log(k) > MANO_CRITERION + _MARGIN:
        return "softmax"
    if normalized:
        bound = math.log(k - 1 + math.e) - 1.0 / k + 2e-3
    elif max_value is not None:
        bound = math.log(k) + max_value
    else:
        return "mixed"
    return "taylor" if bound < MANO_CRITERION - _MARGIN else "mixed"


def _taylor(q: torch.Tensor, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_j v_j⁴ and Σ_j v_j for ``v = q + q²/2 − min_j(q + q²/2)`` (the constant 1 cancels)."""
    v = torch.addcmul(q, q, q, value=0.5, out=buf[:q.numel()].view(q.shape))
    v.sub_(v.amin(dim=1, keepdim=True))
    norm = v.sum(dim=1)
    # v² >= 1e-18 keeps v⁴ out of the (slow) subnormal range; it adds at most K·1e-36 to Σ v⁴
    v.mul_(v).clamp_min_(1e-18)
    v.mul_(v)
    return v.sum(dim=1), norm


def _softmax(q: torch.Tensor, best: torch.Tensor, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_j e_j⁴ and Σ_j e_j for ``e = exp(q − max q)`` (softmax = e / Σ e)."""
    e = torch.sub(q, best.unsqueeze(1), out=buf[:q.numel()].view(q.shape))
    e.exp_()
    norm = e.sum(dim=1)
    e.mul_(e).clamp_min_(1e-18)
    e.mul_(e)
    return e.sum(dim=1), norm


def mano_scores(q: torch.Tensor, best: torch.Tensor, branch: str, buf: torch.Tensor) -> torch.Tensor:
    """Per-pixel ``Σ_j softrun(q)_j⁴ / K`` of ``q [B, K, W]`` -> ``[B, W]`` (see :func:`mano_branch`)."""
    k = q.shape[1]
    if branch == "mixed":  # per-pixel criterion: the registry's function (same decision, same values)
        return mano_score(q)
    quartic, norm = (_taylor(q, buf) if branch == "taylor" else _softmax(q, best, buf))
    n2 = norm * norm
    score = quartic.div_(n2.mul_(n2).mul_(k))
    # Σ v⁴ loses precision for tiny norms (near-uniform vectors; 0 = constant -> uniform) and overflows for huge
    # unnormalised ones: those pixels take the reference formula (normalise first, then powers). Within
    # [1e-3, 1e6] every term is finite (v_j <= norm) and the 1e-18 floor of v² changes Σ v⁴ (>= norm⁴/K³) by
    # less than K⁴·1e-24 relative (1e-12 for K = 1000).
    lo, hi = torch.aminmax(norm)
    if not (float(lo) >= 1e-3 and float(hi) <= 1e6):
        bad = ~((norm >= 1e-3) & (norm <= 1e6))
        idx = bad.nonzero(as_tuple=True)
        vec = q.permute(0, 2, 1)[idx]                              # [n, K]
        score[idx] = mano_score(vec.t().unsqueeze(0))[0]
    return score


class SoftCounts:
    """ITI sums ``Σ_{pixels predicted k} f(pixel)`` without upsampling the features.

    ``f`` is the bilinear resize of grid features ``F [D, h, w]``: ``f(Y, X) = Σ_ij a_i(Y) b_j(X) F[:, i, j]``,
    so the sum over the pixels of class k is ``Σ_ij C_k[i, j] F[:, i, j]`` with soft counts
    ``C_k[i, j] = Σ_{pixels of k} a_i(Y) b_j(X)`` (float64). Blocks add their pixels with two weighted
    ``bincount`` over the column taps and a small matmul over the row taps; :meth:`sums` contracts with F.
    The taps are those of ``F.interpolate`` (:func:`floss.core.kernels.interp.bilinear_taps`), taken exactly in float64,
    so the result is the float64 sum of the exact bilinear values (the per-pixel path rounds each upsampled
    value to fp32 first: the two agree to ~1e-7 relative).
    """

    def __init__(self, features: torch.Tensor, num_templates: int, num_classes: int, size: tuple[int, int]):
        from floss.core.kernels.interp import bilinear_taps

        d, h, w = features.shape
        out_h, out_w = size
        self.features, self.k, self.h, self.w = features, num_classes, h, w
        dev = features.device
        self.rows = bilinear_taps(out_h, h, torch.float32, dev)
        cols = bilinear_taps(out_w, w, torch.float32, dev)
        self.cols = (cols.i0, cols.i1, cols.w0.double(), cols.w1.double())
        self.counts = torch.zeros(num_templates, num_classes, h, w, dtype=torch.float64, device=dev)

    def add(self, pred: torch.Tensor, t0: int, rows: slice) -> None:
        """``pred [R, m_c, W]``: classes of output rows ``rows`` for templates ``t0 .. t0 + m_c``."""
        r, mc, out_w = pred.shape
        k, h, w = self.k, self.h, self.w
        i0c, i1c, w0c, w1c = self.cols
        base = pred * w + (torch.arange(r * mc, device=pred.device).view(r, mc, 1) * (k * w))
        n = r * mc * k * w
        col = torch.bincount((base + i0c).view(-1), weights=w0c.expand(r, mc, out_w).reshape(-1), minlength=n)
        col += torch.bincount((base + i1c).view(-1), weights=w1c.expand(r, mc, out_w).reshape(-1), minlength=n)
        # row taps of the block's output rows as a dense [h, R] matrix
        start, stop, _ = rows.indices(10 ** 12)
        a = torch.zeros(h, r, dtype=torch.float64, device=pred.device)
        ar = torch.arange(r, device=pred.device)
        a.index_put_((self.rows.i0[start:stop], ar), self.rows.w0[start:stop].double(), accumulate=True)
        a.index_put_((self.rows.i1[start:stop], ar), self.rows.w1[start:stop].double(), accumulate=True)
        soft = (a @ col.view(r, mc * k * w)).view(h, mc, k, w)
        self.counts[t0:t0 + mc] += soft.permute(1, 2, 0, 3)

    def sums(self) -> torch.Tensor:
        """``[M, K, D]`` float64 feature sums per (template, class)."""
        m = self.counts.shape[0]
        f = self.features.to(torch.float64).reshape(self.features.shape[0], -1)
        return (self.counts.view(m * self.k, -1) @ f.t()).view(m, self.k, -1)
