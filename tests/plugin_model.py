"""A user's own dense model, registered through ``python -m floss --plugin tests.plugin_model ...``.

It stands for any OVSS model that maps an image to a dense feature map: here a fixed random 1x1 projection of
8x8 pixel patches and a hashing text encoder, so it needs no weights. Its protocol settings are its own.
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from floss.models import DenseModel, ProtocolSettings, register_model


class PatchMeanModel(DenseModel):
    name = "patchmean"
    feature_dim = 16
    patch_size = 8

    def __init__(self, **_):
        g = torch.Generator().manual_seed(0)
        self.proj = torch.randn(self.feature_dim, 3, generator=g)

    def encode_text(self, texts):
        rows = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
            rows.append(torch.randn(self.feature_dim, generator=torch.Generator().manual_seed(seed)))
        return F.normalize(torch.stack(rows), dim=-1)

    def window_features(self, x):
        pooled = F.avg_pool2d(x, self.patch_size)                     # [B, 3, h/p, w/p]
        return F.normalize(torch.einsum("dc,bchw->bdhw", self.proj, pooled), dim=1)

    def protocol_settings(self, dataset, protocol="authors"):
        return ProtocolSettings(scale=(64, 32), crop=32, stride=16, softmax_stage="window", logit_scale=100.0,
                                renormalize_experts=True, renormalize_fallback=True, window_fp16=False,
                                protocol=protocol)


register_model("patchmean", PatchMeanModel, overwrite=True)
