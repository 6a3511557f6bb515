"""NACLIP dense features (OVSS-models §2): reduced last block with key-key attention + Gaussian neighbourhood.

Default weights: open_clip ``ViT-B-16-quickgelu`` + ``openai`` (OpenAI CLIP uses QuickGELU; plain
``ViT-B-16`` with ``openai`` is refused, see ``backbone.resolve_weights``). Per window:

* positional embeddings: only when the token grid differs from the native one, NACLIP's DINO-style rule —
  bicubic with ``scale_factor = ((gh + 0.1) / h0, (gw + 0.1) / w0)``, ``align_corners=False``,
  ``recompute_scale_factor=False``. (NACLIP tests the token *count*; the two rules differ only for a grid
  with the native count but another shape, e.g. 7x28, which no protocol setting produces.)
* blocks 1..L-1 unchanged; last block: ``Y = LN1(X)``, ``[Q, K, V] = Y W_in^T + b_in``, per head
  ``A = softmax(K K^T / sqrt(d_h) + Omega)``, ``O = concat_h(A V) W_o^T + b_o`` — no residual, no FFN;
* ``ln_post`` then ``proj``; the CLS token is dropped; L2-normalised per patch.

``Omega[p, q] = exp(-|pos_p - pos_q|^2 / (2 sigma^2))`` on the patch grid (sigma = 5), 0 on the CLS row and
column, the same for every head, added after the scaling (closed form of NACLIP's convolution).

``precision="fp16"`` runs the model as OpenAI/NACLIP do on CUDA (fp16 weights, fp32 LayerNorm); it is
refused on CPU (a clear error) rather than silently run in fp32.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from floss.models.backbone import OpenClipDenseModel

logger = logging.getLogger(__name__)

__all__ = ["NACLIP", "gaussian_addition", "naclip_last_block", "resize_pos_embed_by_scale"]


def gaussian_addition(gh: int, gw: int, sigma: float = 5.0, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Omega [1 + gh*gw, 1 + gh*gw]: Gaussian of the patch distance, zero CLS row/column."""
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                            indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1)
    omega = torch.exp(-torch.cdist(pos, pos).square() / (2.0 * sigma * sigma))
    out = torch.zeros((gh * gw + 1, gh * gw + 1), dtype=torch.float64)
    out[1:, 1:] = omega
    return out.to(device=device, dtype=dtype)


def resize_pos_embed_by_scale(cls_pos: torch.Tensor, patch_pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[1 + gh*gw, D]: NACLIP's scale-factor bicubic resize of ``patch_pos`` [1, D, h0, w0] to ``grid``."""
    h0, w0 = patch_pos.shape[-2:]
    resized = F.interpolate(patch_pos, scale_factor=((grid[0] + 0.1) / h0, (grid[1] + 0.1) / w0), mode="bicubic",
                            align_corners=False, recompute_scale_factor=False)
    if tuple(resized.shape[-2:]) != tuple(grid):
        raise RuntimeError(f"NACLIP positional-embedding resize gave {tuple(resized.shape[-2:])}, expected {grid}")
    return torch.cat([cls_pos.reshape(1, -1).to(resized.dtype), resized.flatten(2)[0].T], dim=0)


def naclip_last_block(block, x: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """NACLIP's reduced last block on batch-first tokens ``x`` [B, N, D] (no residual, no FFN)."""
    B, N, D = x.shape
    heads = block.attn.num_heads
    d_h = D // heads
    y = block.ln_1(x)
    qkv = F.linear(y, block.attn.in_proj_weight, block.attn.in_proj_bias)
    _, k, v = qkv.reshape(B, N, 3, heads, d_h).permute(2, 0, 3, 1, 4)   # each [B, heads, N, d_h]
    logits = (k @ k.transpose(-1, -2)) * (d_h ** -0.5) + omega.to(k.dtype)
    attn = logits.softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(B, N, D)
    return block.attn.out_proj(out)


class NACLIP(OpenClipDenseModel):
    """NACLIP on an open_clip ViT (QuickGELU OpenAI weights by default)."""

    name = "naclip"
    authors_precision = "fp16"       # OpenAI's loader converts the weights to fp16 on CUDA (protocol §1.2)
    default_backbone = "ViT-B-16-quickgelu"
    default_pretrained = "openai"

    def __init__(self, backbone: str | None = None, pretrained: str | None = None, *, sigma: float = 5.0,
                 device="cpu", precision: str = "fp32", cache_dir: str | None = None, allow_download: bool = False):
        if not sigma > 0:
            raise ValueError(f"sigma: expected a positive Gaussian std, received {sigma!r}")
        super().__init__(backbone, pretrained, device=device, precision=precision, cache_dir=cache_dir,
                         allow_download=allow_download)
        self.sigma = float(sigma)
        self._omega_cache: dict[tuple[int, int], torch.Tensor] = {}

    def omega(self, grid: tuple[int, int]) -> torch.Tensor:
        if grid not in self._omega_cache:
            self._omega_cache[grid] = gaussian_addition(*grid, self.sigma, device=self.device)
        return self._omega_cache[grid]

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """NACLIP positional embeddings [1 + gh*gw, D] for a ``grid = (gh, gw)`` window."""
        pos = self.visual.positional_embedding
        if tuple(grid) == self.native_grid:
            return pos
        return resize_pos_embed_by_scale(pos[0].float(), self.patch_pos_embed(), grid)

    def window_features(self, x: torch.Tensor) -> torch.Tensor:
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        if min(grid) < 1:
            raise ValueError(f"x: windows of {tuple(x.shape[-2:])} pixels are smaller than one "
                             f"{self.patch_size}-pixel patch")
        tokens = self.run_blocks(self.embed(x, self.pos_embed_for(grid)), -1)
        tokens = naclip_last_block(self.visual.transformer.resblocks[-1], tokens, self.omega(grid))
        feats = (self.visual.ln_post(tokens[:, 1:]) @ self.visual.proj).float()
        feats = feats / feats.norm(dim=-1, keepdim=True)
        return feats.reshape(x.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2)
