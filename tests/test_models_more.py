"""SCLIP, ClearCLIP and GEM on tiny random open_clip ViTs: block formulas written out per head, the three
positional-embedding rules, protocol settings, class names, and cache == end-to-end.

Every formula test also checks that a deliberately wrong variant (residual dropped or kept, another
attention, another pos-embed rule, GEM without accumulation ...) is far from the model's output, so the
comparisons would catch a swapped formula.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ASSETS, TINY_QUICKGELU, _tiny_model
from floss import protocol
from floss.data.cache import CacheWriter, FeatureCache, ImageRecord
from floss.core.classes import CLASS_NAMES, query_groups, query_names, ranking_keys, rankings_dataset
from floss.models import (GEM, SCLIP, ClearCLIP, ProtocolSettings, available_models, create_model,
                          settings_for)
from floss.models import preprocess as pp
from floss.models.base import DRIVING_DATASETS
from floss.core.text import averaged_classifier, template_embeddings

TINY_DEEP = str(ASSETS / "tiny-vit-quickgelu-deep.json")     # 8 blocks: GEM's default depth 7 fits
NATIVE = (4, 4)


@pytest.fixture(scope="module")
def tiny_sclip():
    return _tiny_model("sclip", TINY_QUICKGELU)


@pytest.fixture(scope="module")
def tiny_clearclip():
    return _tiny_model("clearclip", TINY_QUICKGELU)


@pytest.fixture(scope="module")
def tiny_gem():
    return _tiny_model("gem", TINY_DEEP)


# ------------------------------------------------------------------------------------------ written out
def _ln(x, sd, prefix):
    return F.layer_norm(x, (x.shape[-1],), sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps=1e-5)


def _windows(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _patch_pos(sd):
    return sd["positional_embedding"][1:].reshape(1, *NATIVE, -1).permute(0, 3, 1, 2)


def _with_cls(sd, patch):
    return torch.cat([sd["positional_embedding"][:1], patch.flatten(2)[0].T])


def scale_rule(sd, grid):       # SCLIP / ClearCLIP (DINO): scale_factor (g + 0.1) / g0
    return _with_cls(sd, F.interpolate(_patch_pos(sd), scale_factor=((grid[0] + 0.1) / 4, (grid[1] + 0.1) / 4),
                                       mode="bicubic", align_corners=False, recompute_scale_factor=False))


def size_rule(sd, grid, antialias=False):      # MaskCLIP (antialias=False) / GEM (antialias=True)
    return _with_cls(sd, F.interpolate(_patch_pos(sd), size=grid, mode="bicubic", align_corners=False,
                                       antialias=antialias))


def embedded(sd, x, pos):
    """Patch embedding, CLS, ``pos`` and ln_pre, from the state dict (the input of block 1)."""
    t = F.conv2d(x, sd["conv1.weight"], stride=16).flatten(2).transpose(1, 2)
    return _ln(torch.cat([sd["class_embedding"].expand(x.shape[0], 1, -1), t], dim=1) + pos, sd, "ln_pre")


def trunk(m, x, pos):
    """Embedding, then the standard open_clip blocks 1..L-1: X = output of block L-1."""
    sd = m.visual.state_dict()
    t = embedded(sd, x, pos)
    for blk in m.visual.transformer.resblocks[:-1]:
        t = blk(t)
    return t, sd


def qkv(sd, b, Y):
    D = Y.shape[-1]
    QKV = Y @ sd[f"{b}.attn.in_proj_weight"].T + sd[f"{b}.attn.in_proj_bias"]
    return QKV[..., :D], QKV[..., D:2 * D], QKV[..., 2 * D:]


def out_proj(sd, b, O):
    return O @ sd[f"{b}.attn.out_proj.weight"].T + sd[f"{b}.attn.out_proj.bias"]


def ffn(sd, b, Z):               # QuickGELU MLP
    H = _ln(Z, sd, f"{b}.ln_2") @ sd[f"{b}.mlp.c_fc.weight"].T + sd[f"{b}.mlp.c_fc.bias"]
    return (H * torch.sigmoid(1.702 * H)) @ sd[f"{b}.mlp.c_proj.weight"].T + sd[f"{b}.mlp.c_proj.bias"]


def features(sd, Z, grid):
    Fz = _ln(Z, sd, "ln_post")[:, 1:] @ sd["proj"]
    Fz = Fz / Fz.norm(dim=-1, keepdim=True)
    return Fz.reshape(Z.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2)


def per_head(heads, dh, fn, *mats):
    """concat_h fn(M1_h, M2_h, ...) over the D axis split into ``heads`` slices of ``dh``."""
    return torch.cat([fn(*(M[..., h * dh:(h + 1) * dh] for M in mats)) for h in range(heads)], dim=-1)


def last_block_reference(m, x, pos, attention, residual_ffn):
    """ln_post(proj) features of a last block ``attention(Q_h, K_h, V_h) -> [B, N, dh]``, with or without
    the attention residual + ln_2/FFN residual."""
    X, sd = trunk(m, x, pos)
    L, D = len(m.visual.transformer.resblocks) - 1, X.shape[-1]
    heads = m.visual.transformer.resblocks[-1].attn.num_heads
    b = f"transformer.resblocks.{L}"
    Q, K, V = qkv(sd, b, _ln(X, sd, f"{b}.ln_1"))
    O = out_proj(sd, b, per_head(heads, D // heads, attention, Q, K, V))
    if residual_ffn:
        O = X + O
        O = O + ffn(sd, b, O)
    grid = (x.shape[-2] // 16, x.shape[-1] // 16)
    return features(sd, O, grid)


def sm(a):
    return torch.softmax(a, dim=-1)


def sclip_attn(Q, K, V):
    s = 1 / math.sqrt(Q.shape[-1])
    return (sm(s * Q @ Q.transpose(1, 2)) + sm(s * K @ K.transpose(1, 2))) @ V


def clearclip_attn(Q, K, V):
    return sm(Q @ Q.transpose(1, 2) / math.sqrt(Q.shape[-1])) @ V


def _far(a, b):
    return float((a - b).abs().max()) > 1e-3


# --------------------------------------------------------------------------------------- pos-embed rules
@pytest.mark.parametrize("grid", [(3, 5), (6, 6), (2, 7)])
def test_pos_embed_rules_differ_and_each_model_uses_its_own(tiny_sclip, tiny_clearclip, tiny_gem, grid):
    for model in (tiny_sclip, tiny_clearclip, tiny_gem):
        sd = model.visual.state_dict()
        rules = {"scale": scale_rule(sd, grid), "size": size_rule(sd, grid),
                 "size_antialias": size_rule(sd, grid, antialias=True)}
        names = list(rules)
        for i, a in enumerate(names):               # all three rules really differ on a non-native grid
            for b in names[i + 1:]:
                assert _far(rules[a], rules[b]), (a, b)
        own = "size_antialias" if isinstance(model, GEM) else "scale"
        got = model.pos_embed_for(grid)
        assert got.shape == (1 + grid[0] * grid[1], 64)
        for name, ref in rules.items():
            assert torch.allclose(got, ref, atol=1e-6) == (name == own), (type(model).__name__, name)
        # native grid: the pretrained embeddings, untouched
        assert model.pos_embed_for(NATIVE) is model.visual.positional_embedding


# ------------------------------------------------------------------------------------------------ SCLIP
@pytest.mark.parametrize("size", [(64, 64), (48, 80), (96, 96)])
def test_sclip_block_formula(tiny_sclip, size):
    m = tiny_sclip
    x = _windows((2, 3) + size, seed=3)
    grid = (size[0] // 16, size[1] // 16)
    sd = m.visual.state_dict()
    pos = sd["positional_embedding"] if grid == NATIVE else scale_rule(sd, grid)
    ref = last_block_reference(m, x, pos, sclip_attn, residual_ffn=True)
    out = m.window_features(x)
    assert out.shape == (2, 32) + grid and out.dtype == torch.float32
    assert float((out - ref).abs().max()) <= 1e-5
    # deliberately wrong formulas are far from it
    assert _far(out, last_block_reference(m, x, pos, sclip_attn, residual_ffn=False))       # no residual/FFN
    assert _far(out, last_block_reference(m, x, pos, lambda q, k, v: sclip_attn(q, k, v) / 2, True))  # averaged
    assert _far(out, last_block_reference(m, x, pos, clearclip_attn, residual_ffn=True))    # q-q only
    if grid != NATIVE:
        assert _far(out, last_block_reference(m, x, size_rule(sd, grid), sclip_attn, True))  # other pos rule


# -------------------------------------------------------------------------------------------- ClearCLIP
@pytest.mark.parametrize("size", [(64, 64), (48, 80), (96, 96)])
def test_clearclip_block_formula(tiny_clearclip, size):
    m = tiny_clearclip
    x = _windows((2, 3) + size, seed=4)
    grid = (size[0] // 16, size[1] // 16)
    sd = m.visual.state_dict()
    pos = sd["positional_embedding"] if grid == NATIVE else scale_rule(sd, grid)
    ref = last_block_reference(m, x, pos, clearclip_attn, residual_ffn=False)
    out = m.window_features(x)
    assert out.shape == (2, 32) + grid
    assert float((out - ref).abs().max()) <= 1e-5
    assert _far(out, last_block_reference(m, x, pos, clearclip_attn, residual_ffn=True))    # residual kept
    kk = lambda q, k, v: clearclip_attn(k, q, v)                                           # noqa: E731
    assert _far(out, last_block_reference(m, x, pos, kk, residual_ffn=False))              # k-k attention
    if grid != NATIVE:
        assert _far(out, last_block_reference(m, x, size_rule(sd, grid, True), clearclip_attn, False))


def test_clearclip_warns_once_about_partial_patches(tiny_clearclip, caplog):
    tiny_clearclip._warned_padding = False
    with caplog.at_level("WARNING", logger="floss.models.clearclip"):
        out = tiny_clearclip.window_features(_windows((1, 3, 50, 70)))
        tiny_clearclip.window_features(_windows((1, 3, 50, 70)))
    assert out.shape == (1, 32, 3, 4)
    assert sum("pad" in r.message for r in caplog.records) == 1


# -------------------------------------------------------------------------------------------------- GEM
def intermediates(m, x, pos, indices):
    """Block outputs x_j (CLS first) of the UNMODIFIED open_clip model, with ``pos`` swapped in."""
    v = m.visual
    saved = v.positional_embedding.data
    v.positional_embedding.data = pos
    try:
        out = v.forward_intermediates(x, indices=indices, intermediates_only=True, output_fmt="NLC",
                                      output_extra_tokens=True)
    finally:
        v.positional_embedding.data = saved
    return [torch.cat([c, p], dim=1) for c, p in zip(out["image_intermediates_prefix"], out["image_intermediates"])]


def gem_reference(m, x, pos, depth=7, iters=1, temp=None, accumulate=True, normalise_v=False):
    """g = x_{L-depth} + sum_j out_proj_j(SS_j(LN1_j(x_{j-1}))) over the last depth-1 blocks; F = ln_post(g) proj."""
    sd = m.visual.state_dict()
    L = len(m.visual.transformer.resblocks)
    heads = m.visual.transformer.resblocks[0].attn.num_heads
    xs = intermediates(m, x, pos, list(range(max(L - depth, 0), L - 1)))     # x_{L-depth} .. x_{L-2}
    if depth == L + 1:                  # every block wrapped: g starts from the input of block 1
        xs = [embedded(sd, x, pos)] + xs
    g = xs[0]
    for n, j in enumerate(range(L - depth + 1, L)):
        b = f"transformer.resblocks.{j}"
        Y = _ln(xs[n], sd, f"{b}.ln_1")
        Q, K, V = qkv(sd, b, Y)
        dh = Q.shape[-1] // heads
        tau = Y.norm(dim=-1).mean(dim=-1)[:, None, None] / math.sqrt(dh) if temp is None else temp

        def ss(q, k, v):
            outs = []
            vv = v / v.norm(dim=-1, keepdim=True) if normalise_v else v
            for P in (q, k, v):
                for _ in range(iters):
                    P = P / P.norm(dim=-1, keepdim=True)
                    P = sm(tau * P @ P.transpose(1, 2)) @ P
                P = P / P.norm(dim=-1, keepdim=True)
                outs.append(sm(tau * P @ P.transpose(1, 2)) @ vv)
            return (outs[0] + outs[1] + outs[2]) / 3

        O = out_proj(sd, b, per_head(heads, dh, ss, Q, K, V))
        g = g + O if accumulate else O          # accumulate=False: ClearCLIP's "ignore_residual" GEM variant
    grid = (x.shape[-2] // 16, x.shape[-1] // 16)
    return features(sd, g, grid)


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (96, 96)])
def test_gem_closed_form_over_the_unmodified_model(tiny_gem, size):
    m = tiny_gem
    assert len(m.visual.transformer.resblocks) == 8 and m.depth == 7
    x = _windows((2, 3) + size, seed=5)
    grid = (size[0] // 16, size[1] // 16)
    sd = m.visual.state_dict()
    pos = sd["positional_embedding"] if grid == NATIVE else size_rule(sd, grid, antialias=True)
    out = m.window_features(x)
    assert out.shape == (2, 32) + grid
    assert float((out - gem_reference(m, x, pos)).abs().max()) <= 1e-5
    assert _far(out, gem_reference(m, x, pos, accumulate=False))      # last block's SS output only
    assert _far(out, gem_reference(m, x, pos, normalise_v=True))      # normalised v in the assignment
    assert _far(out, gem_reference(m, x, pos, iters=0))               # no clustering step
    assert _far(out, gem_reference(m, x, pos, temp=1.0))              # fixed instead of adaptive temperature
    assert _far(out, gem_reference(m, x, pos, depth=6))               # one wrapped block fewer
    if grid != NATIVE:
        assert _far(out, gem_reference(m, x, size_rule(sd, grid)))    # MaskCLIP's rule (no antialias)
        assert _far(out, gem_reference(m, x, scale_rule(sd, grid)))   # SCLIP's rule


def test_gem_options_depth_iterations_temperature(tiny_gem):
    x = _windows((2, 3, 48, 64), seed=6)
    grid = (3, 4)
    sd = tiny_gem.visual.state_dict()
    pos = size_rule(sd, grid, antialias=True)
    for depth, iters, temp in [(4, 2, None), (3, 1, 0.7), (9, 1, None)]:    # 9: all 8 blocks wrapped
        m = create_model("gem", backbone=TINY_DEEP, pretrained="none", depth=depth, ss_attn_iter=iters,
                         ss_attn_temp=temp)
        m.clip.load_state_dict(tiny_gem.clip.state_dict())
        out = m.window_features(x)
        assert float((out - gem_reference(tiny_gem, x, pos, depth, iters, temp)).abs().max()) <= 1e-5
        assert _far(out, gem_reference(tiny_gem, x, pos))
    # the adaptive temperature is per image: a batch equals its images run alone
    full = tiny_gem.window_features(x)
    assert torch.allclose(full[1:], tiny_gem.window_features(x[1:]), atol=1e-5)


def test_gem_argument_errors(tiny_quickgelu_config):
    cases = [({"depth": 1}, "depth"), ({"depth": 5}, "at most 4"), ({"depth": 7.0}, "depth"),
             ({"ss_attn_iter": -1}, "ss_attn_iter"), ({"ss_attn_temp": 0}, "ss_attn_temp"),
             ({"transform": "squash"}, "transform")]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            create_model("gem", backbone=tiny_quickgelu_config, pretrained="none", **kwargs)


# ------------------------------------------------------------------------------------ protocol settings
def test_settings_sclip():
    for ds in ("pascalvoc20", "pascalco59", "ade20k"):
        s = settings_for("sclip", ds)
        assert (s.scale, s.crop, s.stride, s.softmax_stage, s.logit_scale) == ((2048, 336), 224, 112, "final", 40.0)
        assert s.renormalize_experts and s.renormalize_fallback and s.resize == "keep_ratio"
    assert settings_for("sclip", "cocostuff").scale == (2048, 448)
    for ds in DRIVING_DATASETS:
        assert (settings_for("sclip", ds).scale, settings_for("sclip", ds).crop) == ((2048, 560), 224)


@pytest.mark.parametrize("model", ["clearclip", "gem"])
def test_settings_clearclip_and_gem_rerun(model):
    for ds in ("pascalvoc20", "pascalco59", "ade20k", "cocostuff"):
        s = settings_for(model, ds)
        assert (s.scale, s.crop, s.stride, s.softmax_stage, s.logit_scale) == ((2048, 448), 448, 224, "final", 50.0)
        assert s.renormalize_experts and s.renormalize_fallback
    for ds in DRIVING_DATASETS:
        s = settings_for(model, ds)
        assert (s.scale, s.crop, s.stride) == ((2048, 448), 224, 224)
    assert settings_for("gem", "ade20k") == settings_for("clearclip", "ade20k")


def test_settings_gem_own_transform_and_protocols():
    s = settings_for("gem_448", "cityscapes")
    assert (s.scale, s.crop, s.stride, s.resize, s.logit_scale, s.softmax_stage) == \
        ((448, 448), None, None, "stretch_bicubic", 50.0, "final")
    for model in ("sclip", "clearclip", "gem", "gem_448"):
        assert settings_for(model, "ade20k").window_fp16 and settings_for(model, "cocostuff").window_fp16
        assert not settings_for(model, "pascalco59").window_fp16
        for ds in ("ade20k", "cityscapes"):      # "paper" = "authors" without the fp16 cast
            a, p = settings_for(model, ds), settings_for(model, ds, "paper")
            assert p.protocol == "paper" and not p.window_fp16
            assert (a.scale, a.crop, a.stride, a.logit_scale, a.resize) == (p.scale, p.crop, p.stride,
                                                                            p.logit_scale, p.resize)


def test_settings_resize_field_is_optional_and_checked():
    old = settings_for("naclip", "pascalco59").to_dict()   # (on ADE20K/COCO-Stuff NACLIP's dict adds canvas_fp16)
    assert "resize" not in old and set(old) == {"scale", "crop", "stride", "softmax_stage", "logit_scale",
                                               "renormalize_experts", "renormalize_fallback", "window_fp16",
                                               "protocol"}
    assert ProtocolSettings.from_dict(old) == settings_for("naclip", "pascalco59")  # dicts stored before the field
    gem = settings_for("gem_448", "ade20k")
    assert gem.to_dict()["resize"] == "stretch_bicubic" and ProtocolSettings.from_dict(gem.to_dict()) == gem
    with pytest.raises(ValueError, match="resize"):
        ProtocolSettings.from_dict({**old, "resize": "squash"})


def test_models_use_their_settings(tiny_sclip, tiny_clearclip, tiny_gem):
    assert tiny_sclip.protocol_settings("cocostuff") == settings_for("sclip", "cocostuff")
    assert tiny_clearclip.protocol_settings("bdd", "paper") == settings_for("clearclip", "bdd", "paper")
    assert tiny_gem.protocol_settings("ade20k") == settings_for("gem", "ade20k")
    own = create_model("gem", backbone=TINY_DEEP, pretrained="none", transform="gem")
    assert own.protocol_settings("ade20k") == settings_for("gem_448", "ade20k")


# ------------------------------------------------------------------------------------------ class names
def test_sclip_queries_are_naclips():
    for ds in CLASS_NAMES:
        assert query_names(ds, "sclip") == query_names(ds, "naclip")
        assert ranking_keys(ds, "sclip") == ranking_keys(ds, "naclip")
    assert len(query_names("pascalvoc20", "sclip")[0]) == 30


@pytest.mark.parametrize("model", ["clearclip", "gem"])
def test_clearclip_and_gem_queries(model):
    queries, q2c = query_names("pascalvoc20", model)
    assert q2c == list(range(20)) and len(queries) == 20
    by_class = dict(zip(CLASS_NAMES["pascalvoc20"], queries))
    assert (by_class["boat"], by_class["dining table"], by_class["person"], by_class["tvmonitor"],
            by_class["potted plant"]) == ("ship", "table", "person", "tvmonitor", "pottedplant")
    for ds in ("cityscapes", "ade20k", "cocostuff", "pascalco59", "mapillary"):
        assert query_groups(ds, model) == query_groups(ds, "naclip")
    for ds in CLASS_NAMES:              # rankings keyed by the unspaced dataset names (boat, diningtable)
        assert ranking_keys(ds, model) == [n.replace(" ", "") for n in CLASS_NAMES[rankings_dataset(ds)]]


def test_cli_rankings_keys_of_new_models():
    from floss.cli import rankings_keys

    class Cache:
        class_names = ["traffic light", "dining table"]
        manifest = {"model": ""}

    for model, want in [("sclip", ["trafficlight", "diningtable"]), ("gem", ["trafficlight", "diningtable"]),
                        ("clearclip", ["trafficlight", "diningtable"]), ("maskclip", Cache.class_names),
                        ("naclip_vitl14", ["trafficlight", "diningtable"]), ("my-model", Cache.class_names)]:
        Cache.manifest = {"model": model}
        assert rankings_keys(Cache) == want


# ----------------------------------------------------------------------------------------------- registry
def test_registry_defaults_and_errors(tmp_path, tiny_quickgelu_config):
    assert {"sclip", "clearclip", "gem"} <= set(available_models())
    expect = {"sclip": (SCLIP, "fp16"), "clearclip": (ClearCLIP, "fp16"), "gem": (GEM, "fp32")}
    for name, (cls, precision) in expect.items():
        assert cls.name == name and cls.authors_precision == precision
        assert (cls.default_backbone, cls.default_pretrained) == ("ViT-B-16-quickgelu", "openai")
        with pytest.raises(ValueError, match="checkpoint"):
            create_model(name, backbone=tiny_quickgelu_config, pretrained="none", checkpoint="x.pt")
        with pytest.raises(ValueError, match="CUDA"):
            create_model(name, backbone=tiny_quickgelu_config, pretrained="none", precision="fp16")
        with pytest.raises(FileNotFoundError, match="openai"):
            create_model(name, cache_dir=str(tmp_path))
        with pytest.raises(ValueError, match="quickgelu"):
            create_model(name, backbone="ViT-B-16", pretrained="openai", cache_dir=str(tmp_path))


# ------------------------------------------------------------------------------ cache == end to end
@pytest.mark.parametrize("model,dataset", [("sclip", "pascalvoc20"), ("clearclip", "cityscapes"),
                                           ("gem", "pascalco59")])
def test_cache_classification_equals_end_to_end(tmp_path, request, model, dataset):
    """extract -> fp32 cache -> protocol.classify == features classified directly (window-merge, resize,
    softmax(logit_scale ·) at the original size, synonym max)."""
    m = request.getfixturevalue(f"tiny_{model}")
    settings = m.protocol_settings(dataset)
    image = np.random.default_rng(0).integers(0, 255, size=(30, 52, 3), dtype=np.uint8)
    f = m.extract(image, settings)
    queries, q2c = query_names(dataset, model)
    text = template_embeddings(m.encode_text, queries, templates=["a {}.", "the {}."])
    W = averaged_classifier(text)[None]
    cos = torch.einsum("ndhw,qd->nqhw", f.feats, W[0])
    ref = torch.softmax(settings.logit_scale * pp.resize_to(pp.merge_windows(cos, f.boxes, f.resized_size),
                                                            f.orig_size), dim=0)
    names = CLASS_NAMES[dataset]
    meta = {"model": model, "dataset": dataset, "split": "val", "class_names": names, "query_names": queries,
            "query_to_class": q2c, "settings": settings.to_dict()}
    with CacheWriter(tmp_path / "c", meta, {"k": 1}, text, dtype=torch.float32) as w:
        w.add(ImageRecord("x", f.feats, torch.as_tensor(f.boxes), f.resized_size, f.orig_size, None))
    cache = FeatureCache(tmp_path / "c")
    assert cache.settings == settings
    out = protocol.classify(cache[0], W, settings)[0]
    assert out.shape == ref.shape == (len(queries), 30, 52)
    assert (out - ref).abs().max() <= 1e-5
    merged = protocol.merge_queries(out[None], q2c, len(names))[0]
    ref_merged = torch.stack([ref[[q for q, c in enumerate(q2c) if c == k]].amax(0) for k in range(len(names))])
    assert torch.equal(merged.argmax(0), ref_merged.argmax(0))


def test_gem_448_transform_end_to_end(tmp_path, tiny_gem):
    """GEM's own transform: PIL-bicubic 448x448 squash, one whole-image window, rendered back to the label size."""
    tv = pytest.importorskip("torchvision.transforms")
    from PIL import Image
    m = create_model("gem", backbone=TINY_DEEP, pretrained="none", transform="gem")
    m.clip.load_state_dict(tiny_gem.clip.state_dict())
    settings = m.protocol_settings("cityscapes")
    image = np.random.default_rng(1).integers(0, 255, size=(30, 52, 3), dtype=np.uint8)
    f = m.extract(image, settings)
    assert f.resized_size == (448, 448) and f.orig_size == (30, 52)
    assert f.boxes.tolist() == [[0, 448, 0, 448]] and f.feats.shape == (1, 32, 28, 28)
    squashed = pp.stretch_image(image, (448, 448))
    gem_tf = tv.Resize((448, 448), interpolation=tv.InterpolationMode.BICUBIC)(Image.fromarray(image))
    assert np.array_equal(squashed, np.asarray(gem_tf))             # = GEM's torchvision transform
    x = pp.normalize_clip(pp.image_to_unit_tensor(squashed))[None]
    assert torch.allclose(f.feats, m.window_features(x), atol=1e-5)
    pos = size_rule(m.visual.state_dict(), (28, 28), antialias=True)
    assert float((f.feats - gem_reference(m, x, pos)).abs().max()) <= 1e-5
    # through the cache and the renderer (which only sees boxes, resized_size and orig_size)
    names = CLASS_NAMES["cityscapes"]
    queries, q2c = query_names("cityscapes", "gem")
    text = template_embeddings(m.encode_text, queries, templates=["a {}."])
    W = averaged_classifier(text)[None]
    meta = {"model": "gem", "dataset": "cityscapes", "split": "val", "class_names": names, "query_names": queries,
            "query_to_class": q2c, "settings": settings.to_dict()}
    with CacheWriter(tmp_path / "c", meta, {"k": 1}, text, dtype=torch.float32) as w:
        w.add(ImageRecord("x", f.feats, torch.as_tensor(f.boxes), f.resized_size, f.orig_size, None))
    cache = FeatureCache(tmp_path / "c")
    assert cache.settings == settings and cache.settings.resize == "stretch_bicubic"
    out = protocol.classify(cache[0], W, cache.settings)[0]
    cos = torch.einsum("dhw,qd->qhw", f.feats[0], W[0])
    ref = torch.softmax(50.0 * pp.resize_to(pp.resize_to(cos, (448, 448)), (30, 52)), dim=0)
    assert out.shape == (19, 30, 52) and (out - ref).abs().max() <= 1e-5
    assert torch.equal(out.argmax(0), ref.argmax(0))


