"""ClearCLIP dense features (OVSS-models-more §3): query-query attention, residual and FFN dropped in the last block.

Lan et al., "ClearCLIP: Decomposing CLIP Representations for Dense Vision-Language Inference", ECCV 2024
(github.com/mc-lan/ClearCLIP), released under the **NTU S-Lab License 1.0** (non-commercial use only). This
module is re-implemented from the formulas, not from its code.

Default weights: open_clip ``ViT-B-16-quickgelu`` + ``openai`` (ClearCLIP's vendored open_clip 2.24 loads
``openai`` through ``load_openai_model``: QuickGELU). The authors build the model in fp16 whatever the device:
``authors_precision = "fp16"``. This is the paper's ``model_type='ClearCLIP'`` with ``ignore_residual=True``
(the repository's ``base_config.py`` ships ``model_type='vanilla'``, which is not ClearCLIP). Per window:

* positional embeddings: only when the token grid differs from the native one, the DINO-style scale-factor
  rule (g + 0.1) / g0, bicubic, CLS kept, as SCLIP (:class:`~floss.models.sclip.ScaleRulePosEmbed`). It is hit
  by ClearCLIP's 448 windows (B/16: 14x14 -> 28x28).
* blocks 1..L-1 unchanged. Last block, with ``X`` the output of block L-1, ``Y = LN1(X)``,
  ``[Q, K, V] = Y W_in^T + b_in`` split per head, ``s = d_h^-1/2``::

      O = out_proj(concat_h softmax(s Q Q^T) V)     # softmax over all 1 + hw keys incl. CLS
      F = LN_post(O) · proj                         # NO attention residual, NO ln_2, NO FFN

* CLS dropped, L2-normalised per patch.

Not reproduced: ClearCLIP zero-pads each window, centred, to a multiple of the patch size and crops the logits
back. With its settings (short side 448, 448 or 224 windows) this never happens unless an image side is
below the crop and not a patch multiple (aspect ratio > 4.57); floss then drops the partial patches (as
SCLIP/NACLIP do) and logs a warning.
"""
from __future__ import annotations

import logging

import torch

from floss.models.backbone import OpenClipDenseModel, merge_heads, qkv_heads
from floss.models.sclip import ScaleRulePosEmbed

logger = logging.getLogger(__name__)

__all__ = ["ClearCLIP", "clearclip_last_block"]


def clearclip_last_block(block, x: torch.Tensor) -> torch.Tensor:
    """ClearCLIP's last block on batch-first tokens ``x`` [B, N, D]: ``out_proj(softmax(s q q^T) v)`` alone."""
    q, _, v = qkv_heads(block, block.ln_1(x))
    attn = ((q @ q.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(dim=-1)
    return block.attn.out_proj(merge_heads(attn @ v))


class ClearCLIP(ScaleRulePosEmbed, OpenClipDenseModel):
    """ClearCLIP on an open_clip ViT (QuickGELU OpenAI weights by default); ``window_features`` is L2-normalised."""

    name = "clearclip"
    default_backbone = "ViT-B-16-quickgelu"
    default_pretrained = "openai"
    authors_precision = "fp16"

    def __init__(self, backbone: str | None = None, pretrained: str | None = None, *, device="cpu",
                 precision: str = "fp32", cache_dir: str | None = None, allow_download: bool = False):
        super().__init__(backbone, pretrained, device=device, precision=precision, cache_dir=cache_dir,
                         allow_download=allow_download)
        self._warned_padding = False

    def window_features(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.window_grid(x)
        if (x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size) and not self._warned_padding:
            logger.warning("clearclip: a %dx%d window is not a multiple of the %d-pixel patch; ClearCLIP would pad "
                           "it (centred) and crop the logits back, floss drops the partial patches",
                           x.shape[-2], x.shape[-1], self.patch_size)
            self._warned_padding = True
        tokens = self.run_blocks(self.embed(x, self.pos_embed_for(grid)), -1)
        tokens = clearclip_last_block(self.visual.transformer.resblocks[-1], tokens)
        return self.patch_features(tokens, grid)
