"""The authors' fp16 canvas (compute_metric on ADE20K/COCO-Stuff): one rule in the settings, used by the ranking
and the per-template evaluation of every model, NACLIP included (protocol §2.4)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from floss import protocol
from floss.protocol.kernels.argmax import per_template_confusion, per_template_confusion_reference
from floss.data.cache import ImageRecord
from floss.models.base import PROTOCOL_MODELS, KNOWN_DATASETS, ProtocolSettings, settings_for
from floss.models.preprocess import rescale_size, window_boxes


def test_the_settings_say_where_the_canvas_is_fp16():
    for ds in ("ade20k", "cocostuff"):
        assert settings_for("naclip", ds).canvas_fp16
    for model in PROTOCOL_MODELS:
        for ds in KNOWN_DATASETS:
            s = settings_for(model, ds)
            assert s.canvas_fp16 == (ds in ("ade20k", "cocostuff")), (model, ds)
            assert not settings_for(model, ds, protocol="paper").canvas_fp16
            # settings read back equal; settings stored before the field keep their meaning
            assert ProtocolSettings.from_dict(s.to_dict()) == s
            for precision in ("fp32", "fp16"):
                s = settings_for(model, ds, precision=precision)
                legacy = {k: v for k, v in s.to_dict().items() if k != "canvas_fp16"}
                implied = s.softmax_stage == "window" and s.window_fp16
                assert ProtocolSettings.from_dict(legacy).canvas_fp16 == implied
                assert ProtocolSettings.from_dict(s.to_dict()) == s
    # before the field: MaskCLIP's dict on ADE20K is unchanged (its canvas was already fp16), NACLIP's is not
    assert "canvas_fp16" not in settings_for("maskclip", "ade20k").to_dict()
    assert settings_for("naclip", "ade20k").to_dict()["canvas_fp16"] is True


def _case(model, orig, k=5, m=2, d=8, seed=0):
    s = settings_for(model, "ade20k")
    h, w = rescale_size(*orig, s.scale)
    boxes = torch.as_tensor(window_boxes(h, w, s.crop, s.stride), dtype=torch.int32)
    gh, gw = (int(boxes[0, 1] - boxes[0, 0]) + 15) // 16, (int(boxes[0, 3] - boxes[0, 2]) + 15) // 16
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(len(boxes), d, gh, gw, generator=g), dim=1)
    text = F.normalize(torch.randn(m, k, d, generator=g), dim=-1)
    return s, ImageRecord("x", feats, boxes, (h, w), orig), text


def _fp16_canvas_reference(maps, boxes, resized, orig):
    """The authors' compute_metric: fp16 window outputs summed into an fp16 canvas, / count in fp16, read in
    fp32 and resized to the original size by one F.interpolate."""
    h, w = resized
    canvas = torch.zeros(maps.shape[1], h, w, dtype=torch.float16)
    count = torch.zeros(h, w)
    for (y1, y2, x1, x2), m in zip(boxes.tolist(), maps):
        canvas[:, y1:y2, x1:x2] += F.interpolate(m[None], size=(y2 - y1, x2 - x1), mode="bilinear",
                                                 align_corners=False)[0].half()
        count[y1:y2, x1:x2] += 1
    canvas = (canvas / count.half()).float()
    return F.interpolate(canvas[None], size=tuple(orig), mode="bilinear", align_corners=False)[0]


@pytest.mark.parametrize("orig", [(97, 131), (256, 341)])
def test_naclip_ranking_uses_the_fp16_canvas(orig):
    s, rec, text = _case("naclip", orig)
    k = text.shape[1]
    maps = protocol.window_scores(rec, text, s, softmax=False, device="cpu")            # raw cosines
    ref = torch.stack([_fp16_canvas_reference(maps[:, t], rec.boxes, rec.resized_size, orig)
                       for t in range(text.shape[0])])
    out = protocol.classify(rec, text, s, logits=True, canvas_dtype=torch.float16)
    assert torch.equal(out, ref)
    probs = protocol.stable_softmax(s.logit_scale * ref, dim=1)
    want = protocol.new_template_stats(("entropy",), text.shape[0], k, 8, False, "cpu").update(probs)
    st = protocol.new_template_stats(("entropy",), text.shape[0], k, 8, False, "cpu")
    protocol.rank_record(st, rec, text, s, list(range(k)))
    assert torch.equal(st.counts, want.counts)
    assert torch.equal(st._get_state()["sums"], want._get_state()["sums"])


@pytest.mark.parametrize("model,orig", [("naclip", (97, 131)), ("naclip", (300, 400)), ("maskclip", (128, 256)),
                                        ("maskclip", (512, 683)), ("sclip", (336, 500))])
def test_per_template_evaluation_uses_the_fp16_canvas(model, orig):
    s, rec, text = _case(model, orig, seed=3)
    k = text.shape[1]
    final = s.softmax_stage == "final"
    maps = protocol.window_scores(rec, text, s, softmax=not final, device="cpu")
    for t in range(text.shape[0]):
        ref = _fp16_canvas_reference(maps[:, t], rec.boxes, rec.resized_size, orig)
        top2 = ref.topk(2, dim=0).values
        clear = (top2[0] - top2[1]) > 1e-5
        label = torch.where(clear, ref.argmax(0), torch.full_like(clear, 255, dtype=torch.long)).to(torch.uint8)
        loop = per_template_confusion_reference(rec, text[t:t + 1], s, list(range(k)), k, label, "cpu")[0]
        assert int(loop.trace()) == int(loop.sum()) == int(clear.sum())
        fast = per_template_confusion(rec, text[t:t + 1], s, list(range(k)), k, label, "cpu")[0]
        assert torch.equal(fast, loop)
    # and on a random label (all cells, near ties repaired): the shortcut equals the loop
    label = torch.randint(0, k, orig, generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    assert torch.equal(per_template_confusion(rec, text, s, list(range(k)), k, label, "cpu"),
                       per_template_confusion_reference(rec, text, s, list(range(k)), k, label, "cpu"))