@pytest.mark.slow
def test_cli_extract_and_rank_with_sclip(tmp_path):
    """``floss extract --model sclip`` prompts NACLIP's 30 VOC20 query words; ``rank`` keys the unspaced names."""
    from floss import cli
    from floss.core.rankings import load_rankings
    from layouts import make_dataset
    root = make_dataset("pascalvoc20", tmp_path / "voc", n_train=1, n_val=0)
    assert cli.main(["extract", "--model", "sclip", "--dataset", "pascalvoc20", "--split", "train", "--data-root",
                     str(root), "--out", str(tmp_path / "f"), "--backbone", TINY_QUICKGELU, "--pretrained", "none",
                     "--device", "cpu", "--dtype", "fp32"]) == 0
    cache = FeatureCache(tmp_path / "f")
    assert cache.settings == settings_for("sclip", "pascalvoc20")
    assert (cache.query_names, list(cache.manifest["query_to_class"])) == query_names("pascalvoc20", "sclip")
    assert cache[0].feats.shape[1:] == (32, 14, 14)                 # 224 windows on the 16-pixel tiny ViT
    assert cli.main(["rank", "--features", str(tmp_path / "f"), "--out", str(tmp_path / "rk.json")]) == 0
    assert list(load_rankings(tmp_path / "rk.json")["classes"]) == ranking_keys("pascalvoc20", "sclip")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 runs only on CUDA")
@pytest.mark.parametrize("model,config", [("sclip", TINY_QUICKGELU), ("clearclip", TINY_QUICKGELU),
                                          ("gem", TINY_DEEP)])
def test_fp16_on_cuda_matches_fp32(tmp_path, model, config):
    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    torch.save(create_model(model, backbone=config, pretrained="none").clip.state_dict(), path)
    m16 = create_model(model, backbone=config, pretrained=str(path), device="cuda", precision="fp16")
    m32 = create_model(model, backbone=config, pretrained=str(path), device="cuda")
    img = np.random.default_rng(6).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    s = m32.protocol_settings("ade20k")
    a, b = m16.extract(img, s), m32.extract(img, s)
    assert a.feats.dtype == torch.float32 and a.feats.device.type == "cuda"
    assert (a.feats * b.feats).sum(1).min() > 0.99                  # cosine of fp16 vs fp32 features
