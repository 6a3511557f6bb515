"""CLIP-DINOiser (OVSS-models §3): MaskCLIP features pooled by a learned patch-correlation head.

Per window (zero-padded to a multiple of the patch size in [0, 1] space, ``pad_to_patch``):

1. ``F`` = unnormalised MaskCLIP features [E, h, w]; ``G`` = ``ln_2`` output of ``resblocks[-3]`` (patch
   tokens, [width, h, w]).
2. ``e = normalize(obj_proj(G))`` with ``obj_proj = Conv2d(width, 256, 3, padding=1, padding_mode="replicate")``;
   ``C = e^T e`` (hw x hw); entries ``C < gamma`` (0.2) set to 0.
3. ``F_ref[p] = sum_q C[p, q] F[q] / (sum_q C[p, q] + 1e-6)``, then L2-normalised.

``bkg_decoder`` (the FOUND-style head) is loaded for checkpoint fidelity but unused: FLOSS never applies
the background rule (``apply_found=False``).

Checkpoints (strict): the original ``last.pt`` ``{"epoch", "model_state_dict": {obj_proj.*, bkg_decoder.*}}``,
FLOSS's ``model_weights.pth`` (keys prefixed ``model.``, possibly inside ``"state_dict"``), or a plain state
dict; ``module.``/``model.`` prefixes are stripped. A missing or mis-shaped head key is an error. Extra keys
are ignored only when they belong to the frozen CLIP backbone (prefix ``clip_backbone.``); any other extra
key is an error.
"""
from __future__ import annotations

import logging
import os

import torch
from torch import nn

from floss.models.maskclip import MaskCLIP

logger = logging.getLogger(__name__)

__all__ = ["CLIPDINOiser", "CorrelationHead", "load_head_state_dict", "correlation_pool"]

HEAD_KEYS = ("obj_proj.weight", "obj_proj.bias", "bkg_decoder.weight", "bkg_decoder.bias")
_IGNORED_PREFIXES = ("clip_backbone.",)
_STRIPPED_PREFIXES = ("module.", "model.")


class CorrelationHead(nn.Module):
    """``obj_proj`` (3x3, replicate padding) and the unused ``bkg_decoder`` of CLIP-DINOiser."""

    def __init__(self, width: int, proj_dim: int = 256):
        super().__init__()
        self.obj_proj = nn.Conv2d(width, proj_dim, 3, padding=1, padding_mode="replicate")
        self.bkg_decoder = nn.Conv2d(width, 1, 1)


