"""Tests of floss.core.stats (TemplateStats), floss.core.metrics and floss.core.kernels.interp."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from floss.core.kernels.interp import bilinear_matrix, bilinear_taps, upsample_bilinear
from floss.core.metrics import available_metrics, get_metric, register_metric
from floss.core.stats import TemplateStats


def _probs(m, k, h, w, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(m, k, h, w, generator=g) * scale, dim=1)


def _naive(probs_full):
    """Per-template loop like the authors' notebook: counts and entropy sums at full resolution."""
    m, k = probs_full.shape[:2]
    counts = torch.zeros(m, k, dtype=torch.int64)
    sums = torch.zeros(m, k, dtype=torch.float64)
    for t in range(m):
        q = probs_full[t]
        ent = -(q * torch.log(q + 1e-10)).sum(0)
        pred = q.argmax(0)
        for c in range(k):
            mask = pred == c
            counts[t, c] = int(mask.sum())
            sums[t, c] = float(ent[mask].double().sum())
    return counts, sums


# ------------------------------------------------------------------------------------------ interpolation
@pytest.mark.parametrize("h,w,H,W,exact", [(32, 64, 256, 512, True), (17, 23, 100, 61, True),
                                           (4, 6, 32, 48, False), (7, 5, 23, 31, False), (6, 9, 6, 20, False),
                                           (5, 5, 5, 5, True), (3, 8, 17, 8, False)])
def test_upsample_matches_f_interpolate(h, w, H, W, exact):
    # bit-identical on CPU at protocol-like widths (what makes argmax counts identical to the authors');
    # PyTorch's kernel takes another code path for tiny widths, where results agree to 1 ulp. The reference runs
    # on two threads or more: on one thread (torch 2.14.1, seen under `make test`'s xdist workers) PyTorch's CPU
    # kernel itself rounds some shapes differently by 1 ulp, e.g. [2, 3, 32, 64] -> 256x512.
    x = _probs(2, 3, h, w)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        ref = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
    finally:
        torch.set_num_threads(threads)
    blocks = [upsample_bilinear(x, (H, W), rows=slice(r, min(H, r + 3))) for r in range(0, H, 3)]
    for out in (upsample_bilinear(x, (H, W)), torch.cat(blocks, dim=-2)):
        if exact:
            assert torch.equal(out, ref)
        else:
            torch.testing.assert_close(out, ref, atol=2.5e-7, rtol=0)


@pytest.mark.parametrize("out_size,in_size", [(32, 4), (23, 7), (5, 5), (4, 9)])
def test_bilinear_matrix_matches_f_interpolate_and_formula(out_size, in_size):
    a = bilinear_matrix(out_size, in_size)
    eye = torch.eye(in_size).unsqueeze(0)
    ref = F.interpolate(eye, size=out_size, mode="linear", align_corners=False)[0].t()
    torch.testing.assert_close(a, ref, atol=1e-6, rtol=0)
    assert torch.allclose(a.sum(1), torch.ones(out_size))
    # closed form of align_corners=False: src = (i + 0.5)·in/out − 0.5, clamped at 0 and at the last row
    src = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * in_size / out_size - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    taps = bilinear_taps(out_size, in_size)
    if out_size != in_size:  # the float32 source position i0 + λ1 equals the closed form (to rounding)
        last = taps.i0 == in_size - 1
        pos = taps.i0.double() + torch.where(last, torch.zeros_like(taps.w1), taps.w1).double()
        torch.testing.assert_close(pos, src.clamp(max=in_size - 1), atol=1e-5, rtol=0)


def test_upsample_rejects_bad_size():
    with pytest.raises(ValueError, match="size"):
        upsample_bilinear(torch.rand(1, 2, 3, 3), (0, 4))


