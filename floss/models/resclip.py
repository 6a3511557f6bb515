"""ResCLIP dense features (OVSS-models-2025 §1): RCS + SFR on top of NACLIP's last block, two passes per window.

Yang, Deng, Li, Duan, "ResCLIP: Residual Attention for Training-free Dense Vision-language Inference", CVPR 2025
(github.com/yvhangyang/ResCLIP; an MIT LICENSE "Copyright (c) 2025 yuhangyang" appears in the public index, outside
the pinned code history). Re-implemented from the formulas, not from its code.

Default weights: open_clip ``ViT-B-16-quickgelu`` + ``openai``, fp16 on CUDA (``authors_precision = "fp16"``).
Blocks 1..L-1 run unchanged (X_{L-1} = vanilla open_clip). With ``s = d_h^-1/2`` and q, k, v of a block from its
fused ``in_proj`` on ``LN1(X)``:

* RCS: ``A_rcs^h = mean_{j in 6..9} softmax(s q_j^h k_j^h^T)`` per head over all 1 + N tokens (1-based blocks,
  hard-coded in the original also for ViT-L/14).
* base ``naclip`` (published setting, ``wo_resi``), per head, with NACLIP's Gaussian Omega (sigma 5)::

      A = tau_rcs [(1 - lam_rcs) softmax(tau_sfr ((1 - lam_sfr) s k k^T + lam_sfr Sbar) + Omega) + lam_rcs A_rcs]
      F = LN_post(out_proj(concat_h A^h v^h)) · proj      # no residual, no ln_2, no FFN; CLS dropped afterwards

  ``Sbar = fp16(Shat / max Shat)`` and ``lam_sfr · Sbar`` is rounded to fp16 too (as the original, also in fp32).
  Other bases (§1.4): ``sclip`` (q q^T and k k^T mixed separately, softmaxed and summed, residual + FFN kept),
  ``clearclip`` (q q^T, no Omega, no residual), ``vanilla`` (q k^T, residual + FFN kept); none has Omega but NACLIP.
* Pass 1 = the same block without the SFR term; its patch features are classified with the pass-1 vocabulary
  ``T`` (80-template mean, renormalised, one row per query word) -> cosines, bilinear to the window size,
  PAMR(10 iterations, dilations 8/16) guided by the window, ``softmax(40 ·)`` over the query words, then
  :func:`~floss.models.sfr.patch_labels` (temp_thd) and :func:`~floss.models.sfr.sfr_matrix` give ``Shat`` (pass 2).

The pass-1 logit scale is 40 whatever the evaluation head uses. Per-dataset ``temp_thd``, (tau_rcs, lam_rcs),
(tau_sfr, lam_sfr) are :data:`DATASET_PARAMS` (the driving sets take the Cityscapes row: a choice, the authors
have none). :meth:`ResCLIP.protocol_settings` selects the dataset's row and, unless :meth:`ResCLIP.set_vocabulary`
was called, the dataset's query words (NACLIP's class files) as the pass-1 vocabulary.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F

from floss.core.classes import query_names
from floss.core.templates import IMAGENET_TEMPLATES
from floss.core.text import averaged_classifier, template_embeddings
from floss.models.backbone import OpenClipDenseModel, merge_heads, qkv_heads
from floss.models.base import DRIVING_DATASETS, ProtocolSettings
from floss.models.naclip import gaussian_addition
from floss.models.sclip import ScaleRulePosEmbed
from floss.models.sfr import pamr, patch_labels, sfr_matrix

logger = logging.getLogger(__name__)

__all__ = ["ResCLIP", "DATASET_PARAMS", "AUTHOR_CONFIGS", "BASES", "resclip_attention", "rcs_attention"]

#: the authors' configs (configs/cfg_*.py): temp_thd, (tau_rcs, lam_rcs), (tau_sfr, lam_sfr)
AUTHOR_CONFIGS: dict[str, tuple[float, tuple[float, float], tuple[float, float]]] = {
    "voc20": (0.10, (2.0, 0.6), (2.1, 0.6)), "context59": (0.25, (2.0, 0.4), (1.8, 0.7)),
    "ade20k": (0.25, (2.0, 0.3), (2.1, 0.7)), "coco_stuff164k": (0.11, (2.0, 0.4), (1.8, 0.7)),
    "city_scapes": (0.10, (2.0, 0.2), (2.1, 0.6)), "voc21": (0.50, (2.0, 0.3), (2.2, 0.7)),
    "context60": (0.30, (2.0, 0.3), (1.8, 0.7)), "coco_object": (0.11, (2.0, 0.4), (1.8, 0.7)),
}
#: floss datasets -> their config (driving sets: Cityscapes')
DATASET_PARAMS = {"pascalvoc20": AUTHOR_CONFIGS["voc20"], "pascalco59": AUTHOR_CONFIGS["context59"],
                  "ade20k": AUTHOR_CONFIGS["ade20k"], "cocostuff": AUTHOR_CONFIGS["coco_stuff164k"],
                  **{name: AUTHOR_CONFIGS["city_scapes"] for name in DRIVING_DATASETS}}
#: base -> (keeps the attention residual + FFN, adds Omega)
BASES = {"naclip": (False, True), "sclip": (True, False), "clearclip": (False, False), "vanilla": (True, False)}
PASS1_LOGIT_SCALE = 40.0


def rcs_attention(blocks, x: torch.Tensor, last: int, rcs_idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(X_{last}, A_rcs [B, heads, N, N]): blocks ``[:last]`` run unchanged on ``x``; A_rcs is the mean of the
    vanilla attention maps ``softmax((s q) k^T)`` of the (0-based) blocks ``rcs_idx``."""
    maps = []
    for j, blk in enumerate(blocks[:last]):
        if j in rcs_idx:
            q, k, _ = qkv_heads(blk, blk.ln_1(x))
            maps.append(((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).softmax(dim=-1))
        x = blk(x)
    return x, torch.stack(maps).mean(dim=0)


def resclip_attention(block, x: torch.Tensor, base: str, omega: torch.Tensor | None, a_rcs: torch.Tensor | None,
                      rcs: tuple[float, float], sfr_mat: torch.Tensor | None = None,
                      sfr: tuple[float, float] = (1.0, 0.0)) -> torch.Tensor:
    """ResCLIP's last block on tokens ``x`` [B, 1 + N, D] (module docstring); ``sfr_mat`` None = pass 1,
    ``a_rcs`` None = without RCS (only in this port: the original cannot disable it)."""
    residual, use_omega = BASES[base]
    q, k, v = qkv_heads(block, block.ln_1(x))
    s = q.shape[-1] ** -0.5

    def mixed(logits):
        if sfr_mat is None:
            return logits
        sbar = (sfr_mat / sfr_mat.amax(dim=(-2, -1), keepdim=True)).half()   # per window
        return sfr[0] * ((1 - sfr[1]) * logits + (sfr[1] * sbar).to(logits.dtype))

    if base == "sclip":
        attn = (mixed((q @ q.transpose(-1, -2)) * s).softmax(-1) + mixed((k @ k.transpose(-1, -2)) * s).softmax(-1))
    else:
        a, b = {"naclip": (k, k), "clearclip": (q, q), "vanilla": (q * s, k)}[base]
        logits = mixed(a @ b.transpose(-1, -2) * (1.0 if base == "vanilla" else s))
        if use_omega:
            logits = logits + omega.to(logits.dtype)
        attn = logits.softmax(dim=-1)
    if a_rcs is not None:
        attn = rcs[0] * ((1 - rcs[1]) * attn + rcs[1] * a_rcs)
    out = block.attn.out_proj(merge_heads(attn @ v))
    if residual:
        out = x + block.ls_1(out)
        out = out + block.ls_2(block.mlp(block.ln_2(out)))
    return out


class ResCLIP(ScaleRulePosEmbed, OpenClipDenseModel):
    """ResCLIP on an open_clip ViT (QuickGELU OpenAI weights by default); ``window_features`` is L2-normalised."""

    name = "resclip"
    default_backbone = "ViT-B-16-quickgelu"
    default_pretrained = "openai"
    authors_precision = "fp16"

    def __init__(self, backbone: str | None = None, pretrained: str | None = None, *, base: str = "naclip",
                 dataset: str | None = None, sigma: float = 5.0, rcs_blocks: Sequence[int] = (6, 7, 8, 9),
                 use_rcs: bool = True, use_sfr: bool = True, pamr_steps: int = 10,
                 pamr_dilations: Sequence[int] = (8, 16), device="cpu", precision: str = "fp32",
                 cache_dir: str | None = None, allow_download: bool = False):
        if base not in BASES:
            raise ValueError(f"base: expected one of {sorted(BASES)}, received {base!r}")
        if not sigma > 0:
            raise ValueError(f"sigma: expected a positive Gaussian std, received {sigma!r}")
        if dataset is not None and dataset not in DATASET_PARAMS:
            raise ValueError(f"dataset: expected one of {sorted(DATASET_PARAMS)}, received {dataset!r}")
        if isinstance(pamr_steps, bool) or not isinstance(pamr_steps, int) or pamr_steps < 0:
            raise ValueError(f"pamr_steps: expected an int >= 0, received {pamr_steps!r}")
        super().__init__(backbone, pretrained, device=device, precision=precision, cache_dir=cache_dir,
                         allow_download=allow_download)
        n_blocks = len(self.visual.transformer.resblocks)
        rcs_blocks = tuple(int(j) for j in rcs_blocks)
        if not rcs_blocks or any(j < 1 or j >= n_blocks for j in rcs_blocks):
            raise ValueError(f"rcs_blocks: expected 1-based blocks in 1..{n_blocks - 1} (before the last of "
                             f"{self.backbone}'s {n_blocks}), received {rcs_blocks}")
        self.base, self.sigma, self.rcs_blocks = base, float(sigma), rcs_blocks
        self.use_rcs, self.use_sfr = bool(use_rcs), bool(use_sfr)
        self.pamr_steps, self.pamr_dilations = pamr_steps, tuple(pamr_dilations)
        self.dataset: str | None = None
        self.vocabulary: list[str] | None = None
        self._vocabulary_fixed = False
        self._text: torch.Tensor | None = None
        self._omega_cache: dict[tuple[int, int], torch.Tensor] = {}
        if dataset is not None:
            self.configure(dataset)

    # ------------------------------------------------------------------------------------------- set-up
    def set_vocabulary(self, queries: Sequence[str]) -> None:
        """Pass-1 query words (one label each; synonyms are separate labels): 80-template mean, renormalised."""
        queries = list(queries)
        emb = template_embeddings(self.encode_text, queries, templates=IMAGENET_TEMPLATES)
        self._text = averaged_classifier(emb).to(self.device)
        self.vocabulary, self._vocabulary_fixed = queries, True

    def configure(self, dataset: str, queries: Sequence[str] | None = None) -> None:
        """Select ``dataset``'s temp_thd / tau / lambda row and the pass-1 vocabulary (``queries``, else the one
        set by :meth:`set_vocabulary`, else the dataset's query words of NACLIP's class files)."""
        if dataset not in DATASET_PARAMS:
            raise ValueError(f"dataset: ResCLIP has settings for {sorted(DATASET_PARAMS)}, received {dataset!r}")
        self.temp_thd, self.rcs, self.sfr = DATASET_PARAMS[dataset]
        self.dataset = dataset
        if queries is not None:
            self.set_vocabulary(queries)
        elif not self._vocabulary_fixed:
            emb = template_embeddings(self.encode_text, query_names(dataset, "resclip")[0])
            self._text = averaged_classifier(emb).to(self.device)
            self.vocabulary = query_names(dataset, "resclip")[0]
        logger.info("resclip: %s settings (temp_thd %.2f, rcs %s, sfr %s), %d pass-1 query words", dataset,
                    self.temp_thd, self.rcs, self.sfr, len(self.vocabulary))

    def protocol_settings(self, dataset: str, protocol: str = "authors") -> ProtocolSettings:
        """:func:`~floss.models.base.settings_for` of ``resclip``; also :meth:`configure` s the model for ``dataset``
        (driving sets, e.g. BDD, take the Cityscapes hyper-parameters and their own class list)."""
        settings = super().protocol_settings(dataset, protocol)
        if dataset != self.dataset:
            self.configure(dataset)
        return settings

    def omega(self, grid: tuple[int, int]) -> torch.Tensor:
        if grid not in self._omega_cache:
            self._omega_cache[grid] = gaussian_addition(*grid, self.sigma, device=self.device)
        return self._omega_cache[grid]

    # ------------------------------------------------------------------------------------------ forward
    def trunk(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(X_{L-1} [B, 1 + N, D], A_rcs [B, heads, 1 + N, 1 + N])."""
        tokens = self.embed(x, self.pos_embed_for(grid))
        return rcs_attention(self.visual.transformer.resblocks, tokens, -1, [j - 1 for j in self.rcs_blocks])

    def pass1_probabilities(self, window: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """[K', H, W]: softmax(40 · PAMR(bilinear(cosines))) of one window ``window`` [3, H, W] and its pass-1
        features ``feats`` [E, gh, gw]."""
        logits = torch.einsum("ehw,qe->qhw", feats, self._text.to(feats))[None]
        logits = F.interpolate(logits, size=window.shape[-2:], mode="bilinear", align_corners=False)
        if self.pamr_steps:
            logits = pamr(window[None].to(self.dtype), logits.to(self.dtype), self.pamr_steps,
                          self.pamr_dilations).float()
        return (PASS1_LOGIT_SCALE * logits[0]).softmax(dim=0)

    def sfr_matrices(self, x: torch.Tensor, pass1: torch.Tensor) -> torch.Tensor:
        """[B, 1 + N, 1 + N] Shat of windows ``x`` from their pass-1 features [B, E, gh, gw]."""
        mats = []
        for window, feats in zip(x, pass1):
            labels = patch_labels(self.pass1_probabilities(window, feats), self.patch_size, self.temp_thd)
            mats.append(sfr_matrix(labels, self.sigma))
        return torch.stack(mats)

    def window_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.dataset is None:
            raise RuntimeError("resclip: call model.configure(dataset) (or model.protocol_settings(dataset)) "
                               "first: the SFR hyper-parameters and the pass-1 vocabulary are per dataset")
        grid = self.window_grid(x)
        blk = self.visual.transformer.resblocks[-1]
        X, a_rcs = self.trunk(x, grid)
        a_rcs = a_rcs if self.use_rcs else None
        omega = self.omega(grid)
        if not self.use_sfr:
            return self.patch_features(resclip_attention(blk, X, self.base, omega, a_rcs, self.rcs), grid)
        pass1 = self.patch_features(resclip_attention(blk, X, self.base, omega, a_rcs, self.rcs), grid)
        mats = self.sfr_matrices(x, pass1)[:, None]                    # [B, 1, 1 + N, 1 + N]: shared by heads
        out = resclip_attention(blk, X, self.base, omega, a_rcs, self.rcs, mats, self.sfr)
        return self.patch_features(out, grid)