def correlation_pool(feats: torch.Tensor, proj: torch.Tensor, gamma: float = 0.2) -> torch.Tensor:
    """Unnormalised pooled features [B, E, h, w] from ``feats`` [B, E, h, w] and ``proj`` [B, P, h, w]."""
    B, E, h, w = feats.shape
    e = proj.flatten(2)
    e = e / e.norm(dim=1, keepdim=True)
    corr = e.transpose(1, 2) @ e                                     # [B, hw(p), hw(q)]
    corr = torch.where(corr < gamma, torch.zeros_like(corr), corr)
    pooled = feats.flatten(2) @ corr.transpose(1, 2)                 # [B, E, hw(p)] = sum_q C[p,q] F[:, q]
    pooled = pooled / (corr.sum(dim=2)[:, None, :] + 1e-6)
    return pooled.reshape(B, E, h, w)


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def load_head_state_dict(path: str, head: CorrelationHead, *, weights_only: bool = True) -> None:
    """Load the CLIP-DINOiser head weights from ``path`` into ``head`` (strict, see the module docstring)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: CLIP-DINOiser head file {path} does not exist (the original "
                                "checkpoints/last.pt of wysoczanska/clip_dinoiser or FLOSS's model_weights.pth)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        raw = load_file(path, device="cpu")
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=weights_only)
        except Exception as e:  # pickle of non-tensor objects refused by weights_only
            raise ValueError(f"checkpoint: could not read {path} with weights_only={weights_only} ({e}); if you "
                             "trust the file, pass checkpoint_weights_only=False") from e
    state = raw
    for key in ("model_state_dict", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint: {path} holds {type(raw).__name__}, expected a state dict")
    state = {_strip(k): v for k, v in state.items()}
    expected = head.state_dict()
    missing = [k for k in HEAD_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint: {path} lacks the CLIP-DINOiser key(s) {missing} "
                         f"(found {sorted(state)[:8]}{'...' if len(state) > 8 else ''})")
    bad = [f"{k}: expected {list(expected[k].shape)}, received {list(state[k].shape)}"
           for k in HEAD_KEYS if tuple(state[k].shape) != tuple(expected[k].shape)]
    if bad:
        raise ValueError(f"checkpoint: {path} has shape-mismatched key(s): {'; '.join(bad)}")
    extra = [k for k in state if k not in HEAD_KEYS]
    unexpected = [k for k in extra if not k.startswith(_IGNORED_PREFIXES)]
    if unexpected:
        raise ValueError(f"checkpoint: {path} has unexpected key(s) {unexpected[:8]} (only CLIP backbone keys "
                         f"{_IGNORED_PREFIXES} may accompany the head)")
    if extra:
        logger.info("checkpoint %s: ignored %d frozen CLIP backbone keys", path, len(extra))
    head.load_state_dict({k: state[k].to(expected[k].dtype) for k in HEAD_KEYS}, strict=True)


class CLIPDINOiser(MaskCLIP):
    """CLIP-DINOiser features (MaskCLIP + correlation pooling); ``window_features`` is L2-normalised."""

    name = "clipdinoiser"
    pad_to_patch = True
    gamma = 0.2
    inter_block = -3

    def __init__(self, backbone: str | None = None, pretrained: str | None = None, checkpoint: str | None = None,
                 *, device="cpu", precision: str = "fp32", cache_dir: str | None = None,
                 allow_download: bool = False, checkpoint_weights_only: bool = True):
        # check the head file before the (slow) backbone load so that a missing file fails fast
        if checkpoint is None and (pretrained or self.default_pretrained) != "none":
            raise ValueError("checkpoint: CLIP-DINOiser needs its head weights; pass checkpoint=<path> to the "
                             "original checkpoints/last.pt (git clone wysoczanska/clip_dinoiser) or FLOSS's "
                             "checkpoints/clip_dinoiser/model_weights.pth")
        if checkpoint is not None and not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"checkpoint: CLIP-DINOiser head file {checkpoint} does not exist")
        super().__init__(backbone, pretrained, device=device, precision=precision, cache_dir=cache_dir,
                         allow_download=allow_download)
        blocks = len(self.visual.transformer.resblocks)
        if blocks < -self.inter_block:
            raise ValueError(f"backbone: CLIP-DINOiser reads the output of block {blocks + self.inter_block} "
                             f"({self.inter_block}), so it needs a ViT with at least {-self.inter_block} blocks; "
                             f"{self.backbone!r} has {blocks}")
        self.head = CorrelationHead(int(self.visual.transformer.width)).to(self.device)
        if checkpoint is not None:
            load_head_state_dict(str(checkpoint), self.head, weights_only=checkpoint_weights_only)
        else:
            logger.warning("clipdinoiser: no checkpoint and pretrained='none': the correlation head is RANDOM")
        self.checkpoint = checkpoint
        self.head.eval().requires_grad_(False)

    def refined_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised pooled features [B, E, gh, gw] of CLIP-normalised windows ``x``."""
        feats, inter = self.dense_features(x, inter_block=self.inter_block)
        proj = self.head.obj_proj(inter.to(self.head.obj_proj.weight.dtype))
        return correlation_pool(feats.float(), proj.float(), self.gamma)

    def window_features(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.refined_features(x)
        return feats / feats.norm(dim=1, keepdim=True)
