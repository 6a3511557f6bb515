"""Resize rule, window grid, padding, normalisation, window merging and protocol settings."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from floss.models import ProtocolSettings, settings_for
from floss.models import preprocess as pp
from floss.models.base import DRIVING_DATASETS, KNOWN_DATASETS


# ------------------------------------------------------------------------------------------- resize rule
@pytest.mark.parametrize("hw, scale, expected", [
    ((1024, 2048), (896, 448), (448, 896)),      # Cityscapes, MaskCLIP/CLIP-DINOiser
    ((1024, 2048), (2048, 560), (560, 1120)),    # Cityscapes, NACLIP
    ((375, 500), (2048, 448), (448, 597)),       # VOC-like: 500*448/375 = 597.33
    ((375, 500), (2048, 336), (336, 448)),
    ((500, 375), (2048, 336), (448, 336)),       # portrait
    ((720, 1280), (1280, 448), (448, 796)),      # BDD: 1280*0.6222 = 796.4
    ((1080, 1920), (796, 448), (448, 796)),      # ACDC
    ((100, 5000), (2048, 448), (41, 2048)),      # the long-side limit binds
])
def test_rescale_size_examples(hw, scale, expected):
    assert pp.rescale_size(*hw, scale) == expected
    assert pp.rescale_size(*hw, scale[::-1]) == expected     # mmcv takes max/min of the pair


def test_rescale_size_rounds_half_up_like_mmcv():
    # s = 448/375; w = 500*s = 597.33 -> int(597.83) = 597; h = 375*s = 448.0 -> 448
    s = min(2048 / 500, 448 / 375)
    assert pp.rescale_size(375, 500, (2048, 448)) == (int(375 * s + 0.5), int(500 * s + 0.5))


def test_resize_image_is_cv2_bilinear_and_channel_order_free():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    out = pp.resize_image(img, (2048, 448))
    assert out.shape == (448, 642, 3) and out.dtype == np.uint8
    assert np.array_equal(out, cv2.resize(img, (642, 448), interpolation=cv2.INTER_LINEAR))
    # authors: load BGR, resize, then swap; the resize is per channel so the order does not matter
    assert np.array_equal(pp.resize_image(img[..., ::-1].copy(), (2048, 448))[..., ::-1], out)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32),
                                 np.zeros((4, 4, 4), np.uint8), [[1, 2, 3]]])
def test_resize_image_rejects_bad_images(bad):
    with pytest.raises((TypeError, ValueError), match="image"):
        pp.resize_image(bad, (2048, 448))


# ------------------------------------------------------------------------------ tensors and normalisation
def test_unit_tensor_normalisation_and_padding():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    x = pp.image_to_unit_tensor(img)
    assert x.shape == (3, 2, 3) and x.dtype == torch.float32
    assert torch.allclose(x[:, 1, 2] * 255, torch.tensor(img[1, 2], dtype=torch.float32))
    n = pp.normalize_clip(x)
    mean, std = torch.tensor(pp.CLIP_MEAN), torch.tensor(pp.CLIP_STD)
    assert torch.allclose(n[:, 0, 1], (x[:, 0, 1] - mean) / std)
    assert pp.CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    y = pp.pad_to_multiple(torch.ones(2, 3, 40, 56), 16)
    assert y.shape == (2, 3, 48, 64)
    assert float(y[..., :40, :56].min()) == 1.0 and float(y[..., 40:, :].abs().max()) == 0.0
    assert float(y[..., :, 56:].abs().max()) == 0.0
    z = torch.ones(1, 3, 32, 48)
    assert pp.pad_to_multiple(z, 16) is z


# ------------------------------------------------------------------------------------------- window grid
def test_window_grid_cityscapes_maskclip():
    boxes = pp.window_boxes(448, 896, 448, 224)
    assert boxes.dtype == np.int32
    assert boxes.tolist() == [[0, 448, 0, 448], [0, 448, 224, 672], [0, 448, 448, 896]]


def test_window_grid_shifts_the_last_window_inward():
    # W = 500, c = 224, s = 112: n = (500 - 224 + 111) // 112 + 1 = 4, last window x = [276, 500)
    assert pp.window_starts(500, 224, 112) == [(0, 224), (112, 336), (224, 448), (276, 500)]
    boxes = pp.window_boxes(336, 500, 224, 112)
    assert len(boxes) == 2 * 4 and boxes[-1].tolist() == [112, 336, 276, 500]


@pytest.mark.parametrize("hw, crop, stride, n", [((336, 448), 224, 112, 6), ((560, 1120), 224, 112, 36),
                                                  ((448, 597), 448, 224, 2), ((448, 448), 448, 224, 1)])
def test_window_counts(hw, crop, stride, n):
    assert len(pp.window_boxes(*hw, crop, stride)) == n


def test_window_grid_small_image_and_whole_image():
    assert pp.window_boxes(100, 150, 224, 112).tolist() == [[0, 100, 0, 150]]
    assert pp.window_boxes(300, 150, 224, 112).tolist() == [[0, 224, 0, 150], [76, 300, 0, 150]]
    assert pp.window_boxes(336, 474, None, None).tolist() == [[0, 336, 0, 474]]
    with pytest.raises(ValueError, match="stride"):
        pp.window_boxes(10, 10, 4, None)


# ------------------------------------------------------------------------------------------------ merging
def _naive_merge(maps, boxes, size):
    canvas = torch.zeros((maps.shape[1],) + tuple(size), dtype=torch.float64)
    count = torch.zeros(tuple(size), dtype=torch.float64)
    for m, (y1, y2, x1, x2) in zip(maps, boxes.tolist()):
        up = F.interpolate(m[None].double(), size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)[0]
        for y in range(y1, y2):                       # deliberately naive: one row at a time
            canvas[:, y, x1:x2] += up[:, y - y1]
            count[y, x1:x2] += 1
    return canvas / count


@pytest.mark.parametrize("size, crop, stride", [((40, 70), 24, 12), ((30, 30), 24, 10), ((20, 50), None, None)])
def test_merge_windows_equals_naive_loop(size, crop, stride):
    boxes = pp.window_boxes(*size, crop, stride)
    maps = torch.randn(len(boxes), 5, 3, 3, generator=torch.Generator().manual_seed(0))
    ref = _naive_merge(maps, boxes, size)
    for chunk in (1, 2, 16):
        out = pp.merge_windows(maps, boxes, size, chunk=chunk)
        assert out.shape == (5,) + size and out.dtype == torch.float32
        assert torch.allclose(out.double(), ref, atol=1e-5)


def test_merge_windows_mixed_window_sizes_and_errors():
    boxes = np.array([[0, 10, 0, 12], [0, 10, 6, 20], [4, 10, 0, 20]], dtype=np.int32)
    maps = torch.rand(3, 2, 2, 3, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(pp.merge_windows(maps, boxes, (10, 20)).double(), _naive_merge(maps, boxes, (10, 20)),
                          atol=1e-6)
    with pytest.raises(ValueError, match="cover"):
        pp.merge_windows(maps[:1], boxes[:1], (10, 20))
    with pytest.raises(ValueError, match="boxes"):
        pp.merge_windows(maps, boxes[:2], (10, 20))
    with pytest.raises(ValueError, match="boxes"):
        pp.merge_windows(maps, boxes, (8, 20))


def test_resize_to_matches_interpolate():
    x = torch.randn(3, 5, 7)
    out = pp.resize_to(x, (11, 13))
    assert torch.equal(out, F.interpolate(x[None], size=(11, 13), mode="bilinear", align_corners=False)[0])
    assert pp.resize_to(x[None], (11, 13)).shape == (1, 3, 11, 13)
    assert pp.resize_to(x, (5, 7)) is x


# -------------------------------------------------------------------------------------- protocol settings
def test_settings_table_authors():
    s = settings_for("maskclip", "cityscapes")
    assert (s.scale, s.crop, s.stride, s.softmax_stage) == ((896, 448), 448, 224, "window")
    assert (s.logit_scale, s.renormalize_experts, s.renormalize_fallback, s.window_fp16) == (100.0, False, False, False)
    assert settings_for("clipdinoiser", "cityscapes") == s
    assert settings_for("clipdinoiser", "bdd").scale == (1280, 448)
    assert settings_for("clipdinoiser", "acdc_fog").scale == (796, 448)
    assert settings_for("maskclip", "mapillary").scale == (1920, 448)
    for ds in ("pascalvoc20", "pascalco59", "ade20k", "cocostuff"):
        assert settings_for("clipdinoiser", ds).scale == (2048, 448)
    assert settings_for("clipdinoiser", "ade20k").window_fp16 and settings_for("naclip", "cocostuff").window_fp16
    assert not settings_for("clipdinoiser", "pascalco59").window_fp16
    n = settings_for("naclip", "ade20k")
    assert (n.scale, n.crop, n.stride, n.softmax_stage, n.renormalize_experts, n.renormalize_fallback) == \
        ((2048, 336), 224, 112, "final", True, True)
    for ds in DRIVING_DATASETS:
        assert settings_for("naclip", ds).scale == (2048, 560)
    v = settings_for("naclip", "pascalvoc20")
    assert (v.crop, v.stride) == (None, None)


def test_settings_table_paper():
    m = settings_for("maskclip", "ade20k", protocol="paper")
    assert (m.scale, m.crop, m.stride, m.renormalize_experts, m.renormalize_fallback, m.window_fp16) == \
        ((2048, 336), 224, 112, True, True, False)
    assert settings_for("maskclip", "cityscapes", "paper").scale == (2048, 560)
    c = settings_for("clipdinoiser", "cityscapes", "paper")
    assert (c.scale, c.crop, c.renormalize_experts, c.protocol) == ((896, 448), 448, True, "paper")


def test_settings_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="naclip"):
        settings_for("segformer", "ade20k")
    with pytest.raises(ValueError, match="cityscapes"):
        settings_for("naclip", "kitti")
    with pytest.raises(ValueError, match="authors"):
        settings_for("naclip", "ade20k", protocol="mine")


def test_settings_roundtrip_and_validation():
    for model in ("maskclip", "clipdinoiser", "naclip"):
        for ds in KNOWN_DATASETS:
            s = settings_for(model, ds)
            assert ProtocolSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    d = settings_for("naclip", "ade20k").to_dict()
    with pytest.raises(ValueError, match="missing"):
        ProtocolSettings.from_dict({k: v for k, v in d.items() if k != "crop"})
    with pytest.raises(ValueError, match="unknown"):
        ProtocolSettings.from_dict({**d, "extra": 1})
    with pytest.raises(ValueError, match="softmax_stage"):
        ProtocolSettings.from_dict({**d, "softmax_stage": "late"})
    with pytest.raises(ValueError, match="crop/stride"):
        ProtocolSettings.from_dict({**d, "stride": None})
    with pytest.raises(ValueError, match="scale"):
        ProtocolSettings.from_dict({**d, "scale": [2048]})
    with pytest.raises(ValueError, match="renormalize_experts"):
        ProtocolSettings.from_dict({**d, "renormalize_experts": 1})
