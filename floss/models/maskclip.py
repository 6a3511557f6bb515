"""MaskCLIP dense features as FLOSS runs them (CLIP-DINOiser's open_clip MaskCLIP, OVSS-models §1a).

Default weights: open_clip ``ViT-B-16`` + ``laion2b_s34b_b88k`` (a plain-GELU model). Per window:

* positional embeddings: the native patch grid resized **by size** (bicubic, ``align_corners=False``) to the
  window's grid, CLS embedding kept (done for every window, an identity resize at the native size);
* blocks 1..L-1 unchanged; the last block's attention is replaced by its value path
  ``O = (LN1(X) W_v^T + b_v) W_o^T + b_o``, residual kept, FFN and its residual kept;
* ``ln_post`` then ``proj``; the CLS token is dropped. Features are L2-normalised per patch on output.

open_clip 3.x runs the ViT batch-first, so none of the authors' ``permute(1, 0, 2)`` are needed.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from floss.models.backbone import OpenClipDenseModel

logger = logging.getLogger(__name__)

__all__ = ["MaskCLIP", "maskclip_last_block", "resize_pos_embed_by_size"]


def resize_pos_embed_by_size(cls_pos: torch.Tensor, patch_pos: torch.Tensor, grid: tuple[int, int], *,
                             antialias: bool = False) -> torch.Tensor:
    """[1 + gh*gw, D]: bicubic size-based resize of ``patch_pos`` [1, D, h0, w0] to ``grid``, CLS first.

    ``antialias=True`` is GEM's variant (timm's ``resample_abs_pos_embed``); it changes the values even when
    upsampling."""
    resized = F.interpolate(patch_pos, size=tuple(grid), mode="bicubic", align_corners=False, antialias=antialias)
    return torch.cat([cls_pos.reshape(1, -1).to(resized.dtype), resized.flatten(2)[0].T], dim=0)


def maskclip_last_block(block, x: torch.Tensor) -> torch.Tensor:
    """MaskCLIP's last block on batch-first tokens ``x`` [B, N, D]: value path + residual + FFN residual."""
    width = x.shape[-1]
    y = block.ln_1(x)
    w_v = block.attn.in_proj_weight[2 * width:]
    b_v = block.attn.in_proj_bias[2 * width:]
    z = x + block.ls_1(F.linear(F.linear(y, w_v, b_v), block.attn.out_proj.weight, block.attn.out_proj.bias))
    return z + block.ls_2(block.mlp(block.ln_2(z)))


class MaskCLIP(OpenClipDenseModel):
    """MaskCLIP (value-path last block) on an open_clip ViT; ``window_features`` is L2-normalised."""

    name = "maskclip"
    default_backbone = "ViT-B-16"
    default_pretrained = "laion2b_s34b_b88k"

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """MaskCLIP positional embeddings [1 + gh*gw, D] for a ``grid = (gh, gw)`` window."""
        return resize_pos_embed_by_size(self.visual.positional_embedding[0].float(), self.patch_pos_embed(), grid)

    def dense_features(self, x: torch.Tensor, inter_block: int | None = None):
        """Unnormalised MaskCLIP features [B, E, gh, gw] of CLIP-normalised windows ``x`` [B, 3, h, w].

        With ``inter_block`` (a negative block index) also returns the ``ln_2`` output of that block's
        patch tokens as [B, width, gh, gw] (CLIP-DINOiser's ``clip_inter``).
        """
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        if min(grid) < 1:
            raise ValueError(f"x: windows of {tuple(x.shape[-2:])} pixels are smaller than one "
                             f"{self.patch_size}-pixel patch")
        tokens = self.embed(x, self.pos_embed_for(grid))
        captured = {}
        handle = None
        if inter_block is not None:
            def hook(_module, _inputs, output):
                captured["inter"] = output
            handle = self.visual.transformer.resblocks[inter_block].ln_2.register_forward_hook(hook)
        try:
            tokens = self.run_blocks(tokens, -1)
        finally:
            if handle is not None:
                handle.remove()
        tokens = maskclip_last_block(self.visual.transformer.resblocks[-1], tokens)
        feats = self.visual.ln_post(tokens[:, 1:]) @ self.visual.proj
        B = x.shape[0]
        feats = feats.reshape(B, grid[0], grid[1], -1).permute(0, 3, 1, 2)
        if inter_block is None:
            return feats
        inter = captured["inter"][:, 1:].reshape(B, grid[0], grid[1], -1).permute(0, 3, 1, 2)
        return feats, inter

    def window_features(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.dense_features(x).float()
        return feats / feats.norm(dim=1, keepdim=True)
