"""open_clip backbones for the dense models: offline weight resolution, text encoding, ViT token steps.

Weights are never downloaded implicitly: a pretrained *tag* is resolved to a file already in the local
Hugging Face cache (or open_clip's URL cache) before open_clip is called, so a missing file fails in well
under a second with a message naming the weights and how to provide them. ``allow_download=True`` hands the
tag to open_clip unchanged (network access). ``pretrained="none"`` builds random weights (tests, smoke runs)
and is logged as a warning.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

from floss.models.base import DenseModel

logger = logging.getLogger(__name__)

__all__ = ["resolve_backbone", "resolve_weights", "load_open_clip", "OpenClipDenseModel", "PRECISIONS", "qkv_heads",
           "merge_heads"]

PRECISIONS = ("fp32", "fp16")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def resolve_backbone(backbone: str) -> str:
    """open_clip model name for ``backbone``: a built-in name, or a model-config JSON file (registered)."""
    if not isinstance(backbone, str) or not backbone:
        raise ValueError(f"backbone: expected an open_clip model name or a config .json path, received {backbone!r}")
    if backbone.endswith(".json"):
        path = Path(backbone)
        if not path.is_file():
            raise FileNotFoundError(f"backbone: model-config file {backbone} does not exist")
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
        if missing:
            raise ValueError(f"backbone: {backbone} is not an open_clip model config (missing keys {missing})")
        open_clip.add_model_config(path)
        return path.stem
    if open_clip.get_model_config(backbone) is None:
        raise ValueError(f"backbone: unknown open_clip model {backbone!r}; use a name of "
                         "open_clip.list_models() or a model-config .json path")
    return backbone


def _hf_cache_candidates(hf_hub: str) -> tuple[str, list[str]]:
    repo_id, filename = os.path.split(hf_hub)
    filename = filename or HF_WEIGHTS_NAME
    names = [HF_SAFE_WEIGHTS_NAME] if filename == HF_WEIGHTS_NAME else []
    if filename != HF_WEIGHTS_NAME and filename.endswith((".bin", ".pth")):
        names.append(filename[:-4] + ".safetensors")
    return repo_id, names + [filename]


def resolve_weights(model_name: str, pretrained: str, *, cache_dir: str | None = None,
                    allow_download: bool = False) -> str | None:
    """Local weight file for ``pretrained`` (a file path or an open_clip tag); ``None`` for ``"none"``.

    Raises FileNotFoundError (naming the tag, the Hugging Face repo/files, the cache folder and the ways to
    provide them) when a tag's weights are not cached, unless ``allow_download`` (then the tag is returned
    and open_clip downloads it).
    """
    if not isinstance(pretrained, str) or not pretrained:
        raise ValueError(f"pretrained: expected 'none', an open_clip tag or a weight-file path, received {pretrained!r}")
    if pretrained == "none":
        logger.warning("pretrained='none': %s gets RANDOM weights (only for tests and smoke runs)", model_name)
        return None
    if os.path.isfile(pretrained):
        return pretrained
    if os.sep in pretrained or pretrained.endswith(_WEIGHT_SUFFIXES):
        raise FileNotFoundError(f"pretrained: weight file {pretrained} does not exist")
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        raise ValueError(f"pretrained: {pretrained!r} is not an open_clip tag of {model_name!r} (known tags: "
                         f"{open_clip.list_pretrained_tags_by_model(model_name)}) nor an existing file")
    model_gelu = bool(open_clip.get_model_config(model_name).get("quick_gelu", False))
    if bool(cfg.get("quick_gelu", False)) != model_gelu:
        want = "with QuickGELU (a '-quickgelu' model name)" if cfg.get("quick_gelu") else "without QuickGELU"
        raise ValueError(f"backbone/pretrained: the {pretrained!r} weights were trained {want}, but "
                         f"{model_name!r} has quick_gelu={model_gelu}; e.g. use 'ViT-B-16-quickgelu' with 'openai'")
    if allow_download:
        return pretrained
    looked = []
    if cfg.get("hf_hub"):
        from huggingface_hub import constants as hf_constants, try_to_load_from_cache
        repo_id, names = _hf_cache_candidates(cfg["hf_hub"])
        for name in names:
            hit = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
        looked.append(f"Hugging Face repo {repo_id} (files {names}) in the cache {cache_dir or hf_constants.HF_HUB_CACHE}")
    if cfg.get("url"):
        target = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))
        if os.path.isfile(target):
            return target
        looked.append(f"{target} (from {cfg['url']})")
    raise FileNotFoundError(
        f"weights of open_clip {model_name!r} pretrained={pretrained!r} are not available locally; looked for "
        f"{'; '.join(looked) or 'nothing (the tag has no download source)'}. Provide them by (a) downloading once "
        f"where there is internet, e.g. `huggingface-cli download {cfg.get('hf_hub', '').rstrip('/')}` or "
        f"`python -c \"import open_clip; open_clip.create_model('{model_name}', pretrained='{pretrained}')\"`, and "
        f"pointing HF_HOME / cache_dir at that cache, (b) passing pretrained=<path to the .safetensors/.bin file>, "
        f"or (c) passing allow_download=True to let open_clip download it now.")


def load_open_clip(backbone: str, pretrained: str, *, device="cpu", precision: str = "fp32",
                   cache_dir: str | None = None, allow_download: bool = False):
    """(open_clip CLIP model in eval mode without gradients, its tokenizer, the model name)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, received {precision!r}")
    device = torch.device(device)
    if precision == "fp16" and device.type != "cuda":
        # CPU half-precision matmuls are slow and not what any author ran: refuse instead of guessing
        raise ValueError(f"precision='fp16' needs a CUDA device, received device={str(device)!r}; use fp32 on CPU")
    name = resolve_backbone(backbone)
    weights = resolve_weights(name, pretrained, cache_dir=cache_dir, allow_download=allow_download)
    model = open_clip.create_model(name, pretrained=weights, device=device, precision=precision,
                                   cache_dir=cache_dir, require_pretrained=weights is not None)
    model.eval().requires_grad_(False)
    if not getattr(model.visual.transformer, "batch_first", True):
        raise RuntimeError("open_clip vision transformer is not batch_first; floss needs open_clip >= 2.26")
    return model, open_clip.get_tokenizer(name), name


