"""SC-CLIP dense features (OVSS-models-2025 §2): anomaly fill, affinity aggregation and a multi-level second pass.

Bai, Liu, Han, Zhang, Tang (et al.), "Self-Calibrated CLIP for Training-Free Open-Vocabulary Segmentation"
(arXiv 2411.15869; github.com/SuleBai/SC-CLIP, **no licence**: all rights reserved). Re-implemented from the
formulas, not from its code.

Default weights: open_clip ``ViT-B-16-quickgelu`` + ``openai``, fp16 on CUDA (``authors_precision = "fp16"``).
Blocks 1..L-1 run unchanged (X_j = output of block j). With n(.) the per-token L2 normalisation,
rho(S) = S / (row sum + 1e-6), S_{>=b} = S with entries < b set to 0, beta = 0.4, gamma = ``res_cls`` (0.3), and
the B/16 blocks ``pre`` = 9, ``post`` = 4, ``multi`` = 4..10 (1-based; ViT-L/14: 17, 7, 9..19, gamma 0.1)::

    O     = anomalies of patches(X_{L-1})                    (:func:`lof_anomalies`, or the release's norm top-10)
    P     = Phi_O(patches(X_{L-1})),  c = CLS(X_{L-1})       # Phi_O: mean of the valid in-grid 8-neighbours not in O
    S_mid = n(Phi_O(patches(X_pre))) n(.)^T;   S_post = n(patches(X_post)) n(.)^T       (no fill in S_post)
    Attn(Y)^h = 1/2 [softmax(M) + softmax(s k^h k^h^T)] v^h,  M = 3 (S_mid - mean S_mid), M < 0 -> -inf
                (q unused, N patch tokens, no CLS; out_proj with bias; no residual, no ln_2, no FFN)
    Z1 = rho(S_post_{>=b}) [Attn(LN1(rho(S_mid_{>=b}) P)) + gamma c]
    R  = sum_{j in multi} X_j                                  # sum, not mean; CLS included, no fill
    Z2 = rho(S_post_{>=b}) [Attn(LN1(patches(R))) + gamma CLS(R)]
    F  = LN_post(Z1 + Z2) · proj                               # N tokens: nothing is dropped

Anomaly detector (``detector``): ``"lof"`` (default; the repository's HEAD 0417ba9, the paper's LOF): squared
Euclidean distances in fp32, the k = 30 nearest neighbours without self, kappa_i = distance to the 30th,
score_i = mean_j kappa_i / kappa_j over the neighbours, O = {score > quantile_0.95(score)} (10 of 196 at 224 px
B/16). ``"norm"``: the release 74471da behind the Nov-2024 numbers, the 10 patch tokens of largest L2 norm.

Beyond the original's domain (where it raises; everywhere else the two are identical): a non-square window (the
original decodes flat indices with the row count for both division and modulo, so any other grid fails) uses its
true h×w grid for the neighbour fill, and a window of at most k patches (tiny images) takes every other patch as
its LOF neighbours (k = N − 1). The positional embeddings of a non-native grid follow SCLIP's scale-factor rule.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F

from floss.models.backbone import OpenClipDenseModel, merge_heads, qkv_heads
from floss.models.sclip import ScaleRulePosEmbed

logger = logging.getLogger(__name__)

__all__ = ["SCCLIP", "lof_anomalies", "norm_anomalies", "fill_anomalies", "scclip_attention", "DETECTORS",
           "BACKBONE_PARAMS"]

DETECTORS = ("lof", "norm")
BETA = 0.4
#: (pre, post, multi_start, multi_end, gamma) as 1-based blocks (multi = start..end inclusive), per ViT depth
BACKBONE_PARAMS = {12: (9, 4, 4, 10, 0.3), 24: (17, 7, 9, 19, 0.1)}


def lof_anomalies(tokens: torch.Tensor, k: int = 30, contamination: float = 0.05) -> torch.Tensor:
    """Indices of the anomalous rows of ``tokens`` [N, D] (simplified LOF of SC-CLIP's HEAD, in fp32)."""
    t = tokens.float()
    k = min(k, t.shape[0] - 1)          # at most k patches (the original raises): every other patch is a neighbour
    if k < 1:
        return torch.zeros(0, dtype=torch.long, device=t.device)
    dist = torch.cdist(t, t, compute_mode="donot_use_mm_for_euclid_dist").square()
    knn, idx = torch.topk(dist, k=k + 1, largest=False)
    knn, idx = knn[:, 1:], idx[:, 1:]                                   # the first column is "self"
    kappa = knn[:, -1:]
    lrd = k / torch.nan_to_num(torch.maximum(knn, kappa).mean(dim=1), nan=1e-6)
    scores = (lrd[idx] / lrd[:, None]).mean(dim=1)
    return torch.nonzero(scores > torch.quantile(scores, 1 - contamination))[:, 0]


def norm_anomalies(tokens: torch.Tensor, count: int = 10) -> torch.Tensor:
    """The ``count`` rows of ``tokens`` [N, D] with the largest L2 norm (SC-CLIP's release)."""
    return torch.topk(tokens.float().norm(dim=-1), k=min(count, tokens.shape[0])).indices


def fill_anomalies(patches: torch.Tensor, anomalies: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Phi_O: every token of ``anomalies`` in ``patches`` [N, D] (raster order on ``grid``) replaced by the mean of
    its in-grid 8-neighbours that are not anomalies (unchanged when it has none)."""
    gh, gw = grid
    if anomalies.numel() == 0:
        return patches
    fmap = patches.T.reshape(1, -1, gh, gw)
    keep = torch.ones((1, 1, gh, gw), dtype=fmap.dtype, device=fmap.device)
    keep.view(-1)[anomalies] = 0
    ring = torch.ones((1, 1, 3, 3), dtype=fmap.dtype, device=fmap.device)
    ring[0, 0, 1, 1] = 0
    sums = F.conv2d(F.pad(fmap * keep, (1, 1, 1, 1)), ring.expand(fmap.shape[1], 1, 3, 3), groups=fmap.shape[1])
    count = F.conv2d(F.pad(keep, (1, 1, 1, 1)), ring)
    update = (1 - keep) * (count > 0).to(fmap.dtype)
    out = fmap * (1 - update) + sums / count.clamp(min=1) * update
    return out.reshape(fmap.shape[1], gh * gw).T


def _aggregate(tokens: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
    """rho(S_{>=beta}) · tokens."""
    sim = torch.where(sim < BETA, torch.zeros_like(sim), sim)
    return (sim / (sim.sum(dim=-1, keepdim=True) + 1e-6)) @ tokens


def _cosines(tokens: torch.Tensor) -> torch.Tensor:
    t = tokens / tokens.norm(dim=-1, keepdim=True)
    return t @ t.T


def scclip_attention(block, y: torch.Tensor, s_mid: torch.Tensor) -> torch.Tensor:
    """``out_proj(concat_h 1/2 [softmax(M) + softmax(s k k^T)] v)`` for ``y = LN1(.)`` [B, N, D], M from S_mid."""
    _, k, v = qkv_heads(block, y)
    m = 3.0 * (s_mid - s_mid.mean())
    m = torch.where(m < 0, torch.full_like(m, float("-inf")), m)
    attn = (m.softmax(dim=-1) + ((k @ k.transpose(-1, -2)) * k.shape[-1] ** -0.5).softmax(dim=-1)) / 2
    return block.attn.out_proj(merge_heads(attn @ v))


class SCCLIP(ScaleRulePosEmbed, OpenClipDenseModel):
    """SC-CLIP on an open_clip ViT (QuickGELU OpenAI weights by default); ``window_features`` is L2-normalised."""

    name = "scclip"
    default_backbone = "ViT-B-16-quickgelu"
    default_pretrained = "openai"
    authors_precision = "fp16"

    def __init__(self, backbone: str | None = None, pretrained: str | None = None, *, detector: str = "lof",
                 lof_k: int = 30, contamination: float = 0.05, norm_count: int = 10,
                 blocks: Sequence[int] | None = None, res_cls: float | None = None, device="cpu",
                 precision: str = "fp32", cache_dir: str | None = None, allow_download: bool = False):
        if detector not in DETECTORS:
            raise ValueError(f"detector: expected one of {DETECTORS}, received {detector!r}")
        if isinstance(lof_k, bool) or not isinstance(lof_k, int) or lof_k < 1:
            raise ValueError(f"lof_k: expected a positive int, received {lof_k!r}")
        if not 0 < contamination < 1:
            raise ValueError(f"contamination: expected a number in (0, 1), received {contamination!r}")
        super().__init__(backbone, pretrained, device=device, precision=precision, cache_dir=cache_dir,
                         allow_download=allow_download)
        n_blocks = len(self.visual.transformer.resblocks)
        default = BACKBONE_PARAMS.get(n_blocks)
        if blocks is None and default is None:
            raise ValueError(f"blocks: SC-CLIP gives block indices for 12- and 24-block ViTs; {self.backbone} has "
                             f"{n_blocks}: pass blocks=(pre, post, multi_start, multi_end) (1-based)")
        pre, post, start, end = tuple(int(b) for b in (blocks or default[:4]))
        if not all(1 <= b <= n_blocks - 1 for b in (pre, post, start, end)) or start > end:
            raise ValueError(f"blocks: expected 1-based blocks in 1..{n_blocks - 1} with multi_start <= multi_end, "
                             f"received {(pre, post, start, end)}")
        self.pre, self.post, self.multi = pre, post, (start, end)
        self.res_cls = float(res_cls if res_cls is not None else (default[4] if default else 0.3))
        self.detector, self.lof_k, self.contamination, self.norm_count = detector, lof_k, contamination, norm_count

    def anomalies(self, patches: torch.Tensor) -> torch.Tensor:
        """O for one window's patch tokens of X_{L-1} [N, D]."""
        if self.detector == "norm":
            return norm_anomalies(patches, self.norm_count)
        return lof_anomalies(patches, self.lof_k, self.contamination)

    def intermediates(self, x: torch.Tensor, grid: tuple[int, int]) -> list[torch.Tensor]:
        """[X_1, ..., X_{L-1}], each [B, 1 + N, D] (blocks run unchanged)."""
        tokens = self.embed(x, self.pos_embed_for(grid))
        outs = []
        for blk in self.visual.transformer.resblocks[:-1]:
            tokens = blk(tokens)
            outs.append(tokens)
        return outs

    def window_tokens(self, xs: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        """Z1 + Z2 [B, N, D] from the block outputs ``xs`` (module docstring), one window at a time."""
        blk = self.visual.transformer.resblocks[-1]
        last, gamma = xs[-1], self.res_cls
        multi = xs[self.multi[0] - 1]
        for j in range(self.multi[0], self.multi[1]):
            multi = multi + xs[j]
        out = []
        for b in range(last.shape[0]):
            o = self.anomalies(last[b, 1:])
            p = fill_anomalies(last[b, 1:], o, grid)
            s_mid = _cosines(fill_anomalies(xs[self.pre - 1][b, 1:], o, grid))
            s_post = _cosines(xs[self.post - 1][b, 1:])
            z1 = scclip_attention(blk, blk.ln_1(_aggregate(p, s_mid))[None], s_mid)[0] + gamma * last[b, :1]
            z2 = scclip_attention(blk, blk.ln_1(multi[b, 1:])[None], s_mid)[0] + gamma * multi[b, :1]
            out.append(_aggregate(z1, s_post) + _aggregate(z2, s_post))
        return torch.stack(out)

    def window_features(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.window_grid(x)
        z = self.window_tokens(self.intermediates(x, grid), grid)
        feats = (self.visual.ln_post(z) @ self.visual.proj).float()
        feats = feats / feats.norm(dim=-1, keepdim=True)
        return feats.reshape(x.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2)
