"""Protocol step: cached window features -> probabilities, ranking and evaluation, against naive references.

The references use the models helper's ``merge_windows``/``resize_to`` (``F.interpolate``) and
``floss.core.fusion.fuse`` on whole windows, one template / one window at a time.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from floss import protocol

from floss.protocol import rendering
from floss.data.cache import CacheWriter, FeatureCache, ImageRecord
from floss.core.evaluation import confusion_matrix
from floss.core.fusion import fuse
from floss.models.base import ProtocolSettings, settings_for
from floss.models.preprocess import merge_windows, resize_to, window_boxes
from floss.core.text import averaged_classifier, expand_experts_to_queries, expert_classifiers

D, GRID = 16, 4


def make_settings(stage="window", fp16=False, protocol_name="authors", renorm=False, scale=100.0) -> ProtocolSettings:
    # the toy cosines spread ~10x wider than CLIP's: evaluation uses scale 10 so that softmaxes do not saturate
    # (saturated maps are full of exact ties that 1-ulp interpolation differences would break either way)
    return ProtocolSettings(scale=(96, 48), crop=32, stride=16, softmax_stage=stage, logit_scale=scale,
                            renormalize_experts=renorm, renormalize_fallback=renorm, window_fp16=fp16,
                            protocol=protocol_name)


def make_record(seed: int, resized=(40, 72), orig=(50, 97), num_classes=4, text=None) -> ImageRecord:
    """Window features pulled toward class embeddings so that every class gets predicted somewhere."""
    g = torch.Generator().manual_seed(seed)
    boxes = torch.as_tensor(window_boxes(*resized, 32, 16))
    feats = torch.randn(len(boxes), D, GRID, GRID, generator=g)
    if text is not None:
        cls = torch.randint(0, text.shape[1], (len(boxes), GRID, GRID), generator=g)
        feats = feats + 2 * text.mean(0)[cls].permute(0, 3, 1, 2)
    label = torch.randint(0, num_classes, orig, generator=g).to(torch.uint8)
    label[:3] = 255
    return ImageRecord(f"im{seed}", F.normalize(feats, dim=1), boxes, resized, orig, label)


def reference_classify(rec, W, s):
    """End-to-end reference with F.interpolate (merge_windows) and the order of operations of §2.3."""
    cos = torch.einsum("ndhw,cqd->ncqhw", rec.feats.float(), W)
    nw, c, q = cos.shape[:3]
    if s.softmax_stage == "window":
        cos = torch.softmax(s.logit_scale * cos, dim=2)
    maps = merge_windows(cos.reshape(nw, c * q, GRID, GRID), rec.boxes, rec.resized_size)
    out = resize_to(maps, rec.orig_size).reshape(c, q, *rec.orig_size)
    return torch.softmax(s.logit_scale * out, dim=1) if s.softmax_stage == "final" else out


@pytest.mark.parametrize("stage", ["window", "final"])
@pytest.mark.parametrize("orig", [(50, 97), (23, 31)])     # up- and down-scaling final resize
def test_classify_equals_window_merge_reference(stage, orig, monkeypatch):
    rec = make_record(0, orig=orig)
    W = F.normalize(torch.randn(3, 5, D, generator=torch.Generator().manual_seed(1)), dim=-1)
    s = make_settings(stage)
    ref = reference_classify(rec, W, s)
    out = protocol.classify(rec, W, s)
    assert out.shape == (3, 5, *orig)
    assert (out - ref).abs().max() < 1e-5 and torch.equal(out.argmax(1), ref.argmax(1))
    monkeypatch.setattr(rendering, "MAX_BAND_ELEMENTS", 5000)  # several row bands: same result
    assert (protocol.classify(rec, W, s) - out).abs().max() < 1e-5
    logits = protocol.classify(rec, W, s, logits=True, out="resized")
    cos = torch.einsum("ndhw,cqd->ncqhw", rec.feats, W).reshape(len(rec.boxes), 15, GRID, GRID)
    assert (logits - merge_windows(cos, rec.boxes, rec.resized_size).reshape(3, 5, 40, 72)).abs().max() < 1e-5


def test_window_fp16_casts_each_window_output():
    rec = make_record(3)
    W = F.normalize(torch.randn(1, 4, D, generator=torch.Generator().manual_seed(2)), dim=-1)
    p32 = protocol.classify(rec, W, make_settings(), out="resized")
    p16 = protocol.classify(rec, W, make_settings(fp16=True), out="resized")
    diff = (p16 - p32).abs().max()
    assert 0 < diff < 1e-3
    assert p16.dtype == torch.float32


def test_merge_queries_takes_the_max_over_synonyms():
    scores = torch.rand(2, 5, 3, 4)
    merged = protocol.merge_queries(scores, [0, 1, 1, 2, 1], 3)
    assert torch.equal(merged[:, 1], scores[:, [1, 2, 4]].amax(1)) and torch.equal(merged[:, 2], scores[:, 3])
    assert protocol.merge_queries(scores, range(5), 5) is scores
    with pytest.raises(ValueError, match="expected Q = 4 queries"):
        protocol.merge_queries(scores, [0, 1, 2, 3], 4)


def build_cache(path, stage="window", synonyms=False, protocol_name="authors", n=3, renorm=False, fp16=False):
    K = 4
    q2c = [0, 1, 2, 2, 3] if synonyms else list(range(K))
    Q = len(q2c)
    text = F.normalize(torch.randn(6, Q, D, generator=torch.Generator().manual_seed(5)), dim=-1)
    s = make_settings(stage, fp16=fp16, protocol_name=protocol_name, renorm=renorm, scale=10.0)
    meta = {"model": "test", "dataset": "toy", "split": "val", "class_names": [f"c{k}" for k in range(K)],
            "query_names": [f"q{q}" for q in range(Q)], "query_to_class": q2c, "settings": s.to_dict(),
            "templates": [f"template {t} of a {{}}." for t in range(len(text))]}   # M != 80: the texts are recorded
    with CacheWriter(path, meta, {"toy": 1}, text, images_per_shard=2, dtype=torch.float32) as w:
        for i in range(n):
            w.add(make_record(i, orig=[(50, 97), (23, 31), (40, 72)][i % 3], text=text))
    return FeatureCache(path)


def naive_floss(cache, rec, experts, strategy):
    s, text, q2c, K = cache.settings, cache.text, cache.query_to_class, cache.num_classes
    E = expert_classifiers(text, expand_experts_to_queries(experts, q2c), renormalize=s.renormalize_experts)
    fb = averaged_classifier(text, renormalize=s.renormalize_fallback)[None]
    if s.protocol == "paper":
        fused = fuse(reference_classify(rec, E, s), reference_classify(rec, fb, s)[0], strategy)
    else:
        probs = torch.softmax(s.logit_scale * torch.einsum("ndhw,cqd->ncqhw", rec.feats, torch.cat([E, fb])), dim=2)
        canvas = torch.zeros(len(q2c), *rec.resized_size)
        count = torch.zeros(rec.resized_size)
        for (y1, y2, x1, x2), p in zip(rec.boxes.tolist(), probs):
            up = F.interpolate(p, size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)
            if s.window_fp16:
                up = up.half()
            canvas[:, y1:y2, x1:x2] += fuse(up[:-1], up[-1], strategy).float()
            count[y1:y2, x1:x2] += 1
        fused = resize_to(canvas / count, rec.orig_size)
    return protocol.merge_queries(fused, q2c, K).argmax(0)


ALL_FUSIONS = ["highest", "average", "default", "average_all"]


@pytest.mark.parametrize("stage,synonyms,protocol_name,fp16,fusions", [
    ("window", False, "authors", False, ALL_FUSIONS), ("window", False, "authors", True, ["highest"]),
    ("final", True, "authors", False, ["highest", "average"]), ("window", False, "paper", False, ["highest"]),
    ("final", True, "paper", False, ["highest"])])
def test_evaluate_cache_equals_naive_per_window_loop(tmp_path, monkeypatch, stage, synonyms, protocol_name, fp16,
                                                     fusions):
    cache = build_cache(tmp_path / "c", stage, synonyms, protocol_name, n=2, renorm=protocol_name == "paper",
                        fp16=fp16)
    experts = [[0, 1], [2, 3], [1, 4], [5, 0]]
    monkeypatch.setattr(rendering, "MAX_BAND_ELEMENTS", 20000)   # forces row bands inside windows
    per_template = len(fusions) == 4
    res = protocol.evaluate_cache(cache, experts, fusions=fusions, per_template=per_template, progress=False)
    K, s = cache.num_classes, cache.settings
    want = {f: torch.zeros(K, K, dtype=torch.int64) for f in fusions}
    base = torch.zeros(K, K, dtype=torch.int64)
    for rec in cache:
        gt = rec.label.long()
        for f in fusions:
            want[f] += confusion_matrix(naive_floss(cache, rec, experts, f), gt, K)
        avg = averaged_classifier(cache.text)[None]
        pred = protocol.merge_queries(reference_classify(rec, avg, s)[0], cache.query_to_class, K).argmax(0)
        base += confusion_matrix(pred, gt, K)
    assert torch.equal(res["confusion"]["baseline"], base)
    for f in fusions:
        assert torch.equal(res["confusion"][f"floss_{f}"], want[f]), f
    assert res["methods"]["floss"] == res["methods"]["floss_highest"]
    assert not torch.equal(want["highest"], base)      # FLOSS changes predictions on this toy set
    if not per_template:
        return
    # per-template confusion = argmax of each single-template classifier
    t = 4
    cm = sum(confusion_matrix(protocol.merge_queries(reference_classify(r, cache.text[t:t + 1], s)[0],
                                                     cache.query_to_class, K).argmax(0), r.label.long(), K)
             for r in cache)
    assert torch.equal(res["confusion"]["per_template"][t], cm)
    # results schema: IoU in percent from the confusion matrix
    c = res["confusion"]["baseline"].double()
    iou = 100 * c.diag() / (c.sum(0) + c.sum(1) - c.diag())
    assert res["methods"]["baseline"]["iou"]["c1"] == pytest.approx(float(iou[1]))
    assert res["methods"]["baseline"]["miou"] == pytest.approx(float(iou.nanmean()), abs=1e-4)
    assert set(res["per_template"]) == {str(i) for i in range(6)} and res["experts"] == experts


def test_evaluate_needs_one_expert_list_per_class(tmp_path):
    cache = build_cache(tmp_path / "c", n=1)
    with pytest.raises(ValueError, match="one template-id list per class"):
        protocol.evaluate_cache(cache, [[0]], progress=False)


@pytest.mark.parametrize("stage,synonyms", [("window", False), ("final", True)])
def test_rank_cache_equals_naive_per_template_loop(tmp_path, stage, synonyms):
    from floss.core.stats import TemplateStats
    cache = build_cache(tmp_path / "c", stage, synonyms)
    st = protocol.rank_cache(cache, metrics=("entropy", "avgprob"), template_chunk=4, progress=False)
    M, K = cache.text.shape[0], cache.num_classes
    ref = TemplateStats(M, K, metrics=("entropy", "avgprob"))
    for rec in cache:
        for m in range(M):
            probs = protocol.merge_queries(reference_classify(rec, cache.text[m:m + 1], cache.settings),
                                           cache.query_to_class, K)
            ref.update(probs, templates=[m], normalized=not synonyms)
    assert torch.equal(st.counts, ref.counts) and torch.equal(st.pixels, ref.pixels)
    for metric in ("entropy", "avgprob"):
        a, b = st.values(metric), ref.values(metric)
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.allclose(a.nan_to_num(), b.nan_to_num(), rtol=1e-4, atol=1e-5)


def test_cache_classification_equals_end_to_end_model_path(tmp_path, tiny_maskclip):
    """A tiny MaskCLIP (random weights): extract -> fp32 cache -> classify == features used directly."""
    from floss.core.text import template_embeddings
    settings = settings_for("maskclip", "cityscapes")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(30, 52, 3), dtype=np.uint8)
    f = tiny_maskclip.extract(image, settings)
    text = template_embeddings(tiny_maskclip.encode_text, ["road", "car", "sky"], templates=["a {}.", "the {}."])
    W = averaged_classifier(text)[None]
    cos = torch.einsum("ndhw,qd->nqhw", f.feats, W[0])
    ref = resize_to(merge_windows(torch.softmax(100 * cos, dim=1), f.boxes, f.resized_size), f.orig_size)
    meta = {"model": "maskclip", "dataset": "cityscapes", "split": "val", "class_names": ["road", "car", "sky"],
            "query_names": ["road", "car", "sky"], "query_to_class": [0, 1, 2], "settings": settings.to_dict()}
    with CacheWriter(tmp_path / "c", meta, {"k": 1}, text, dtype=torch.float32) as w:
        w.add(ImageRecord("x", f.feats, torch.as_tensor(f.boxes), f.resized_size, f.orig_size, None))
    rec = FeatureCache(tmp_path / "c")[0]
    out = protocol.classify(rec, W, settings)[0]
    assert out.shape == ref.shape == (3, 30, 52)
    assert (out - ref).abs().max() <= 1e-5 and torch.equal(out.argmax(0), ref.argmax(0))
