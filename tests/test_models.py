"""Models on tiny random open_clip ViTs: last-block formulas, positional embeddings, checkpoints, loading."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU

from floss.models import (CLIPDINOiser, DenseModel, ImageFeatures, ProtocolSettings, available_models,
                          create_model, register_model, settings_for)
from floss.models import preprocess as pp
from floss.models.backbone import resolve_weights
from floss.models.clipdinoiser import CorrelationHead, load_head_state_dict


def _ln(x, sd, prefix):
    return F.layer_norm(x, (x.shape[-1],), sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps=1e-5)


def _windows(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _trunk_by_hand(model, x, pos):
    """Embedding step written out from the state dict, then the standard open_clip blocks 1..L-1."""
    sd = model.visual.state_dict()
    t = F.conv2d(x, sd["conv1.weight"], stride=model.patch_size).flatten(2).transpose(1, 2)
    t = torch.cat([sd["class_embedding"].expand(x.shape[0], 1, -1), t], dim=1) + pos
    t = _ln(t, sd, "ln_pre")
    for blk in model.visual.transformer.resblocks[:-1]:
        t = blk(t)
    return t, sd


def _patch_pos(sd, grid0):
    return sd["positional_embedding"][1:].reshape(1, grid0[0], grid0[1], -1).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------------ MaskCLIP
def test_trunk_matches_open_clip_at_the_native_grid(tiny_maskclip):
    m = tiny_maskclip
    x = _windows((2, 3, 64, 64))
    ours = m.run_blocks(m.embed(x, m.pos_embed_for((4, 4))), -1)
    ref = m.visual.forward_intermediates(x, indices=[len(m.visual.transformer.resblocks) - 2], stop_early=True,
                                         intermediates_only=True, output_fmt="NLC", output_extra_tokens=True)
    ref = torch.cat([ref["image_intermediates_prefix"][0], ref["image_intermediates"][0]], dim=1)
    assert torch.allclose(ours, ref, atol=1e-5)
    # the size-based bicubic resize is the identity at the native grid
    assert torch.allclose(m.pos_embed_for((4, 4)), m.visual.positional_embedding, atol=1e-6)


def test_maskclip_last_block_formula(tiny_maskclip):
    m = tiny_maskclip
    x = _windows((2, 3, 48, 80))                                   # grid 3x5: bicubic pos-embed resize
    sd = m.visual.state_dict()
    pos = torch.cat([sd["positional_embedding"][:1], F.interpolate(
        _patch_pos(sd, (4, 4)), size=(3, 5), mode="bicubic", align_corners=False).flatten(2)[0].T])
    X, sd = _trunk_by_hand(m, x, pos)
    L, D = len(m.visual.transformer.resblocks) - 1, X.shape[-1]
    b = f"transformer.resblocks.{L}"
    Y = _ln(X, sd, f"{b}.ln_1")
    V = Y @ sd[f"{b}.attn.in_proj_weight"][2 * D:].T + sd[f"{b}.attn.in_proj_bias"][2 * D:]
    Z = X + V @ sd[f"{b}.attn.out_proj.weight"].T + sd[f"{b}.attn.out_proj.bias"]
    H = _ln(Z, sd, f"{b}.ln_2") @ sd[f"{b}.mlp.c_fc.weight"].T + sd[f"{b}.mlp.c_fc.bias"]
    Z = Z + F.gelu(H) @ sd[f"{b}.mlp.c_proj.weight"].T + sd[f"{b}.mlp.c_proj.bias"]
    Fm = _ln(Z, sd, "ln_post")[:, 1:] @ sd["proj"]
    Fm = Fm.reshape(2, 3, 5, -1).permute(0, 3, 1, 2)
    assert torch.allclose(m.dense_features(x), Fm, atol=1e-5)
    out = m.window_features(x)
    assert out.shape == (2, 32, 3, 5)
    assert torch.allclose(out, Fm / Fm.norm(dim=1, keepdim=True), atol=1e-5)
    assert torch.allclose(out.norm(dim=1), torch.ones(2, 3, 5), atol=1e-5)


def test_maskclip_cls_token_does_not_influence_patches(tiny_maskclip):
    m = tiny_maskclip
    x = _windows((1, 3, 32, 48))
    tokens = m.run_blocks(m.embed(x, m.pos_embed_for((2, 3))), -1)
    from floss.models.maskclip import maskclip_last_block
    a = maskclip_last_block(m.visual.transformer.resblocks[-1], tokens)
    tokens[:, 0] += 5.0
    b = maskclip_last_block(m.visual.transformer.resblocks[-1], tokens)
    assert torch.allclose(a[:, 1:], b[:, 1:], atol=1e-6) and not torch.allclose(a[:, 0], b[:, 0])


# -------------------------------------------------------------------------------------------------- NACLIP
def _naclip_conv_omega(gh, gw, std):
    """NACLIP's construction: one-hot maps convolved with an untruncated (2gh-1)x(2gw-1) Gaussian window."""
    c = 1 / (std * math.sqrt(2))
    ks = [torch.linspace(-(d - 1) / 2 * c, (d - 1) / 2 * c, d) for d in (2 * gh - 1, 2 * gw - 1)]
    window = torch.exp(-(torch.stack(torch.meshgrid(*ks, indexing="ij")) ** 2).sum(0))
    eye = torch.einsum("ij,kl->ijkl", torch.eye(gh), torch.eye(gw)).permute(0, 3, 1, 2).reshape(-1, 1, gh, gw)
    out = F.conv2d(eye, window[None, None], padding="same").reshape(gh * gw, gh * gw)
    full = torch.zeros(gh * gw + 1, gh * gw + 1)
    full[1:, 1:] = out
    return full


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (2, 7)])
def test_gaussian_addition_matches_naclip_convolution(grid):
    from floss.models.naclip import gaussian_addition
    omega = gaussian_addition(*grid, 5.0)
    assert torch.allclose(omega, _naclip_conv_omega(*grid, 5.0), atol=1e-6)
    assert float(omega[0].abs().max()) == 0.0 and float(omega[:, 0].abs().max()) == 0.0
    assert torch.allclose(torch.diagonal(omega)[1:], torch.ones(grid[0] * grid[1]))


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_naclip_last_block_formula(tiny_naclip, size):
    m = tiny_naclip
    assert isinstance(m.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    x = _windows((2, 3) + size, seed=3)
    grid = (size[0] // 16, size[1] // 16)
    sd = m.visual.state_dict()
    if grid == (4, 4):
        pos = sd["positional_embedding"]                            # native grid: untouched
    else:                                                           # DINO-style scale_factor + 0.1 rule
        patch = F.interpolate(_patch_pos(sd, (4, 4)), scale_factor=((grid[0] + 0.1) / 4, (grid[1] + 0.1) / 4),
                              mode="bicubic", align_corners=False, recompute_scale_factor=False)
        pos = torch.cat([sd["positional_embedding"][:1], patch.flatten(2)[0].T])
        size_based = F.interpolate(_patch_pos(sd, (4, 4)), size=grid, mode="bicubic", align_corners=False)
        assert not torch.allclose(patch, size_based, atol=1e-4)     # the two rules really differ
    assert torch.allclose(m.pos_embed_for(grid), pos, atol=1e-6)
    X, sd = _trunk_by_hand(m, x, pos)
    L, D, heads = len(m.visual.transformer.resblocks) - 1, X.shape[-1], m.visual.transformer.resblocks[-1].attn.num_heads
    b, dh = f"transformer.resblocks.{L}", D // heads
    Y = _ln(X, sd, f"{b}.ln_1")
    QKV = Y @ sd[f"{b}.attn.in_proj_weight"].T + sd[f"{b}.attn.in_proj_bias"]
    K, V = QKV[..., D:2 * D], QKV[..., 2 * D:]
    omega = _naclip_conv_omega(*grid, 5.0)
    heads_out = []
    for h in range(heads):                                          # per head, written out
        Kh, Vh = K[..., h * dh:(h + 1) * dh], V[..., h * dh:(h + 1) * dh]
        A = torch.softmax(Kh @ Kh.transpose(1, 2) / math.sqrt(dh) + omega, dim=-1)
        heads_out.append(A @ Vh)
    O = torch.cat(heads_out, dim=-1) @ sd[f"{b}.attn.out_proj.weight"].T + sd[f"{b}.attn.out_proj.bias"]
    Fn = _ln(O, sd, "ln_post")[:, 1:] @ sd["proj"]                  # no residual, no FFN
    Fn = Fn / Fn.norm(dim=-1, keepdim=True)
    out = m.window_features(x)
    assert out.shape == (2, 32) + grid
    assert torch.allclose(out, Fn.reshape(2, grid[0], grid[1], -1).permute(0, 3, 1, 2), atol=1e-5)


# ------------------------------------------------------------------------------------------- CLIP-DINOiser
def test_clipdinoiser_pooling_formula(tiny_clipdinoiser):
    m = tiny_clipdinoiser
    x = _windows((2, 3, 48, 64), seed=5)
    with torch.no_grad():                                           # make the gamma threshold bite
        m.head.obj_proj.weight.mul_(0.3)
    Fm = m.dense_features(x)
    # clip_inter = ln_2 output of resblocks[-3]: run the blocks before it, then its attention half by hand
    t = m.embed(x, m.pos_embed_for((3, 4)))
    blocks = m.visual.transformer.resblocks
    for blk in blocks[:len(blocks) - 3]:
        t = blk(t)
    blk = blocks[-3]
    y = blk.ln_1(t)
    G = blk.ln_2(t + blk.attn(y, y, y, need_weights=False)[0])[:, 1:].reshape(2, 3, 4, -1).permute(0, 3, 1, 2)
    w, bias = m.head.obj_proj.weight, m.head.obj_proj.bias
    P = F.conv2d(F.pad(G, (1, 1, 1, 1), mode="replicate"), w, bias).flatten(2)
    P = P / P.norm(dim=1, keepdim=True)
    C = torch.einsum("bcp,bcq->bpq", P, P)
    C = torch.where(C < 0.2, torch.zeros_like(C), C)
    assert 0 < int((C == 0).sum()) < C.numel()
    ref = torch.einsum("bpq,beq->bep", C, Fm.flatten(2)) / (C.sum(-1)[:, None, :] + 1e-6)
    ref = ref / ref.norm(dim=1, keepdim=True)
    assert torch.allclose(m.window_features(x), ref.reshape(2, -1, 3, 4), atol=1e-5)


def test_clipdinoiser_pads_windows_to_the_patch_size(tiny_clipdinoiser):
    m = tiny_clipdinoiser
    img = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    settings = ProtocolSettings(scale=(56, 40), crop=None, stride=None, softmax_stage="window", logit_scale=100.0,
                                renormalize_experts=False, renormalize_fallback=False, window_fp16=False,
                                protocol="authors")
    out = m.extract(img, settings)
    assert out.feats.shape == (1, 32, 3, 4) and out.resized_size == (40, 56)   # ceil(40/16) x ceil(56/16)
    x = torch.zeros(1, 3, 48, 64)
    x[..., :40, :56] = pp.image_to_unit_tensor(img)
    assert torch.allclose(out.feats, m.window_features(pp.normalize_clip(x)), atol=1e-6)


def _head_tensors(width=64, seed=0):
    torch.manual_seed(seed)
    return CorrelationHead(width).state_dict()


def test_clipdinoiser_checkpoint_layouts(tmp_path, tiny_gelu_config):
    sd = _head_tensors()
    last = tmp_path / "last.pt"
    torch.save({"epoch": 99, "model_state_dict": sd}, last)
    m = create_model("clipdinoiser", backbone=tiny_gelu_config, pretrained="none", checkpoint=str(last))
    for k, v in sd.items():
        assert torch.equal(m.head.state_dict()[k], v)
    # FLOSS model_weights.pth: "model."-prefixed keys inside "state_dict", with frozen backbone keys around
    full = {f"model.{k}": v + 1 for k, v in sd.items()}
    full["model.clip_backbone.backbone.visual.proj"] = torch.zeros(64, 32)
    floss_file = tmp_path / "model_weights.pth"
    torch.save({"meta": {"epoch": 1}, "state_dict": full}, floss_file)
    head = CorrelationHead(64)
    load_head_state_dict(str(floss_file), head)
    assert torch.equal(head.obj_proj.bias, sd["obj_proj.bias"] + 1)
    plain = tmp_path / "plain.pth"
    torch.save({f"module.{k}": v for k, v in sd.items()}, plain)
    load_head_state_dict(str(plain), head)
    assert torch.equal(head.bkg_decoder.weight, sd["bkg_decoder.weight"])


def test_clipdinoiser_needs_three_blocks(tmp_path, tiny_gelu_config):
    cfg = json.loads(Path(tiny_gelu_config).read_text())
    cfg["vision_cfg"]["layers"] = 2
    two = tmp_path / "tiny-two-blocks.json"
    two.write_text(json.dumps(cfg))
    torch.save({"model_state_dict": _head_tensors(cfg["vision_cfg"]["width"])}, tmp_path / "last.pt")
    with pytest.raises(ValueError, match=r"at least 3 blocks; .*tiny-two-blocks.* has 2"):
        create_model("clipdinoiser", backbone=str(two), pretrained="none", checkpoint=str(tmp_path / "last.pt"))


def test_clipdinoiser_checkpoint_is_strict(tmp_path):
    sd = _head_tensors()
    head = CorrelationHead(64)
    cases = {
        "missing": ({k: v for k, v in sd.items() if k != "bkg_decoder.bias"}, "bkg_decoder.bias"),
        "shape": ({**sd, "obj_proj.weight": torch.zeros(256, 32, 3, 3)}, "obj_proj.weight"),
        "extra": ({**sd, "found_model.decoder.weight": torch.zeros(1)}, "found_model.decoder.weight"),
    }
    for name, (state, key) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save({"epoch": 0, "model_state_dict": state}, path)
        with pytest.raises(ValueError) as err:
            load_head_state_dict(str(path), head)
        assert key in str(err.value) and str(path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_head_state_dict(str(tmp_path / "nowhere.pt"), head)


def test_clipdinoiser_needs_a_checkpoint_with_real_weights(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="checkpoint"):
        CLIPDINOiser(pretrained="laion2b_s34b_b88k", cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        CLIPDINOiser(checkpoint=str(tmp_path / "missing.pth"), cache_dir=str(tmp_path))
    assert time.perf_counter() - t0 < 5


# ---------------------------------------------------------------------------------------- weights loading
def test_missing_weights_fail_fast_with_instructions(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        create_model("maskclip", cache_dir=str(tmp_path))
    msg = str(err.value)
    assert "laion2b_s34b_b88k" in msg and "laion/CLIP-ViT-B-16-laion2B-s34B-b88K" in msg and str(tmp_path) in msg
    with pytest.raises(FileNotFoundError, match="openai"):
        create_model("naclip", cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no_such_weights.safetensors"):
        create_model("naclip", pretrained=str(tmp_path / "no_such_weights.safetensors"))
    assert time.perf_counter() - t0 < 5


def test_cached_hf_weights_are_found_offline(tmp_path):
    snap = tmp_path / "models--timm--vit_base_patch16_clip_224.openai" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "open_clip_model.safetensors").write_bytes(b"x")
    (tmp_path / "models--timm--vit_base_patch16_clip_224.openai" / "refs").mkdir()
    (tmp_path / "models--timm--vit_base_patch16_clip_224.openai" / "refs" / "main").write_text("abc123")
    path = resolve_weights("ViT-B-16-quickgelu", "openai", cache_dir=str(tmp_path))
    assert path is not None and path.endswith("open_clip_model.safetensors") and os.path.isfile(path)


def test_quickgelu_trap_and_bad_names_are_refused(tmp_path, tiny_quickgelu_config):
    with pytest.raises(ValueError, match="quickgelu"):
        create_model("naclip", backbone="ViT-B-16", pretrained="openai", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="known tags"):
        create_model("naclip", pretrained="no-such-tag")
    with pytest.raises(ValueError, match="backbone"):
        create_model("naclip", backbone="ViT-Nope-99", pretrained="none")
    with pytest.raises(ValueError, match="CUDA"):
        create_model("naclip", backbone=tiny_quickgelu_config, pretrained="none", precision="fp16")
    with pytest.raises(ValueError, match="checkpoint"):
        create_model("naclip", backbone=tiny_quickgelu_config, pretrained="none", checkpoint="x.pt")


def test_local_weight_file_is_loaded(tmp_path, tiny_naclip, tiny_quickgelu_config):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_naclip.clip.state_dict(), path)
    m = create_model("naclip", backbone=tiny_quickgelu_config, pretrained=str(path))
    for k, v in tiny_naclip.clip.state_dict().items():
        assert torch.equal(m.clip.state_dict()[k], v), k


def test_registry_and_unknown_model():
    assert {"maskclip", "clipdinoiser", "naclip"} <= set(available_models())
    with pytest.raises(ValueError, match="maskclip"):
        create_model("segformer")
    with pytest.raises(ValueError, match="already registered"):
        register_model("naclip", lambda **kw: None)


def test_text_encoder_is_normalised(tiny_maskclip):
    emb = tiny_maskclip.encode_text(["a photo of a cat.", "a photo of a dog.", "a photo of a cat."])
    assert emb.shape == (3, 32) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(emb[0], emb[2]) and not torch.allclose(emb[0], emb[1])


# ---------------------------------------------------------------------------------- user model plug-in
class MeanColour(DenseModel):
    """A user's model: per-patch mean colour plus a constant channel, L2-normalised."""

    name, feature_dim, patch_size = "mean-colour", 4, 8

    def encode_text(self, texts):
        return F.normalize(torch.ones(len(texts), 4), dim=-1)

    def window_features(self, x):
        f = torch.cat([F.avg_pool2d(x, self.patch_size), torch.ones_like(F.avg_pool2d(x[:, :1], self.patch_size))], 1)
        return f / f.norm(dim=1, keepdim=True)


def test_user_model_goes_through_the_protocol():
    register_model("mean-colour", lambda **kw: MeanColour(), overwrite=True)
    model = create_model("mean-colour")
    img = np.random.default_rng(2).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    settings = ProtocolSettings(scale=(100, 40), crop=32, stride=16, softmax_stage="final", logit_scale=100.0,
                                renormalize_experts=True, renormalize_fallback=True, window_fp16=False,
                                protocol="authors")
    out = model.extract(img, settings, batch_size=2)
    assert isinstance(out, ImageFeatures)
    assert out.orig_size == (30, 50) and out.resized_size == (40, 67)           # s = min(100/50, 40/30)
    assert out.boxes.tolist() == pp.window_boxes(40, 67, 32, 16).tolist() and out.boxes.dtype == np.int32
    unit = pp.image_to_unit_tensor(pp.resize_image(img, (100, 40)))
    for f, (y1, y2, x1, x2) in zip(out.feats, out.boxes.tolist()):
        expect = model.window_features(pp.normalize_clip(unit[:, y1:y2, x1:x2])[None])[0]
        assert torch.allclose(f, expect, atol=1e-6)


def test_extract_checks_the_user_model_contract():
    class Unnormalised(MeanColour):
        def window_features(self, x):
            return 3 * super().window_features(x)

    class WrongShape(MeanColour):
        def window_features(self, x):
            return super().window_features(x)[..., :1]

    img = np.zeros((16, 16, 3), dtype=np.uint8)
    s = settings_for("naclip", "pascalvoc20")
    with pytest.raises(ValueError, match="L2-normalised"):
        Unnormalised().extract(img, s)
    with pytest.raises(ValueError, match="expected shape"):
        WrongShape().extract(img, s)
    with pytest.raises(TypeError, match="ProtocolSettings"):
        MeanColour().extract(img, s.to_dict())


def test_extract_on_builtin_models_matches_windows(tiny_naclip):
    img = np.random.default_rng(4).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    s = ProtocolSettings(scale=(2048, 64), crop=48, stride=32, softmax_stage="final", logit_scale=100.0,
                         renormalize_experts=True, renormalize_fallback=True, window_fp16=False, protocol="authors")
    out = tiny_naclip.extract(img, s, batch_size=3)
    assert out.resized_size == (64, 96) and out.feats.shape == (len(out.boxes), 32, 3, 3)
    unit = pp.normalize_clip(pp.image_to_unit_tensor(pp.resize_image(img, s.scale)))
    y1, y2, x1, x2 = out.boxes[-1].tolist()
    assert torch.allclose(out.feats[-1], tiny_naclip.window_features(unit[None, :, y1:y2, x1:x2])[0], atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 NACLIP runs only on CUDA")
def test_naclip_fp16_on_cuda_matches_fp32(tmp_path, tiny_naclip, tiny_quickgelu_config):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_naclip.clip.state_dict(), path)
    m16 = create_model("naclip", backbone=tiny_quickgelu_config, pretrained=str(path), device="cuda",
                       precision="fp16")
    m32 = create_model("naclip", backbone=tiny_quickgelu_config, pretrained=str(path), device="cuda")
    img = np.random.default_rng(6).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    s = settings_for("naclip", "ade20k")
    a, b = m16.extract(img, s), m32.extract(img, s)
    assert a.feats.dtype == torch.float32 and a.feats.device.type == "cuda"
    assert (a.feats * b.feats).sum(1).min() > 0.99                  # cosine of fp16 vs fp32 features
