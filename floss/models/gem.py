"""GEM dense features (OVSS-models-more §2): self-self attention on a parallel path over the last blocks.

Bousselham, Petersen, Ferrari, Kuehne, "Grounding Everything: Emerging Localization Properties in
Vision-Language Transformers", CVPR 2024 (github.com/WalBouss/GEM), **MIT** licence (© 2023 the authors).
Re-implemented from the formulas; the ``gem_torch`` package itself cannot be used with open_clip >= 2.26 (its
LND permute silently turns every block into identity attention on batch-first open_clip).

Default weights: open_clip ``ViT-B-16-quickgelu`` + ``openai`` (GEM's ``'ViT-B/16'`` + ``'openai'`` goes through
``load_openai_model`` in open_clip <= 2.23: QuickGELU), fp32 (``authors_precision = "fp32"``).

Closed form (no module surgery). With ``depth`` (default 7) the last ``depth - 1`` blocks j = L-6..L-1 carry the
GEM path; ``x_j`` is the output of block j of the UNMODIFIED model (the original path feeds every next block)::

    g = x_{L-7} + sum_{j=L-6}^{L-1} out_proj_j(SS_j(LN1_j(x_{j-1})))      # accumulated, no ln_2, no FFN
    F = LN_post(g) · proj,  CLS dropped, L2-normalised per patch

``SS`` (self-self attention), per head over all 1 + hw tokens incl. CLS, with q, k, v from the block's fused
``in_proj`` on ``y = LN1_j(x_{j-1})``; for each P in {q, k, v} separately::

    P <- softmax(tau P^ P^T) P^,   P^ = L2norm(P)          (ss_attn_iter times, default 1)
    P^ = L2norm(P);  out_P = softmax(tau P^ P^T) v        (v un-normalised)
    SS = (out_q + out_k + out_v) / 3

``tau = mean_t ||y_t||_2 · d_h^-1/2`` per image (the "adaptive temperature": token norms over the full width
D), unless ``ss_attn_temp`` is given.

Positional embeddings: when the grid differs from the native one, size-based bicubic WITH ``antialias=True``
(timm's ``resample_abs_pos_embed``), CLS kept — unlike both MaskCLIP's size rule and SCLIP's scale rule.

``ignore_residual=True`` is ClearCLIP's re-run of GEM (its vendored GEM's ``GEMResidualBlock``, segmentor default
``ignore_residual=True``, OVSS-models-more §3.1): the GEM path keeps only the LAST block's self-self output,
``g = out_proj_L(SS_L(LN1_L(x_{L-1})))``, no accumulation (depth then only needs to be >= 2). Registered as
``gem_quoted`` (:class:`GEMQuoted`): that form, fp16 on CUDA (ClearCLIP builds the GEM model with
``precision='fp16'``), ClearCLIP's settings, same positional-embedding rule (its vendored GEM keeps GEM's
size + antialias resample). The FLOSS paper's quoted GEM numbers most likely come from this re-run.

Protocol: GEM ships no segmentation evaluation. ``transform="clearclip"`` (default) uses ClearCLIP's re-run
protocol (short side 448, 448/224 windows, Cityscapes 224/224, logit scale 50: ``settings_for("gem", ...)``),
which produced the only public GEM numbers on FLOSS's datasets; ``transform="gem"`` uses GEM's own library
transform (bicubic resize to 448x448 ignoring the aspect ratio, whole image: ``settings_for("gem_448", ...)``).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from floss.models.backbone import OpenClipDenseModel, merge_heads, qkv_heads
from floss.models.maskclip import resize_pos_embed_by_size

logger = logging.getLogger(__name__)

__all__ = ["GEM", "GEMQuoted", "self_self_attention", "TRANSFORMS"]

#: ``GEM(transform=...)`` -> the protocol-table model whose settings it uses
TRANSFORMS = {"clearclip": "gem", "gem": "gem_448"}


def self_self_attention(block, y: torch.Tensor, iters: int = 1, temperature: float | None = None) -> torch.Tensor:
    """GEM's self-self attention output ``out_proj(SS(y))`` [B, N, D] of ``block`` for ``y = LN1(x)`` [B, N, D].

    Each ``softmax(tau A A^T) M`` is a fused ``scaled_dot_product_attention(tau A, A, M, scale=1)`` (no N x N
    map is materialised; about 2x faster than the explicit products on CPU, equal up to rounding), with the
    q, k and v streams stacked along the batch axis."""
    q, k, v = qkv_heads(block, y)
    B = q.shape[0]
    if temperature is None:   # adaptive: mean token norm of each image (full width D) times d_h^-1/2
        tau = (y.norm(dim=-1).mean(dim=-1) * q.shape[-1] ** -0.5)[:, None, None, None].repeat(3, 1, 1, 1)
        tau = tau.to(q.dtype)     # fp16 runs: keep the attention inputs in one dtype
    else:
        tau = float(temperature)
    p = torch.cat((q, k, v))                          # [3B, heads, N, d_h]: P in (q, k, v)
    for _ in range(iters):
        p = F.normalize(p, dim=-1)
        p = F.scaled_dot_product_attention(tau * p, p, p, scale=1.0)
    p = F.normalize(p, dim=-1)
    out = F.scaled_dot_product_attention(tau * p, p, v.repeat(3, 1, 1, 1), scale=1.0)   # un-normalised v
    return block.attn.out_proj(merge_heads((out[:B] + out[B:2 * B] + out[2 * B:]) / 3))


class GEM(OpenClipDenseModel):
    """GEM on an open_clip ViT (QuickGELU OpenAI weights, fp32 by default); ``window_features`` is L2-normalised."""

    name = "gem"
    default_backbone = "ViT-B-16-quickgelu"
    default_pretrained = "openai"
    authors_precision = "fp32"

    def __init__(self, backbone: str | None = None, pretrained: str | None = None, *, depth: int = 7,
                 ss_attn_iter: int = 1, ss_attn_temp: float | None = None, transform: str = "clearclip",
                 ignore_residual: bool = False, device="cpu", precision: str = "fp32", cache_dir: str | None = None, allow_download: bool = False):
        # argument checks before the (slow) weight load
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 2:
            raise ValueError(f"depth: expected an int >= 2 (GEM path over the last depth - 1 blocks), "
                             f"received {depth!r}")
        if isinstance(ss_attn_iter, bool) or not isinstance(ss_attn_iter, int) or ss_attn_iter < 0:
            raise ValueError(f"ss_attn_iter: expected an int >= 0, received {ss_attn_iter!r}")
        if ss_attn_temp is not None and (isinstance(ss_attn_temp, bool) or not isinstance(ss_attn_temp, (int, float))
                                         or not ss_attn_temp > 0):
            raise ValueError(f"ss_attn_temp: expected None (adaptive) or a positive number, received {ss_attn_temp!r}")
        if not isinstance(ignore_residual, bool):
            raise ValueError(f"ignore_residual: expected True or False, received {ignore_residual!r}")
        if transform not in TRANSFORMS:
            raise ValueError(f"transform: expected one of {sorted(TRANSFORMS)} (clearclip = ClearCLIP's re-run "
                             f"protocol, gem = GEM's 448x448 resize), received {transform!r}")
        super().__init__(backbone, pretrained, device=device, precision=precision, cache_dir=cache_dir,
                         allow_download=allow_download)
        n_blocks = len(self.visual.transformer.resblocks)
        if depth - 1 > n_blocks:
            raise ValueError(f"depth: {self.backbone} has {n_blocks} blocks, so depth can be at most "
                             f"{n_blocks + 1}; received {depth}")
        self.depth, self.ss_attn_iter = depth, ss_attn_iter
        self.ss_attn_temp = None if ss_attn_temp is None else float(ss_attn_temp)
        self.transform, self.ignore_residual = transform, ignore_residual
        self.protocol_model = TRANSFORMS[transform]     # read by DenseModel.protocol_settings

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """GEM positional embeddings [1 + gh*gw, D]: native at the native grid, else bicubic + antialias by size."""
        pos = self.visual.positional_embedding
        if tuple(grid) == self.native_grid:
            return pos
        return resize_pos_embed_by_size(pos[0].float(), self.patch_pos_embed(), tuple(grid), antialias=True)

    def gem_tokens(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The GEM path ``g`` [B, 1 + gh*gw, D] of CLIP-normalised windows ``x`` (before ``ln_post``)."""
        blocks = self.visual.transformer.resblocks
        if self.ignore_residual:             # ClearCLIP's re-run: only the last block's SS output survives
            tokens, blk = self.run_blocks(self.embed(x, self.pos_embed_for(grid)), -1), blocks[-1]
            return blk.ls_1(self_self_attention(blk, blk.ln_1(tokens), self.ss_attn_iter, self.ss_attn_temp))
        first = len(blocks) - (self.depth - 1)
        tokens = self.run_blocks(self.embed(x, self.pos_embed_for(grid)), first)
        g = tokens
        for j, blk in enumerate(blocks[first:], start=first):
            g = g + blk.ls_1(self_self_attention(blk, blk.ln_1(tokens), self.ss_attn_iter, self.ss_attn_temp))
            if j < len(blocks) - 1:          # the last block's original output is never needed
                tokens = blk(tokens)
        return g

    def window_features(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.window_grid(x)
        return self.patch_features(self.gem_tokens(x, grid), grid)


class GEMQuoted(GEM):
    """GEM as ClearCLIP re-ran it (``ignore_residual=True``, fp16 on CUDA, ClearCLIP's settings): ``gem_quoted``."""

    name = "gem_quoted"
    authors_precision = "fp16"

    def __init__(self, backbone: str | None = None, pretrained: str | None = None, *, ignore_residual: bool = True,
                 **kw):
        super().__init__(backbone, pretrained, ignore_residual=ignore_residual, **kw)
        if self.transform == "clearclip":
            self.protocol_model = "gem_quoted"
