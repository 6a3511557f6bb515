"""Bilinear resizing (``align_corners=False``) as separable two-tap filters, exactly as ``F.interpolate``.

Why: the template statistics upsample ``[m, K, h, w]`` probability maps to the original image size (often
1024×2048) for 80 templates. Doing it with ``F.interpolate`` on the whole stack needs ``m·K·H·W`` floats at
once; here any block of output rows can be produced on its own (``rows=``), so callers stream the image in
bounded chunks. The arithmetic replicates PyTorch's CPU kernel bit for bit: the same source index / lambda
rule (``src = scale·(dst + 0.5) − 0.5`` clamped at 0, second tap clamped at the border, ``λ0 = 1 − λ1``),
width pass first (by ``F.interpolate`` itself on the needed input rows), then the height pass as a
row-by-row fused multiply-add ``fma(y0, λ0, y1·λ1)``, the operation order of the kernel. Bit equality with
``F.interpolate`` on two threads for float32 upsampling on CPU at protocol-like widths is checked in
``tests/test_stats.py`` (so argmax counts equal the authors' exactly); elsewhere (tiny widths, where PyTorch takes
another code path, other devices, downsampling, float64) results agree to ~1 ulp. PyTorch's CPU kernels round
some shapes 1 ulp differently with other thread counts (torch 2.14.1: the 2-D kernel on one thread for
[2, 3, 32, 64] -> 256×512; the 1-D kernel of the width pass, which this module calls, for float32 [1, 19, 28, 28]
-> 448 between one and two threads), so at such shapes the last bit follows the thread count here too.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

__all__ = ["Taps", "bilinear_taps", "bilinear_matrix", "source_rows", "upsample_rows", "upsample_bilinear",
           "RowUpsampler", "interp_matrix", "separable", "rows_matmul",
           "two_tap_matmul"]


class Taps(NamedTuple):
    """Two-tap form of a 1-D linear resize: ``out[i] = x[i0[i]]·w0[i] + x[i1[i]]·w1[i]``."""
    i0: torch.Tensor  # [out] int64
    i1: torch.Tensor  # [out] int64 (== i0 at the clamped border)
    w0: torch.Tensor  # [out] float
    w1: torch.Tensor  # [out] float


def _check_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, received {value!r}")
    return value


@functools.lru_cache(maxsize=64)
def _taps_cpu(out_size: int, in_size: int, dtype: torch.dtype) -> Taps:
    dst = torch.arange(out_size, dtype=torch.float64)
    if out_size == in_size:  # PyTorch's scale-1 shortcut: a copy
        idx = dst.long()
        return Taps(idx, idx, torch.ones(out_size, dtype=dtype), torch.zeros(out_size, dtype=dtype))
    # opmath is float32 for float16/32 inputs, float64 for float64 (as in ATen's upsample helpers)
    op = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(in_size, dtype=op) / out_size
    # scale·(d + 0.5) − 0.5: computed exactly in float64 and rounded once (what an fma gives); for the
    # usual power-of-two or short ratios every variant of the expression is exact anyway
    src = (scale.double() * (dst + 0.5) - 0.5).to(op)
    src = src.clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    lam1 = (src - i0.to(op)).clamp(0, 1)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    lam0 = 1 - lam1
    return Taps(i0, i1, lam0.to(dtype), lam1.to(dtype))


def bilinear_taps(out_size: int, in_size: int, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> Taps:
    """Indices and weights of the 1-D linear resize ``in_size -> out_size`` (align_corners=False)."""
    _check_size("out_size", out_size)
    _check_size("in_size", in_size)
    taps = _taps_cpu(out_size, in_size, dtype)
    if device is None or torch.device(device).type == "cpu":
        return taps
    return Taps(*(t.to(device) for t in taps))


def bilinear_matrix(out_size: int, in_size: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Dense interpolation matrix ``A [out, in]`` with ``A @ x == F.interpolate(x, mode="linear")`` (to rounding).

    Rows hold the two weights of :func:`bilinear_taps` (summed where both taps hit the clamped border).
    """
    i0, i1, w0, w1 = bilinear_taps(out_size, in_size, dtype, device)
    a = torch.zeros(out_size, in_size, dtype=dtype, device=w0.device)
    rows = torch.arange(out_size, device=w0.device)
    a.index_put_((rows, i0), w0, accumulate=True)
    a.index_put_((rows, i1), w1, accumulate=True)
    return a