# ------------------------------------------------------------------------------------------------ values
def test_two_pixel_hand_example():
    # two pixels, K=2, one template: pixel 0 -> class 0 (0.9), pixel 1 -> class 1 (0.7)
    q = torch.tensor([[0.9, 0.3], [0.1, 0.7]]).view(1, 2, 1, 2)
    st_ = TemplateStats(1, 2).update(q)
    h0 = -(0.9 * math.log(0.9 + 1e-10) + 0.1 * math.log(0.1 + 1e-10))
    h1 = -(0.3 * math.log(0.3 + 1e-10) + 0.7 * math.log(0.7 + 1e-10))
    torch.testing.assert_close(st_.values("entropy"), torch.tensor([[h0, h1]], dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(st_.values("avgprob"), torch.tensor([[0.9, 0.7]], dtype=torch.float64), rtol=1e-6, atol=0)
    assert st_.counts.tolist() == [[1, 1]] and st_.pixels.tolist() == [2]
    # MaNo: K=2 -> criterion = logsumexp(q) - mean(q) < 5 -> Taylor branch; v = 1+q+q²/2, minus min, L1
    v = torch.tensor([1 + 0.9 + 0.405, 1 + 0.1 + 0.005])
    v = (v - v.min()) / (v - v.min()).sum()  # = [1, 0]
    expected = ((v ** 4).sum() / 2) ** 0.25
    torch.testing.assert_close(st_.values("mano")[0, 0], expected.double(), rtol=1e-6, atol=0)


def test_ties_go_to_first_class_and_update_equals_naive_loop():
    q = torch.full((2, 3, 2, 2), 1 / 3)  # all ties -> class 0
    st_ = TemplateStats(2, 3, metrics=("entropy",)).update(q)
    assert st_.counts[:, 0].tolist() == [4, 4] and st_.counts[:, 1:].sum() == 0
    probs = _probs(3, 4, 5, 6, seed=1)
    full = F.interpolate(probs, size=(13, 11), mode="bilinear", align_corners=False)
    counts, sums = _naive(full)
    st_ = TemplateStats(3, 4, metrics=("entropy",)).update(probs, (13, 11))
    assert torch.equal(st_.counts, counts)
    torch.testing.assert_close(st_._state["sums"][0], sums, rtol=1e-6, atol=1e-9)


def test_update_with_size_equals_update_on_upsampled_probs():
    probs = _probs(4, 5, 6, 7, seed=2)
    full = F.interpolate(probs, size=(20, 70), mode="bilinear", align_corners=False)
    a = TemplateStats(4, 5).update(probs, (20, 70))
    b = TemplateStats(4, 5).update(full)
    assert torch.equal(a.counts, b.counts) and torch.equal(a.pixels, b.pixels)
    for metric in a.metrics:
        torch.testing.assert_close(a.values(metric), b.values(metric), rtol=1e-6, atol=0, equal_nan=True)


def test_never_predicting_template_is_nan_in_values_and_zero_in_rankings():
    probs = _probs(3, 3, 4, 4, seed=3)
    probs[1] = torch.tensor([0.8, 0.15, 0.05]).view(3, 1, 1)  # template 1 predicts only class 0
    st_ = TemplateStats(3, 3, metrics=("entropy", "avgprob")).update(probs)
    assert torch.isnan(st_.values("entropy")[1, 1:]).all()
    rk = st_.rankings(["a", "b", "c"], model="m", dataset="d")
    assert set(rk) == {"model", "dataset", "split", "classes"} and rk["split"] == "train"
    entries = rk["classes"]["b"]["entropy_ranking"]
    first = entries[0]  # entropy 0.0 sorts first, as the authors
    assert first["template_id"] == 1 and first["entropy"] == 0.0 and first["pixel_percentage"] == 0.0
    desc = rk_avg = st_.rankings(["a", "b", "c"], metric="avgprob")["classes"]["b"]["avgprob_ranking"]
    assert desc[-1]["template_id"] == 1 and desc[-1]["avgprob"] == 0.0
    vals = [e["avgprob"] for e in rk_avg]
    assert vals == sorted(vals, reverse=True)


def test_rankings_schema_with_80_templates():
    probs = _probs(80, 4, 3, 5, seed=4, scale=1.0)
    st_ = TemplateStats(80, 4, metrics=("entropy",)).update(probs)
    rk = st_.rankings(["road", "sky", "car", "tree"], model="maskclip", dataset="cityscapes")
    assert list(rk["classes"]) == ["road", "sky", "car", "tree"]
    for name, cls in rk["classes"].items():
        entries = cls["entropy_ranking"]
        assert sorted(e["template_id"] for e in entries) == list(range(80))
        assert [e["rank"] for e in entries] == list(range(1, 81))
        ent = [e["entropy"] for e in entries]
        assert ent == sorted(ent)
        assert set(entries[0]) == {"template_id", "entropy", "pixel_percentage", "rank"}
    total = sum(rk["classes"][c]["entropy_ranking"][0]["pixel_percentage"] for c in rk["classes"])
    assert total >= 0
    pp = torch.zeros(80)
    for cls in rk["classes"].values():
        for e in cls["entropy_ranking"]:
            pp[e["template_id"]] += e["pixel_percentage"]
    torch.testing.assert_close(pp, torch.full((80,), 100.0))
    with pytest.raises(ValueError, match="class_names"):
        st_.rankings(["road"])


# ------------------------------------------------------------------------------------ merge / chunk / subset
@settings(max_examples=15, deadline=None)
@given(n_images=st.integers(1, 4), split=st.integers(0, 4), seed=st.integers(0, 1000))
def test_merged_shards_equal_one_pass(n_images, split, seed):
    images = [_probs(3, 4, 3, 4, seed=seed + i) for i in range(n_images)]
    split = min(split, n_images)
    one = TemplateStats(3, 4)
    for p in images:
        one.update(p, (7, 9))
    a, b = TemplateStats(3, 4), TemplateStats(3, 4)
    for p in images[:split]:
        a.update(p, (7, 9))
    for p in images[split:]:
        b.update(p, (7, 9))
    merged = a.merge(b)
    assert torch.equal(merged.counts, one.counts) and torch.equal(merged.pixels, one.pixels)
    assert merged.num_images == n_images
    for metric in one.metrics:
        torch.testing.assert_close(merged.values(metric), one.values(metric), rtol=1e-12, atol=0, equal_nan=True)


@settings(max_examples=15, deadline=None)
@given(cut=st.integers(1, 4), seed=st.integers(0, 1000))
def test_template_chunks_equal_unchunked(cut, seed):
    probs = _probs(5, 3, 4, 4, seed=seed)
    full = TemplateStats(5, 3, track_images=True).update(probs, (9, 8), image_id=0)
    order = torch.randperm(5, generator=torch.Generator().manual_seed(seed)).tolist()
    parts = TemplateStats(5, 3, track_images=True)
    parts.update(probs[order[:cut]], (9, 8), templates=order[:cut], image_id=0)
    parts.update(probs[order[cut:]], (9, 8), templates=order[cut:], image_id=0)
    assert torch.equal(parts.counts, full.counts) and torch.equal(parts.pixels, full.pixels)
    assert parts.num_images == 1
    for metric in full.metrics:
        torch.testing.assert_close(parts.values(metric), full.values(metric), rtol=1e-12, atol=0, equal_nan=True)
    torch.testing.assert_close(parts.subset([0]).values("entropy"), full.values("entropy"), equal_nan=True)


def test_merge_rejects_incompatible():
    with pytest.raises(ValueError, match="num_classes"):
        TemplateStats(2, 3).merge(TemplateStats(2, 4))
    with pytest.raises(ValueError, match="metrics"):
        TemplateStats(2, 3).merge(TemplateStats(2, 3, metrics=("entropy",)))
    a = TemplateStats(2, 3, track_images=True).update(_probs(2, 3, 2, 2), image_id="x")
    b = TemplateStats(2, 3, track_images=True).update(_probs(2, 3, 2, 2, seed=5), image_id="x")
    with pytest.raises(ValueError, match="twice"):
        a.merge(b)


def test_subset_equals_fresh_pass_and_save_load_round_trip(tmp_path):
    images = {f"img{i}": (_probs(3, 4, 3, 5, seed=10 + i), torch.randn(6, 3, 5)) for i in range(5)}
    kw = dict(metrics=("entropy", "avgprob", "mano", "iti"), feature_dim=6)
    tracked = TemplateStats(3, 4, track_images=True, **kw)
    for name, (p, f) in images.items():
        tracked.update(p, (8, 10), features=f, image_id=name)
    chosen = ["img3", "img0", "img4"]
    fresh = TemplateStats(3, 4, **kw)
    for name in chosen:
        p, f = images[name]
        fresh.update(p, (8, 10), features=f)
    sub = tracked.subset(chosen)
    assert torch.equal(sub.counts, fresh.counts) and sub.num_images == 3
    for metric in fresh.metrics:
        torch.testing.assert_close(sub.values(metric), fresh.values(metric), rtol=1e-9, atol=1e-12, equal_nan=True)
    with pytest.raises(ValueError, match="image_ids"):
        tracked.subset(["nope"])
    path = tmp_path / "stats.safetensors"
    tracked.save(path)
    loaded = TemplateStats.load(path)
    assert loaded.image_ids == tracked.image_ids and loaded.metrics == tracked.metrics
    for metric in tracked.metrics:
        assert torch.equal(loaded.values(metric).nan_to_num(-1), tracked.values(metric).nan_to_num(-1))
    torch.testing.assert_close(loaded.subset(chosen).values("iti"), sub.values("iti"), equal_nan=True)
    assert not list(tmp_path.glob(".tmp-*"))


def test_iti_tiny_hand_example():
    # 1 template, K=2, D=1; image A: left pixel class 0 (feature 0), right class 1 (feature 4)
    # image B: left class 0 (feature 2), right class 1 (feature 4)
    q = torch.tensor([[0.9, 0.2], [0.1, 0.8]]).view(1, 2, 1, 2)
    st_ = TemplateStats(1, 2, metrics=("iti",), feature_dim=1)
    st_.update(q, features=torch.tensor([[[0.0, 4.0]]]))
    st_.update(q, features=torch.tensor([[[2.0, 4.0]]]))
    # class 0: centroid 1, intra = mean(1, 1) = 1, inter = (1 - 4)² = 9 -> 9; class 1: intra 0 -> inf
    iti = st_.values("iti")
    torch.testing.assert_close(iti[0, 0], torch.tensor(9.0, dtype=torch.float64))
    assert math.isinf(float(iti[0, 1]))


# ------------------------------------------------------------------------------------------------ registry
def test_registry_custom_metric_and_unknown_name():
    assert {"entropy", "avgprob", "mano", "iti"} <= set(available_metrics())
    if "second_prob" not in available_metrics():
        register_metric("second_prob", lambda q: q.topk(2, dim=1).values[:, 1], higher_is_better=False,
                        finalize=lambda mean: 2 * mean)
    spec = get_metric("second_prob")
    assert spec.higher_is_better is False
    q = torch.tensor([[0.6, 0.1], [0.3, 0.2], [0.1, 0.7]]).view(1, 3, 1, 2)
    st_ = TemplateStats(1, 3, metrics=("second_prob", "entropy")).update(q)
    torch.testing.assert_close(st_.values("second_prob"),
                               torch.tensor([[2 * 0.3, float("nan"), 2 * 0.2]], dtype=torch.float64),
                               rtol=1e-6, atol=0, equal_nan=True)
    assert "second_prob_ranking" in st_.rankings(["a", "b", "c"], metric="second_prob")["classes"]["a"]
    with pytest.raises(ValueError, match="known metrics"):
        get_metric("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_metric("entropy", lambda q: q.sum(1), higher_is_better=False)


# ------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("call,match", [
    (lambda s: s.update(torch.rand(2, 3, 4)), "probs"),
    (lambda s: s.update(torch.full((2, 4, 2, 2), 0.25)), "probs"),  # wrong class count
    (lambda s: s.update(torch.full((2, 3, 2, 2), float("nan"))), "probs"),
    (lambda s: s.update(torch.full((2, 3, 2, 2), 0.5)), "probs"),  # rows sum to 1.5
    (lambda s: s.update(torch.tensor([-0.1, 0.6, 0.5]).view(1, 3, 1, 1).expand(2, 3, 1, 1)), "probs"),
    (lambda s: s.update(torch.full((2, 3, 2, 2), 1 / 3), templates=[0, 2]), "templates"),
    (lambda s: s.update(torch.full((2, 3, 2, 2), 1 / 3), templates=[0, 0]), "templates"),
    (lambda s: s.update(torch.full((2, 3, 2, 2), 1 / 3), templates=[0]), "templates"),
    (lambda s: s.update(torch.full((1, 3, 2, 2), 1 / 3)), "templates"),
    (lambda s: s.update(torch.full((2, 3, 2, 2), 1 / 3), size=(4,)), "size"),
    (lambda s: s.update(torch.full((2, 3, 2, 2), 1 / 3), size=(4, -1)), "size"),
    (lambda s: s.update(torch.full((2, 3, 2, 2), 1 / 3), features=torch.rand(2, 2, 2)), "features"),
    (lambda s: s.update(torch.full((2, 3, 2, 2), 1 / 3), image_id="a"), "image_id"),
    (lambda s: s.values("nope"), "metric"),
    (lambda s: s.values("mano"), "metric"),
    (lambda s: s.merge("x"), "other"),
])
def test_bad_inputs_raise_with_argument_name(call, match):
    s = TemplateStats(2, 3, metrics=("entropy", "avgprob"))
    with pytest.raises((ValueError, TypeError), match=match):
        call(s)


def test_bad_constructor_and_feature_arguments():
    with pytest.raises(ValueError, match="num_templates"):
        TemplateStats(0, 3)
    with pytest.raises(ValueError, match="feature_dim"):
        TemplateStats(2, 3, metrics=("iti",))
    with pytest.raises(ValueError, match="known metrics"):
        TemplateStats(2, 3, metrics=("entropy", "bogus"))
    s = TemplateStats(2, 3, metrics=("iti",), feature_dim=4)
    with pytest.raises(ValueError, match="features"):
        s.update(torch.full((2, 3, 2, 2), 1 / 3))
    with pytest.raises(ValueError, match="features"):
        s.update(torch.full((2, 3, 2, 2), 1 / 3), features=torch.rand(5, 2, 2))
    t = TemplateStats(2, 3, track_images=True)
    with pytest.raises(ValueError, match="image_id"):
        t.update(torch.full((2, 3, 2, 2), 1 / 3))
    t.update(torch.full((2, 3, 2, 2), 1 / 3), image_id=7)
    with pytest.raises(ValueError, match="image_id"):
        t.update(torch.full((2, 3, 2, 2), 1 / 3), image_id=7)


def test_unnormalized_scores_need_explicit_flag():
    scores = torch.tensor([0.7, 0.6, 0.1]).view(1, 3, 1, 1).expand(2, 3, 2, 2).contiguous()
    s = TemplateStats(2, 3, metrics=("entropy",))
    with pytest.raises(ValueError, match="normalized=False"):
        s.update(scores)
    s.update(scores, normalized=False)
    assert s.counts[:, 0].tolist() == [4, 4]
