"""SCLIP dense features (OVSS-models-more §1): correlative self-attention in the last block, residual and FFN kept.

Wang, Mei, Yuille, "SCLIP: Rethinking Self-Attention for Dense Vision-Language Inference", ECCV 2024
(github.com/wangf3014/SCLIP). The repository has **no licence** (all rights reserved), so this module is
re-implemented from the formulas, not from its code.

Default weights: open_clip ``ViT-B-16-quickgelu`` + ``openai`` (SCLIP loads OpenAI's ViT-B/16, QuickGELU). On
CUDA the authors run fp16 (OpenAI ``convert_weights``, fp32 LayerNorm): ``authors_precision = "fp16"``. Per window:

* positional embeddings: only when the token grid differs from the native one, the DINO-style scale-factor
  rule ``bicubic(scale_factor=((gh + 0.1) / h0, (gw + 0.1) / w0))``, CLS kept (NACLIP's
  :func:`~floss.models.naclip.resize_pos_embed_by_scale`). SCLIP's 224 windows never trigger it. (SCLIP
  tests the token *count*; that differs from testing the grid only for a grid with the native count but
  another shape, e.g. 7x28, which no protocol setting produces.)
* blocks 1..L-1 unchanged. Last block, with ``X`` the output of block L-1 (1 + hw tokens incl. CLS),
  ``Y = LN1(X)``, ``[Q, K, V] = Y W_in^T + b_in`` split per head (``s = d_h^-1/2``)::

      A = softmax(s Q Q^T) + softmax(s K K^T)      # two row-softmaxes over all 1 + hw keys, summed (rows sum to 2)
      Z = X + out_proj(concat_h A V)               # attention residual KEPT
      Z = Z + MLP(LN2(Z))                          # FFN and its residual KEPT

  The factor 2 is not normalised away: with the residual kept it changes the features.
* ``ln_post`` on all tokens, ``@ proj``, CLS dropped, L2-normalised per patch.
"""
from __future__ import annotations

import logging

import torch

from floss.models.backbone import OpenClipDenseModel, merge_heads, qkv_heads
from floss.models.naclip import resize_pos_embed_by_scale

logger = logging.getLogger(__name__)

__all__ = ["SCLIP", "sclip_last_block", "ScaleRulePosEmbed"]


def sclip_last_block(block, x: torch.Tensor) -> torch.Tensor:
    """SCLIP's last block on batch-first tokens ``x`` [B, N, D]: correlative attention + residual + FFN."""
    q, k, v = qkv_heads(block, block.ln_1(x))
    scale = q.shape[-1] ** -0.5
    attn = ((q @ q.transpose(-1, -2)) * scale).softmax(dim=-1) + ((k @ k.transpose(-1, -2)) * scale).softmax(dim=-1)
    x = x + block.ls_1(block.attn.out_proj(merge_heads(attn @ v)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


class ScaleRulePosEmbed:
    """Mixin for open_clip models with the DINO-style scale-factor pos-embed rule (SCLIP, ClearCLIP, NACLIP's)."""

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """Positional embeddings [1 + gh*gw, D]: native ones at the native grid, else the (g + 0.1) / g0 rule."""
        pos = self.visual.positional_embedding
        if tuple(grid) == self.native_grid:
            return pos
        return resize_pos_embed_by_scale(pos[0].float(), self.patch_pos_embed(), tuple(grid))


class SCLIP(ScaleRulePosEmbed, OpenClipDenseModel):
    """SCLIP on an open_clip ViT (QuickGELU OpenAI weights by default); ``window_features`` is L2-normalised."""

    name = "sclip"
    default_backbone = "ViT-B-16-quickgelu"
    default_pretrained = "openai"
    authors_precision = "fp16"

    def window_features(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.window_grid(x)
        tokens = self.run_blocks(self.embed(x, self.pos_embed_for(grid)), -1)
        tokens = sclip_last_block(self.visual.transformer.resblocks[-1], tokens)
        return self.patch_features(tokens, grid)