def source_rows(out_size: int, in_size: int, rows: slice) -> tuple[int, int]:
    """Half-open range ``[lo, hi)`` of input rows that output ``rows`` read."""
    taps = _taps_cpu(_check_size("out_size", out_size), _check_size("in_size", in_size), torch.float32)
    start, stop, _ = rows.indices(out_size)
    if stop <= start:
        return 0, 0
    return int(taps.i0[start]), int(taps.i1[stop - 1]) + 1


def _width_pass(x: torch.Tensor, out_w: int) -> torch.Tensor:
    """``[N, r, w] -> [N, r, W]`` by PyTorch's own linear kernel (the 1-D kernel gives the same bits as the
    2-D one with the height unchanged, at about half the cost)."""
    if x.shape[-1] == out_w:
        return x
    n, r, w = x.shape
    return F.interpolate(x.reshape(1, n * r, w), size=out_w, mode="linear", align_corners=False).view(n, r, out_w)


class RowUpsampler:
    """Output row blocks of the bilinear resize of ``x [N, h, w]`` to ``size``, rows-first ``[R, N, W]``.

    The width pass of an input row is needed by every output row block that reads it; when the whole
    width-resized input fits in ``cache_elements`` floats it is computed once (rows-first) and the row blocks
    only do the height pass, otherwise each block resizes the few input rows it reads.
    """

    def __init__(self, x: torch.Tensor, size: Sequence[int], cache_elements: int = 0):
        self.x, self.size = x, (int(size[0]), int(size[1]))
        n, in_h, _ = x.shape
        self.cached = None
        if n * in_h * self.size[1] <= cache_elements:
            self.cached = _width_pass(x, self.size[1]).transpose(0, 1).contiguous()  # [h, N, W]

    def rows(self, rows: slice, out: torch.Tensor | None = None) -> torch.Tensor:
        out_h, out_w = self.size
        x = self.x
        n, in_h, in_w = x.shape
        start, stop, _ = rows.indices(out_h)
        lo, hi = source_rows(out_h, in_h, rows)
        if self.cached is not None:
            rows_first, base = self.cached, 0
        else:
            rows_first, base = _width_pass(x[:, lo:hi, :], out_w).transpose(0, 1), lo
        if out_h == in_h:
            block = rows_first[start - base:stop - base]
            return block.contiguous() if out is None else out.copy_(block)
        if self.cached is None:
            rows_first = rows_first.contiguous()  # [n_in, N, W]
        i0, i1, w0, w1 = bilinear_taps(out_h, in_h, x.dtype if x.dtype == torch.float64 else torch.float32,
                                       x.device)
        w0 = w0[start:stop].to(x.dtype).view(-1, 1, 1)
        w1 = w1[start:stop].to(x.dtype).view(-1, 1, 1)
        if out is None:
            out = torch.empty(stop - start, n, out_w, dtype=x.dtype, device=x.device)
        # consecutive output rows reading the same input pair form a group: broadcast the two input rows
        # (views, no gather copies) against the group's weights; addcmul_ is fma(y0, λ0, y1·λ1)
        _, sizes = torch.unique_consecutive(i0[start:stop] * in_h + i1[start:stop], return_counts=True)
        g0 = 0
        for size_g in sizes.tolist():
            a, b = int(i0[start + g0]) - base, int(i1[start + g0]) - base
            block_out = out[g0:g0 + size_g]
            torch.mul(rows_first[b:b + 1], w1[g0:g0 + size_g], out=block_out)
            block_out.addcmul_(rows_first[a:a + 1], w0[g0:g0 + size_g])
            g0 += size_g
        return out


def upsample_rows(x: torch.Tensor, size: Sequence[int], rows: slice, out: torch.Tensor | None = None) -> torch.Tensor:
    """Output rows ``rows`` of the bilinear resize of ``x [N, h, w]``, laid out rows-first: ``[R, N, W]``.

    Width pass by PyTorch's linear kernel on the few input rows needed (height unchanged, so rows are copied
    exactly); height pass as ``fma(y0, λ0, y1·λ1)`` (``torch.addcmul`` is a fused multiply-add), the
    operation order of PyTorch's kernel. The rows-first layout makes each output row one
    contiguous ``[N, W]`` block and lets the caller treat (row, template) pairs as one batch dimension.
    ``out``: an optional contiguous ``[R, N, W]`` tensor of ``x``'s dtype to write into (a reused buffer).
    Streaming many blocks of one input: :class:`RowUpsampler`.
    """
    return RowUpsampler(x, size).rows(rows, out)


