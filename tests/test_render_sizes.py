"""The renderer and the fast paths that replicate it, at original sizes far below to far above the model's input.

Reference (written here, independent of floss.protocol): paste each window's upsampled map into a canvas,
divide by the window count, one ``F.interpolate`` (bilinear, align_corners=False) of the whole canvas to the
original size — the authors' computation. Every protocol geometry of the six registered models is covered.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from floss import protocol
from floss.protocol.kernels.argmax import per_template_confusion, per_template_confusion_reference
from floss.data.cache import ImageRecord
from floss.core.evaluation import confusion_matrix
from floss.models.base import settings_for
from floss.models.preprocess import rescale_size, window_boxes

SIZES = [(64, 96), (96, 128), (128, 256), (97, 131), (300, 160), (224, 224), (512, 1024), (1024, 2048)]
# one dataset per distinct geometry of each model (short side, crop/stride, whole image, stretched)
GEOMETRIES = [("maskclip", "ade20k"), ("maskclip", "cityscapes"), ("clipdinoiser", "pascalco59"),
              ("naclip", "ade20k"), ("naclip", "pascalvoc20"), ("naclip", "cityscapes"),
              ("sclip", "cocostuff"), ("sclip", "pascalvoc20"), ("clearclip", "cityscapes"), ("gem", "ade20k"),
              ("gem_448", "ade20k")]
PATCH = 16


def geometry(model: str, dataset: str, orig: tuple[int, int]):
    s = settings_for(model, dataset)
    h, w = s.scale if s.resize == "stretch_bicubic" else rescale_size(*orig, s.scale)
    boxes = window_boxes(h, w, s.crop, s.stride)
    return s, (h, w), torch.as_tensor(boxes, dtype=torch.int32)


def grid_of(boxes: torch.Tensor) -> tuple[int, int]:
    y1, y2, x1, x2 = (int(v) for v in boxes[0])
    return -(-(y2 - y1) // PATCH), -(-(x2 - x1) // PATCH)


def reference_render(maps: torch.Tensor, boxes: torch.Tensor, resized, orig) -> torch.Tensor:
    """``maps [Nw, C, gh, gw]`` -> ``[C, H, W]``: the authors' slide merge and final resize."""
    h, w = resized
    canvas = torch.zeros(maps.shape[1], h, w)
    count = torch.zeros(h, w)
    for (y1, y2, x1, x2), m in zip(boxes.tolist(), maps):
        canvas[:, y1:y2, x1:x2] += F.interpolate(m[None], size=(y2 - y1, x2 - x1), mode="bilinear",
                                                 align_corners=False)[0]
        count[y1:y2, x1:x2] += 1
    canvas = canvas / count
    if tuple(orig) == (h, w):
        return canvas
    return F.interpolate(canvas[None], size=tuple(orig), mode="bilinear", align_corners=False)[0]


CASES = [(m, d, o) for m, d in GEOMETRIES for o in SIZES]


@pytest.mark.parametrize("model,dataset,orig", CASES, ids=[f"{m}-{d}-{o[0]}x{o[1]}" for m, d, o in CASES])
def test_renderer_equals_whole_canvas_interpolate(model, dataset, orig):
    s, resized, boxes = geometry(model, dataset, orig)
    gh, gw = grid_of(boxes)
    g = torch.Generator().manual_seed(orig[0] * 7 + orig[1])
    maps = torch.rand(len(boxes), 3, gh, gw, generator=g)
    rec = ImageRecord("x", torch.zeros(len(boxes), 1, gh, gw), boxes, resized, orig)
    ref = reference_render(maps, boxes, resized, orig)
    r = protocol._Renderer(rec, "orig", "cpu")
    identity = lambda t: t   # noqa: E731 (per_window: forces the canvas path)
    # default bands (one band when the canvas fits: F.interpolate of the whole canvas, the authors' bits)
    bands = list(r.bands(3))
    canvas = torch.cat([r.render(maps, band, per_window=identity) for band in bands], dim=1)
    if bands == [(0, orig[0])]:
        assert torch.equal(canvas, ref)
    torch.testing.assert_close(canvas, ref, rtol=0, atol=1e-6)
    # many bands: the separable band path
    small = list(r.bands(3, max_elements=3 * max(resized[1], orig[1]) * 40))
    banded = torch.cat([r.render(maps, band, per_window=identity) for band in small], dim=1)
    torch.testing.assert_close(banded, ref, rtol=0, atol=1e-6)
    # composed linear path (window grids only)
    if r.grid:
        composed = torch.cat([r.render_composed(maps, band) for band in small], dim=1)
        torch.testing.assert_close(composed, ref, rtol=0, atol=1e-6)


