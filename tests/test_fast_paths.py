"""The fast paths equal the straightforward computations: fused TemplateStats kernels (floss.core.kernels.fused), the
per-template confusion shortcut (floss.protocol.kernels.argmax), the renderer's matrix path and the worker threads.

Counts and confusion matrices are compared exactly; float sums to a tight relative tolerance.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from floss import protocol

from floss.protocol import rendering
from floss.protocol.kernels.argmax import per_template_confusion, per_template_confusion_reference
from floss.core.kernels.fused import entropy_scores, first_argmax, mano_branch, mano_scores
from floss.core.kernels.interp import RowUpsampler, upsample_rows
from floss.util.threads import map_single_threaded
from floss.data.cache import FeatureCache, ImageRecord
from floss.core.metrics import entropy_score, mano_score
from floss.models.base import ProtocolSettings
from floss.models.preprocess import window_boxes
from floss.core.stats import TemplateStats


def _probs(*shape, seed=0, scale=3.0, dim=1):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=g) * scale, dim=dim)


# ------------------------------------------------------------------------------------------ fused kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 2, 5, 19, 150, 171])
def test_first_argmax_equals_argmax_with_ties_zeros_and_near_ties(dtype, k):
    q = _probs(12, k, 40, seed=k).to(dtype)
    q[0] = q[0].round(decimals=1)                    # exact ties
    q[1] = 0.0                                       # all zero
    q[2] = -0.0                                      # ±0 compare equal
    q[3, 0] = -0.0
    q[4] = 1.0 / k                                   # uniform
    if k > 2:
        q[5, 2] = q[5, 1]
        q[6, 1] = torch.nextafter(q[6, 0], torch.tensor(2.0, dtype=dtype))   # one ulp apart
        q[7, k - 1] = q[7].amax(0)                   # tie with the last class
    assert torch.equal(first_argmax(q, q.amax(1)), q.argmax(1))


def test_entropy_scores_are_the_registry_values():
    # the same operations; only log's vectorised and scalar paths (which elements end in a SIMD tail depends
    # on the parallel split) may differ by an ulp
    q = _probs(6, 19, 300)
    q[0, :, :5] = 0.0
    q[0, 3, :5] = 1.0
    torch.testing.assert_close(entropy_scores(q, torch.empty(q.numel())), entropy_score(q), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("k,normalized,scale", [(2, True, 3.0), (19, True, 3.0), (54, True, 30.0), (147, True, 30.0),
                                                (148, True, 30.0), (149, True, 1.0), (171, True, 30.0),
                                                (20, False, 3.0), (60, False, 3.0), (160, False, 3.0)])
def test_mano_scores_equal_the_registry_values(k, normalized, scale):
    q = _probs(4, k, 200, seed=k, scale=scale)
    if not normalized:   # NACLIP-style synonym maxima: scores in [0, 1] not summing to one
        q = q * torch.rand(1, k, 1, generator=torch.Generator().manual_seed(1))
    q[0, :, :3] = 1.0 / k                            # constant vector (degenerate Taylor branch)
    q[0, :, 3] = 1.0 / k + 1e-9 * torch.arange(k)    # near-uniform (tiny norm)
    branch = mano_branch(k, normalized, float(q.amax()))
    got = mano_scores(q, q.amax(1), branch, torch.empty(q.numel()))
    torch.testing.assert_close(got, mano_score(q), rtol=2e-6, atol=1e-12)


def test_mano_branch_bounds_hold_on_probability_vectors():
    # the analytic bounds of the softrun criterion c = logsumexp(q) − mean(q) on the simplex
    for k in (2, 19, 54, 55, 147, 148, 149, 171):
        q = torch.cat([_probs(k, 2000, seed=k, scale=s, dim=0) for s in (0.1, 3.0, 100.0)], dim=1)
        q = torch.cat([q, torch.eye(k)], dim=1)       # the vertices, where c is largest
        c = torch.logsumexp(q, dim=0) - q.mean(dim=0)
        assert float(c.min()) >= math.log(k) - 1e-5
        assert float(c.max()) <= math.log(k - 1 + math.e) - 1 / k + 1e-5
        branch = mano_branch(k, True)
        if branch == "taylor":
            assert bool((c <= 5).all())
        elif branch == "softmax":
            assert bool((c > 5).all())
    assert [mano_branch(k, True) for k in (147, 148, 149)] == ["taylor", "mixed", "softmax"]
    assert mano_branch(54, False, 1.0) == "taylor" and mano_branch(60, False, 1.0) == "mixed"


def _naive_stats(probs: torch.Tensor, size, metrics, features=None):
    """Upsample every template with F.interpolate, registry metric functions, per-class masks, and (ITI) the
    features upsampled per pixel: the old per-pixel algorithm."""
    from floss.core.metrics import get_metric
    m, k = probs.shape[:2]
    full = F.interpolate(probs.float(), size=size, mode="bilinear", align_corners=False)
    counts = torch.zeros(m, k, dtype=torch.int64)
    sums = torch.zeros(len(metrics), m, k, dtype=torch.float64)
    fsum = None
    if features is not None:
        f = F.interpolate(features[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        f = f.reshape(f.shape[0], -1).t().double()
        fsum = torch.zeros(m, k, f.shape[1], dtype=torch.float64)
    for t in range(m):
        q = full[t].reshape(k, -1)[None]
        pred = q[0].argmax(0)
        counts[t] = torch.bincount(pred, minlength=k)
        for j, name in enumerate(metrics):
            score = q[0].amax(0) if name == "avgprob" else get_metric(name).pixel_score(q)[0]
            sums[j, t] = torch.zeros(k, dtype=torch.float64).index_add_(0, pred, score.double())
        if fsum is not None:
            fsum[t] = torch.zeros(k, f.shape[1], dtype=torch.float64).index_add_(0, pred, f)
    return counts, sums, fsum


@pytest.mark.parametrize("m,k,low,size,seed", [(80, 19, (8, 16), (64, 128), 0), (5, 150, (6, 7), (20, 30), 1),
                                               (3, 2, (4, 4), (4, 4), 2), (7, 5, (5, 9), (33, 17), 3)])
def test_template_stats_default_metrics_equal_the_per_pixel_algorithm(m, k, low, size, seed):
    probs = _probs(m, k, *low, seed=seed)
    probs[0, :, 0, 0] = 1.0 / k                      # a tie
    metrics = ("entropy", "avgprob", "mano")
    st = TemplateStats(m, k, metrics=metrics).update(probs, size)
    counts, sums, _ = _naive_stats(probs, size, metrics)
    assert torch.equal(st.counts, counts)
    torch.testing.assert_close(st._state["sums"], sums, rtol=1e-6, atol=1e-9)


def test_template_stats_iti_soft_counts_equal_upsampled_features():
    probs = _probs(4, 6, 5, 7, seed=4)
    feats = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(5))
    size = (23, 29)
    st = TemplateStats(4, 6, metrics=("entropy", "iti"), feature_dim=3)
    counts, _, fsum = st._accumulate(probs, size, feats)
    ref_counts, _, ref_fsum = _naive_stats(probs, size, ("entropy",), feats)
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(fsum, ref_fsum, rtol=1e-6, atol=1e-6)


def test_template_stats_fp16_and_float64_inputs():
    probs = _probs(3, 7, 6, 8, seed=6)
    for dtype in (torch.float16, torch.float64):
        p = probs.to(dtype)
        st = TemplateStats(3, 7).update(p, (24, 32))
        counts, sums, _ = _naive_stats(p.to(torch.float64 if dtype == torch.float64 else torch.float32), (24, 32),
                                       ("entropy", "avgprob", "mano"))
        assert torch.equal(st.counts, counts)
        torch.testing.assert_close(st._state["sums"], sums, rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------------------------------- resizing
@pytest.mark.parametrize("h,w,H,W", [(32, 64, 256, 512), (28, 28, 448, 448), (17, 23, 100, 61), (40, 50, 40, 90)])
def test_row_upsampler_cached_and_streamed_equal_f_interpolate(h, w, H, W):
    x = _probs(2, 3, h, w).reshape(6, h, w)
    ref = F.interpolate(x[None], size=(H, W), mode="bilinear", align_corners=False)[0]
    cached = RowUpsampler(x, (H, W), cache_elements=1 << 30)
    for r0 in range(0, H, 13):
        rows = slice(r0, min(H, r0 + 13))
        want = ref[:, rows].transpose(0, 1)
        assert torch.equal(cached.rows(rows), want)
        out = torch.empty_like(want)
        assert torch.equal(upsample_rows(x, (H, W), rows, out=out), want) and torch.equal(out, want)


@pytest.mark.parametrize("n,g,size", [(1200, 28, 448), (152, 14, 224), (300, 28, 200)])
def test_band_rows_of_a_large_window_equal_f_interpolate(n, g, size):
    # the renderer's path for windows over the band budget: only the band's rows, the bits of F.interpolate of the
    # whole window (what a window under the budget gets), whatever the CPU's GEMM kernels
    m = _probs(n, g, g, dim=0, seed=n)
    whole = F.interpolate(m[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    for a, b in [(0, size), (size // 3, size // 3 + 11), (size - 3, size)]:
        assert torch.equal(upsample_rows(m, (size, size), slice(a, b)).transpose(0, 1), whole[:, a:b])


# ------------------------------------------------------------------------------ per-template confusion
D = 16


def _settings(stage="window", fp16=False, crop=96, stride=48, scale=10.0):
    return ProtocolSettings(scale=(384, 192), crop=crop, stride=stride, softmax_stage=stage, logit_scale=scale,
                            renormalize_experts=False, renormalize_fallback=False, window_fp16=fp16,
                            protocol="authors")


def _record(seed, text, resized=(96, 192), orig=(120, 250), crop=96, stride=48, grid=6, coherent=0.0,
            num_classes=4):
    """Window features pulled toward class embeddings (``coherent``: one class per window, large uniform cells).
    Windows of 96 px and more: below that, PyTorch's bilinear kernel takes another code path (tiny widths)
    and the shortcut defers to the reference loop."""
    g = torch.Generator().manual_seed(seed)
    boxes = torch.as_tensor(window_boxes(*resized, crop, stride))
    feats = torch.randn(len(boxes), D, grid, grid, generator=g)
    cls = torch.randint(0, text.shape[1], (len(boxes), grid, grid), generator=g)
    if coherent:
        cls = torch.arange(len(boxes)).view(-1, 1, 1).expand_as(cls) % text.shape[1]
    feats = feats * (1 - coherent) + (2 + 6 * coherent) * text.mean(0)[cls].permute(0, 3, 1, 2)
    label = torch.randint(0, num_classes, orig, generator=g).to(torch.uint8)
    label[:2] = 255
    return ImageRecord(f"im{seed}", F.normalize(feats, dim=1), boxes, resized, orig, label)


def _text(m, q, seed=0):
    return F.normalize(torch.randn(m, q, D, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _refuse_reference(monkeypatch):
    import floss.protocol.kernels.argmax as argmax

    def refuse(*args, **kwargs):
        raise AssertionError("per_template_confusion fell back to the reference loop")
    monkeypatch.setattr(argmax, "per_template_confusion_reference", refuse)


@pytest.fixture
def fast_only(monkeypatch):
    """Fail if per_template_confusion falls back to the reference loop (the shortcut must be what is tested)."""
    _refuse_reference(monkeypatch)


def _both(rec, text, s, q2c, k):
    fast = per_template_confusion(rec, text, s, q2c, k, rec.label, "cpu")
    ref = per_template_confusion_reference(rec, text, s, q2c, k, rec.label, "cpu")
    return fast, ref


@pytest.mark.parametrize("stage", ["window", "final"])
@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.parametrize("synonyms", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_template_confusion_equals_rendering_every_template(stage, fp16, synonyms, seed, fast_only):
    q2c = [0, 1, 2, 2, 3, 1] if synonyms else [0, 1, 2, 3]
    text = _text(11, len(q2c), seed)
    orig = [(120, 250), (70, 150), (300, 500)][seed]           # up- and down-sampling final resize
    rec = _record(seed, text, orig=orig)
    fast, ref = _both(rec, text, _settings(stage, fp16), q2c, 4)
    assert torch.equal(fast, ref)
    assert int(fast.sum()) == 11 * int((rec.label != 255).sum())


@pytest.mark.parametrize("crop,stride,resized,grid,fast", [
    (None, None, (96, 192), 6, True),     # a single (whole-image) window
    (96, 48, (192, 384), 6, True),        # many windows (3 × 7)
    (96, 96, (96, 288), 6, True),         # windows that only touch
    (96, 48, (96, 192), 120, False),      # windows smaller than the patch grid (downsampling)
    (32, 16, (40, 72), 4, False),         # tiny windows: reference loop
])
def test_per_template_confusion_window_layouts(crop, stride, resized, grid, fast, monkeypatch):
    if fast:
        _refuse_reference(monkeypatch)
    text = _text(6, 4, 3)
    rec = _record(4, text, resized=resized, orig=(240, 500), crop=crop or resized[1], stride=stride or 1, grid=grid)
    if crop is None:
        rec = ImageRecord(rec.id, rec.feats[:1], torch.tensor([[0, resized[0], 0, resized[1]]], dtype=torch.int32),
                          resized, rec.orig_size, rec.label)
    fast_out, ref = _both(rec, text, _settings(crop=crop, stride=stride), list(range(4)), 4)
    assert torch.equal(fast_out, ref)


def test_per_template_confusion_uniform_cells_and_saturated_ties(fast_only):
    # coherent maps (most cells uniform) and saturated softmax maps (exact ties where symmetric windows meet)
    text = _text(9, 4, 5)
    for coherent, scale in [(0.9, 10.0), (0.0, 1000.0), (0.9, 1000.0)]:
        for fp16 in (False, True):
            for stage in ("window", "final"):
                rec = _record(6, text, resized=(96, 240), orig=(192, 480), coherent=coherent)
                fast, ref = _both(rec, text, _settings(stage, fp16=fp16, scale=scale), list(range(4)), 4)
                assert torch.equal(fast, ref), (coherent, scale, fp16, stage)


def test_per_template_confusion_large_k_and_matrix_path(monkeypatch, fast_only):
    # a small band budget: the renderer takes its matrix path for the windows and bands for the final resize
    monkeypatch.setattr(rendering, "MAX_BAND_ELEMENTS", 200000)
    k = 30
    text = _text(10, k, 7)
    rec = _record(8, text, num_classes=k)
    for fp16 in (False, True):
        fast, ref = _both(rec, text, _settings(fp16=fp16), list(range(k)), k)
        assert torch.equal(fast, ref)


def test_per_template_confusion_non_grid_layout_uses_the_reference():
    text = _text(4, 3, 9)
    rec = _record(9, text, num_classes=3)
    boxes = torch.tensor([[0, 64, 0, 96], [32, 96, 0, 96], [0, 96, 96, 192]], dtype=torch.int32)   # not a grid
    feats = F.normalize(torch.randn(3, D, 6, 6, generator=torch.Generator().manual_seed(1)), dim=1)
    rec = ImageRecord(rec.id, feats, boxes, rec.resized_size, rec.orig_size, rec.label)
    fast, ref = _both(rec, text, _settings(), list(range(3)), 3)
    assert torch.equal(fast, ref)


def test_per_template_confusion_rejects_bad_labels():
    text = _text(2, 3, 10)
    rec = _record(10, text, num_classes=3)
    rec.label[5, 5] = 7
    with pytest.raises(ValueError, match="gt"):
        per_template_confusion(rec, text, _settings(), list(range(3)), 3, rec.label, "cpu")


@pytest.mark.parametrize("model,dataset", [("maskclip", "cityscapes"), ("naclip", "pascalvoc20"),
                                           ("clipdinoiser", "ade20k")])
def test_evaluate_per_template_on_synthetic_caches_equals_rendering(tmp_path, model, dataset):
    # the repo's synthetic caches are tiny (geometry / 7): these go through the reference loop; the point is
    # that evaluate_cache's per-template confusions are unchanged
    from floss.data.synthetic import write_synthetic_cache
    cache = FeatureCache(write_synthetic_cache(tmp_path / "c", model, dataset, "val", num_images=2))
    res = protocol.evaluate_cache(cache, per_template=True, progress=False)
    text, k = cache.text, cache.num_classes
    want = sum(per_template_confusion_reference(r, text, cache.settings, cache.query_to_class, k, r.label, "cpu")
               for r in cache)
    assert torch.equal(res["confusion"]["per_template"], want)


def test_evaluate_per_template_at_protocol_size_equals_rendering(tmp_path, fast_only):
    # a Cityscapes-like geometry (448 windows, 28x28 grids) with synonyms, through evaluate_cache
    from floss.data.cache import CacheWriter
    from floss.models.base import settings_for
    s = settings_for("maskclip", "cityscapes")
    q2c = [0, 1, 1, 2, 3]
    text = _text(3, len(q2c), 11)
    g = torch.Generator().manual_seed(12)
    boxes = torch.as_tensor(window_boxes(448, 896, 448, 224))
    feats = F.normalize(torch.randn(3, D, 28, 28, generator=g) + 3 * text.mean(0)[
        torch.randint(0, len(q2c), (3, 28, 28), generator=g)].permute(0, 3, 1, 2), dim=1)
    label = torch.randint(0, 4, (300, 600), generator=g).to(torch.uint8)
    rec = ImageRecord("big", feats, boxes, (448, 896), (300, 600), label)
    meta = {"model": "t", "dataset": "toy", "split": "val", "class_names": list("abcd"),
            "query_names": list("vwxyz"), "query_to_class": q2c, "settings": s.to_dict(),
            "templates": [f"template {t} of a {{}}." for t in range(len(text))]}   # M != 80: the texts are recorded
    with CacheWriter(tmp_path / "c", meta, {"k": 1}, text, dtype=torch.float32) as w:
        w.add(rec)
    cache = FeatureCache(tmp_path / "c")
    res = protocol.evaluate_cache(cache, per_template=True, progress=False)
    want = per_template_confusion_reference(cache[0], cache.text, s, q2c, 4, cache[0].label, "cpu")
    assert torch.equal(res["confusion"]["per_template"], want)


# ---------------------------------------------------------------------------------------------- threads
def test_map_single_threaded_keeps_order_and_thread_setting():
    before = torch.get_num_threads()
    out = map_single_threaded(lambda x: (x, torch.get_num_threads()), range(7), workers=3)
    assert [x for x, _ in out] == list(range(7)) and all(n == 1 for _, n in out)
    assert torch.get_num_threads() == before
    assert map_single_threaded(lambda x: x * 2, [1, 2], workers=1) == [2, 4]


# ----------------------------------------------------------------------------------------------- fusion
@pytest.mark.parametrize("k,normalized", [(4, True), (19, True), (30, False)])
def test_fuse_many_equals_one_fuse_per_strategy(k, normalized):
    from floss.core.fusion import STRATEGIES, fuse, fuse_many
    experts = _probs(k, k, 7, 9, seed=k, scale=4.0)
    experts[:, :, 0, 0] = 1.0 / k                         # ties everywhere at one pixel
    fallback = _probs(k, 7, 9, seed=k + 1, dim=0)
    if not normalized:
        experts, fallback = experts * 0.7, fallback * 0.7
    for strategies in (list(STRATEGIES), ["average_all"], ["default", "highest"]):
        many = fuse_many(experts, fallback, strategies, chunk_pixels=20, normalized=normalized)
        for s, got in zip(strategies, many):
            assert torch.equal(got, fuse(experts, fallback, s, chunk_pixels=20, normalized=normalized)), s
