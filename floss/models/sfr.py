"""ResCLIP's Semantic Feedback Refinement helpers (OVSS-models-2025 §1.3): PAMR, per-patch labels, the SFR matrix.

Pure tensor functions, re-implemented from the formulas (no code of ResCLIP or of PAMR's repository is used).

* :func:`pamr` — pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), as ResCLIP's pass 1 calls it
  (10 iterations, dilations (8, 16)). For an image ``I`` [B, C, H, W] and every dilation ``d`` the 8 neighbours
  ``n`` of a pixel at offsets ``d·{-1,0,1}²\\{0}`` (replicate padding)::

      sigma_c   = std over the 3x3 window incl. the centre, over all dilations (9·len(d) values, unbiased)
      kappa_n   = softmax_n( mean_c( -|I_c - I_c(n)| / (1e-8 + 0.1 sigma_c) ) )      # over 8·len(d) neighbours
      M <- sum_n kappa_n · M(n)                                                      # num_iter times

* :func:`patch_labels` — argmax over the query words of the pass-1 probabilities, pixels whose max is below
  ``temp_thd`` get label 0, then the mode of every ``p x p`` pixel block (torch.mode: smallest label on ties).
* :func:`sfr_matrix` — the SFR affinity of a label grid ``l`` (h x w, raster order, N = hw)::

      E_ij  = 1[l_i = l_j]
      E_ij <- E_ij                               if the prefix path i -> j carries l_i   (V_ij = 1)
              E_ij · exp(-dinf(i, j) / dinf_max)  otherwise
      Shat  = rownorm(relu(E * g_sigma)) with a zero CLS row/column, [1 + N, 1 + N]

  ``V_ij`` samples m = 0..dinf(i, j) at t_m = m / dinf_max (float32 ``linspace(0, 1, dinf_max + 1)``), position
  ``round((1 - t_m) p_i + t_m p_j)`` (half to even) — only the first dinf(i,j)/dinf_max of the segment is checked,
  as in the released code. ``g_sigma`` is a normalised 1-D Gaussian of length min(N, int(6 sigma + 1)) made odd,
  convolved along the flattened key index with zero padding (horizontal only, wrapping onto the next grid row).
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["pamr", "patch_labels", "sfr_matrix", "raster_gaussian_kernel"]

# the 8 neighbour offsets (row, col) of a 3x3 window, and the 9 cells incl. the centre
_NEIGHBOURS = [(r, c) for r in (-1, 0, 1) for c in (-1, 0, 1) if (r, c) != (0, 0)]
_WINDOW = [(r, c) for r in (-1, 0, 1) for c in (-1, 0, 1)]


def _shifted(x: torch.Tensor, offsets, dilations: Sequence[int]) -> torch.Tensor:
    """[B, C, P, H, W]: ``x`` read at ``pixel + d·offset`` (replicate padding), for every dilation and offset."""
    H, W = x.shape[-2:]
    out = []
    for d in dilations:
        padded = F.pad(x, [d] * 4, mode="replicate")
        out.extend(padded[..., d + d * r:d + d * r + H, d + d * c:d + d * c + W] for r, c in offsets)
    return torch.stack(out, dim=2)


def pamr(image: torch.Tensor, mask: torch.Tensor, num_iter: int = 10,
         dilations: Sequence[int] = (8, 16)) -> torch.Tensor:
    """PAMR of ``mask`` [B, K, H, W] guided by ``image`` [B, C, H, W] (formula in the module docstring)."""
    if mask.shape[-2:] != image.shape[-2:]:
        mask = F.interpolate(mask, size=image.shape[-2:], mode="bilinear", align_corners=True)
    std = _shifted(image, _WINDOW, dilations).std(dim=2, keepdim=True)
    diff = (image[:, :, None] - _shifted(image, _NEIGHBOURS, dilations)).abs()
    kappa = (-diff / (1e-8 + 0.1 * std)).mean(dim=1, keepdim=True).softmax(dim=2)   # [B, 1, P, H, W]
    for _ in range(num_iter):
        mask = (_shifted(mask, _NEIGHBOURS, dilations) * kappa).sum(dim=2)
    return mask


def patch_labels(probs: torch.Tensor, patch: int, temp_thd: float) -> torch.Tensor:
    """[gh, gw] int64 labels of ``probs`` [K', H, W] (pass-1 probabilities of one window)."""
    pred = probs.argmax(dim=0)
    pred[probs.max(dim=0).values < temp_thd] = 0
    gh, gw = probs.shape[-2] // patch, probs.shape[-1] // patch
    blocks = pred[:gh * patch, :gw * patch].unfold(0, patch, patch).unfold(1, patch, patch)
    return torch.mode(blocks.reshape(gh, gw, patch * patch), dim=-1).values


def raster_gaussian_kernel(n: int, sigma: float) -> torch.Tensor:
    """The normalised 1-D Gaussian of the SFR smoothing: length min(n, int(6 sigma + 1)) made odd."""
    size = min(n, int(6 * sigma + 1))
    size = size if size % 2 == 1 else size + 1
    x = torch.arange(size) - size // 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _path_valid(labels: torch.Tensor, rows: slice, dmax: int) -> torch.Tensor:
    """V[i, j] for the query patches ``rows`` (prefix line-of-sight test of the module docstring)."""
    gh, gw = labels.shape
    n = gh * gw
    idx = torch.arange(n, device=labels.device)
    coords = torch.stack((idx // gw, idx % gw), dim=-1)                                 # [N, 2]
    start = coords[rows][:, None, None, :].float()                                     # [R, 1, 1, 2]
    end = coords[None, :, None, :].float()                                             # [1, N, 1, 2]
    t = torch.linspace(0, 1, dmax + 1, device=labels.device)[None, None, :, None]       # [1, 1, T, 1]
    cur = (start * (1 - t) + end * t).round().long()                                   # [R, N, T, 2]
    steps = (coords[rows][:, None, :] - coords[None, :, :]).abs().amax(-1)              # [R, N]
    in_prefix = torch.arange(dmax + 1, device=labels.device) <= steps[..., None]        # [R, N, T]
    same = labels[cur[..., 0], cur[..., 1]] == labels.flatten()[rows][:, None, None]
    return (same | ~in_prefix).all(dim=-1)


def sfr_matrix(labels: torch.Tensor, sigma: float = 5.0, decay: bool = True,
               chunk: int = 64) -> torch.Tensor:
    """Shat [1 + N, 1 + N] float32 of a label grid ``labels`` [gh, gw] (module docstring); ``decay=False`` skips
    the connectivity decay (ResCLIP's ``delete_same_entity=False``; every shipped config sets it True)."""
    gh, gw = labels.shape
    n = gh * gw
    flat = labels.flatten()
    same = (flat[:, None] == flat[None, :]).float()
    if decay:
        idx = torch.arange(n, device=labels.device)
        coords = torch.stack((idx // gw, idx % gw), dim=-1)
        steps = (coords[:, None, :] - coords[None, :, :]).abs().amax(-1)               # Chebyshev distance
        dmax = int(steps.max())
        if dmax > 0:          # a 1x1 grid has a single, trivially connected patch
            valid = torch.cat([_path_valid(labels, slice(s, s + chunk), dmax) for s in range(0, n, chunk)])
            same = torch.where(valid, same, same * torch.exp(-steps / dmax))
    kernel = raster_gaussian_kernel(n, sigma).to(same)
    blurred = F.relu(F.conv1d(same[:, None], kernel.view(1, 1, -1), padding=kernel.numel() // 2)[:, 0])
    out = torch.zeros((n + 1, n + 1), dtype=torch.float32, device=labels.device)
    out[1:, 1:] = blurred / (blurred.sum(dim=1, keepdim=True) + 1e-8)
    return out