FAST = [(m, d, o) for m, d in [("maskclip", "ade20k"), ("naclip", "ade20k"), ("naclip", "cityscapes"),
                               ("clearclip", "cityscapes")]
        for o in [(64, 96), (97, 131), (128, 256), (300, 160), (512, 1024)]]


@pytest.mark.parametrize("model,dataset,orig", FAST, ids=[f"{m}-{d}-{o[0]}x{o[1]}" for m, d, o in FAST])
def test_per_template_fast_path_at_every_size(model, dataset, orig):
    """The per-template argmax shortcut (and the renderer loop it falls back on) predict the reference's argmax
    wherever the reference's top two classes are not within rounding of each other."""
    s, resized, boxes = geometry(model, dataset, orig)
    gh, gw = grid_of(boxes)
    g = torch.Generator().manual_seed(1)
    d, k, m = 8, 4, 2
    feats = F.normalize(torch.randn(len(boxes), d, gh, gw, generator=g), dim=1)
    text = F.normalize(torch.randn(m, k, d, generator=g), dim=-1)
    rec = ImageRecord("x", feats, boxes, resized, orig)
    final = s.softmax_stage == "final"
    maps = protocol.window_scores(rec, text, s, softmax=not final, device="cpu")       # [Nw, M, K, gh, gw]
    fp16 = s.window_fp16
    for t in range(m):
        # the renderer (fp32 canvas, optional fp16 window cast), and the per-template paths (canvas per settings)
        for ref, canvas16, fns in [(_reference(maps[:, t], boxes, resized, orig, fp16, False), False, ()),
                                   (_reference(maps[:, t], boxes, resized, orig, fp16, s.canvas_fp16), True,
                                    (per_template_confusion, per_template_confusion_reference))]:
            top2 = ref.topk(2, dim=0).values
            clear = (top2[0] - top2[1]) > (1e-5 if not fp16 else 2e-3 if not s.canvas_fp16 else 1e-2)
            label = torch.where(clear, ref.argmax(0), torch.full_like(clear, 255, dtype=torch.long)).to(torch.uint8)
            for fn in fns:
                conf = fn(rec, text[t:t + 1], s, list(range(k)), k, label, "cpu")[0]
                assert int(conf.sum()) == int(clear.sum())
                assert int(conf.trace()) == int(clear.sum()), (fn.__name__, int(conf.sum() - conf.trace()))
            if not canvas16:
                r = protocol._Renderer(rec, "orig", "cpu")
                pred = torch.cat([protocol.merge_queries(r.render(maps[:, t], band, window_fp16=fp16), list(range(k)),
                                                         k).argmax(0) for band in r.bands(k)])
                cm = confusion_matrix(pred, label.long(), k, ignore_index=255)
                assert int(cm.trace()) == int(clear.sum())


def _reference(maps, boxes, resized, orig, window16: bool, canvas16: bool):
    """``reference_render`` with the fp16 window cast and/or the fp16 canvas (sums and division in fp16)."""
    h, w = resized
    canvas = torch.zeros(maps.shape[1], h, w, dtype=torch.float16 if canvas16 else torch.float32)
    count = torch.zeros(h, w)
    for (y1, y2, x1, x2), m in zip(boxes.tolist(), maps):
        up = F.interpolate(m[None], size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)[0]
        canvas[:, y1:y2, x1:x2] += up.half().to(canvas.dtype) if window16 or canvas16 else up
        count[y1:y2, x1:x2] += 1
    canvas = (canvas / count.to(canvas.dtype)).float()
    if tuple(orig) == (h, w):
        return canvas
    return F.interpolate(canvas[None], size=tuple(orig), mode="bilinear", align_corners=False)[0]


@pytest.mark.parametrize("n_in,n_out", [(448, 100), (336, 97), (437, 131), (224, 300), (14, 224), (28, 28)])
def test_two_tap_matmul_is_the_float64_matmul(n_in, n_out):
    """The renderer's band passes: two taps per output, the bits of the dense float64 product rounded once."""
    from floss.core.kernels.interp import interp_matrix, two_tap_matmul
    m = interp_matrix(n_in, n_out, "cpu")
    x = torch.randn(3, n_in, 5, generator=torch.Generator().manual_seed(n_in)) * 7
    dense = torch.einsum("oi,nic->noc", m.double(), x.double()).float()
    assert torch.equal(two_tap_matmul(m, x, dim=1), dense)
    assert torch.equal(two_tap_matmul(m, x.transpose(1, 2), dim=2), dense.transpose(1, 2))