def upsample_bilinear(x: torch.Tensor, size: Sequence[int], rows: slice | None = None) -> torch.Tensor:
    """Bilinear resize of ``x [..., h, w]`` to ``size = (H, W)`` (align_corners=False, no antialias).

    ``rows`` (a slice of ``range(H)``) selects the output rows to produce; only the input rows they read
    are touched, so a caller can stream an image row block by row block with peak memory independent of
    ``H``. Equals ``F.interpolate(x, size, mode="bilinear", align_corners=False)[..., rows, :]`` (bit for bit
    on CPU, on two threads, for float32 upsampling at protocol-like widths, else to ~1 ulp; module docstring).
    """
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise ValueError(f"x: expected a tensor [..., h, w], received {type(x).__name__} "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else ''}")
    if not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor, received dtype {x.dtype}")
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in size)):
        raise ValueError(f"size: expected a pair of positive ints (H, W), received {size!r}")
    rows = slice(0, size[0]) if rows is None else rows
    if not isinstance(rows, slice) or rows.indices(size[0])[2] != 1:
        raise ValueError(f"rows: expected a contiguous slice (step 1), received {rows!r}")
    lead = x.shape[:-2]
    out = upsample_rows(x.reshape(-1, *x.shape[-2:]), tuple(size), rows)  # [R, N, W]
    return out.permute(1, 0, 2).reshape(*lead, out.shape[0], size[1])


def two_tap_matmul(m: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    """``m [n_out, n_in]`` applied along ``dim`` of ``x``, rounded to float32, for a matrix with at most two
    non-zero weights per row (an interpolation matrix): the bits of a float64 matmul rounded to float32
    (``(m.double() @ x.double()).float()`` along ``dim``) at the cost of two taps per output. The products are
    exact in float64 and the zero terms add exact zeros, so any summation order rounds the two products' sum
    once. Other matrices take the dense float64 product."""
    nz = m != 0
    if bool((nz.sum(1) > 2).any()):
        return torch.movedim(torch.tensordot(m.double(), x.double(), dims=([1], [dim])), 0, dim).float()
    i0 = nz.int().argmax(1)
    i1 = m.shape[1] - 1 - nz.flip(1).int().argmax(1)
    w0 = m.gather(1, i0[:, None])[:, 0].double()
    w1 = torch.where(i1 != i0, m.gather(1, i1[:, None])[:, 0], torch.zeros_like(m[:, 0])).double()
    shape, lead = [1] * x.ndim, (slice(None),) * (dim % x.ndim)
    shape[dim] = -1
    out = x[lead + (i0,)].double().mul_(w0.view(shape))     # indexing: far faster than index_select on dim -1
    return out.addcmul_(x[lead + (i1,)].double(), w1.view(shape)).float()


@functools.lru_cache(maxsize=256)
def interp_matrix(n_in: int, n_out: int, device: str) -> torch.Tensor:
    """[n_out, n_in] weights of 1-D bilinear resizing, taken from ``F.interpolate`` itself (same kernel)."""
    eye = torch.eye(n_in, dtype=torch.float32, device=device)[None]            # [1, n_in(channels), n_in]
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T.contiguous()


def separable(rows: torch.Tensor, x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``rows · x · colsᵀ`` per channel of ``x [N, h, w]`` (interpolation matrices). On CPU each pass rounds the
    float64 sum of a row's two exact products once to float32 (:func:`two_tap_matmul`): the bits of a float64
    matmul rounded to float32, whatever the CPU's GEMM kernel, and what ``floss.protocol.kernels.argmax`` replicates."""
    if x.device.type == "cpu":
        return two_tap_matmul(rows, two_tap_matmul(cols, x, dim=2), dim=1).to(x.dtype)
    return rows_matmul(rows, torch.matmul(x, cols.T))


def rows_matmul(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[r, h] x [N, h, w] -> [N, r, w]`` as one 2-D matmul (a broadcast batched matmul is far slower)."""
    n, h, w = x.shape
    return (weights @ x.transpose(0, 1).reshape(h, n * w)).reshape(-1, n, w).transpose(0, 1)