def qkv_heads(block, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, heads, N, d_h] of ``block.attn`` for ``ln_1``-ed batch-first tokens ``y`` [B, N, D].

    The fused ``in_proj`` (weights and bias, rows in q|k|v order) is applied once; open_clip 3.x is NLD, so the
    heads are split from the D axis (the authors' LND code splits the same axis)."""
    B, N, D = y.shape
    heads = block.attn.num_heads
    qkv = F.linear(y, block.attn.in_proj_weight, block.attn.in_proj_bias)
    q, k, v = qkv.reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, d_h] -> [B, N, heads * d_h] (the input of ``attn.out_proj``)."""
    B, heads, N, d_h = x.shape
    return x.transpose(1, 2).reshape(B, N, heads * d_h)


class OpenClipDenseModel(DenseModel):
    """Shared open_clip plumbing: loading, text encoding, and the ViT embedding step with a given pos-embed."""

    default_backbone = "ViT-B-16"
    default_pretrained = "laion2b_s34b_b88k"
    text_batch_size = 256

    def __init__(self, backbone: str | None = None, pretrained: str | None = None, *, device="cpu",
                 precision: str = "fp32", cache_dir: str | None = None, allow_download: bool = False):
        self.clip, self.tokenizer, self.backbone = load_open_clip(
            backbone or self.default_backbone, pretrained or self.default_pretrained, device=device,
            precision=precision, cache_dir=cache_dir, allow_download=allow_download)
        self.pretrained = pretrained or self.default_pretrained
        self.precision = precision
        self.device = torch.device(device)
        self.visual = self.clip.visual
        self.feature_dim = int(self.visual.output_dim)
        self.patch_size = int(self.visual.patch_size[0])
        self.native_grid = tuple(int(g) for g in self.visual.grid_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """open_clip tokenizer + ``encode_text``, L2-normalised, float32 [n, D] (batched)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts: expected a sequence of strings")
        out = []
        for i in range(0, len(texts), self.text_batch_size):
            tokens = self.tokenizer(list(texts[i:i + self.text_batch_size])).to(self.device)
            out.append(self.clip.encode_text(tokens).float())
        if not out:
            return torch.zeros((0, self.feature_dim), device=self.device)
        emb = torch.cat(out)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        # an fp16 model's text features are fp16 values (the authors' NACLIP normalises them in fp16)
        return emb.half().float() if self.precision == "fp16" else emb

    def patch_pos_embed(self) -> torch.Tensor:
        """Native patch positional embeddings as [1, D, gh, gw] (float32, for interpolation)."""
        pos = self.visual.positional_embedding[1:].float()
        gh, gw = self.native_grid
        return pos.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)

    def embed(self, x: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        """open_clip ``VisionTransformer._embeds`` with ``pos_embed`` [1 + gh*gw, D] instead of the native one."""
        v = self.visual
        x = v.conv1(x.to(self.dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + pos_embed.to(x.dtype)
        return v.ln_pre(v.patch_dropout(x))

    def window_grid(self, x: torch.Tensor) -> tuple[int, int]:
        """Patch grid (gh, gw) of CLIP-normalised windows ``x`` [B, 3, h, w] (partial patches are dropped)."""
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        if min(grid) < 1:
            raise ValueError(f"x: windows of {tuple(x.shape[-2:])} pixels are smaller than one "
                             f"{self.patch_size}-pixel patch")
        return grid

    def patch_features(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``ln_post`` on all tokens, ``@ proj``, CLS dropped, L2-normalised: [B, E, gh, gw] float32."""
        feats = (self.visual.ln_post(tokens) @ self.visual.proj)[:, 1:].float()
        feats = feats / feats.norm(dim=-1, keepdim=True)
        return feats.reshape(tokens.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2)

    def run_blocks(self, x: torch.Tensor, stop: int) -> torch.Tensor:
        """Run ``resblocks[:stop]`` (batch-first tokens)."""
        for blk in self.visual.transformer.resblocks[:stop]:
            x = blk(x)
        return x
