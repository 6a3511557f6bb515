"""Fusion against a plain per-pixel reading of Eq. 7 / Table 4 (the pixel loop lives only in this test)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from floss.core.fusion import SOURCE_AVERAGED, SOURCE_FALLBACK, STRATEGIES, fuse, fuse_rows, upsampling_expert_fn


def reference_pixel(vectors, fallback, strategy):
    """Per-pixel fusion as the protocol §4 describes it, with Python lists only."""
    K = len(fallback)
    if strategy == "average_all":
        return [sum(v[j] for v in vectors) / len(vectors) for j in range(K)], SOURCE_AVERAGED
    argmax = [max(range(K), key=lambda j: (v[j], -j)) for v in vectors]  # first index on ties
    agreeing = [k for k in range(K) if argmax[k] == k]
    if not agreeing:
        return list(fallback), SOURCE_FALLBACK
    if len(agreeing) == 1:
        return list(vectors[agreeing[0]]), agreeing[0]
    if strategy == "default":
        return list(fallback), SOURCE_FALLBACK
    if strategy == "average":
        return [sum(vectors[k][j] for k in agreeing) / len(agreeing) for j in range(K)], SOURCE_AVERAGED
    best = agreeing[0]  # scan in increasing order, update on strictly greater (the authors' loop)
    for k in agreeing[1:]:
        if vectors[k][k] > vectors[best][best]:
            best = k
    return list(vectors[best]), best


@st.composite
def fusion_inputs(draw):
    K = draw(st.integers(1, 4))
    H, W = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    # small integer counts normalised to sum 1: exact ties inside vectors and across experts are frequent
    counts = draw(st.lists(st.integers(0, 3), min_size=(K + 1) * K * H * W, max_size=(K + 1) * K * H * W))
    c = torch.tensor(counts, dtype=torch.float64).reshape(K + 1, K, H, W)
    c[:, 0] += (c.sum(dim=1) == 0).double()  # no all-zero vectors
    probs = c / c.sum(dim=1, keepdim=True)
    return probs[:K], probs[K]


@settings(max_examples=150, deadline=None)
@given(fusion_inputs(), st.sampled_from(STRATEGIES))
def test_fuse_equals_per_pixel_reading(inputs, strategy):
    experts, fallback = inputs
    K, _, H, W = experts.shape
    fused, source = fuse(experts, fallback, strategy, return_source=True)
    for y in range(H):
        for x in range(W):
            vectors = [experts[k, :, y, x].tolist() for k in range(K)]
            ref, src = reference_pixel(vectors, fallback[:, y, x].tolist(), strategy)
            torch.testing.assert_close(fused[:, y, x], torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)
            assert int(source[y, x]) == src


@settings(max_examples=40, deadline=None)
@given(fusion_inputs(), st.sampled_from(STRATEGIES), st.integers(1, 5), st.integers(1, 3))
def test_chunked_and_banded_equal_unchunked(inputs, strategy, chunk, band):
    experts, fallback = inputs
    full, src = fuse(experts, fallback, strategy, return_source=True)
    chunked, src_c = fuse(experts, fallback, strategy, chunk_pixels=chunk, return_source=True)
    banded, src_b = fuse_rows(lambda rows: experts[:, :, rows], fallback, strategy, rows_per_band=band,
                              return_source=True)
    assert torch.equal(full, chunked) and torch.equal(full, banded)
    assert torch.equal(src, src_c) and torch.equal(src, src_b)


def test_highest_conflict_and_tie_rules():
    # 3 classes, 1 pixel: experts 0 and 2 agree; expert 2 is more confident about its class
    e = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.2, 0.2], [0.1, 0.1, 0.8]]).reshape(3, 3, 1, 1)
    fb = torch.tensor([0.2, 0.7, 0.1]).reshape(3, 1, 1)
    out, src = fuse(e, fb, "highest", return_source=True)
    assert int(src) == 2 and torch.equal(out[:, 0, 0], e[2, :, 0, 0])
    assert torch.equal(fuse(e, fb, "default")[:, 0, 0], fb[:, 0, 0])
    torch.testing.assert_close(fuse(e, fb, "average")[:, 0, 0], (e[0, :, 0, 0] + e[2, :, 0, 0]) / 2)
    # equal self-confidence: the smaller class index wins
    e2 = torch.tensor([[0.5, 0.25, 0.25], [0.6, 0.2, 0.2], [0.25, 0.25, 0.5]]).reshape(3, 3, 1, 1)
    assert int(fuse(e2, fb, "highest", return_source=True)[1]) == 0
    # expert 1 with a tie between classes 0 and 1 predicts 0 (first index) -> does not agree
    e3 = torch.tensor([[0.2, 0.6, 0.2], [0.4, 0.4, 0.2], [0.5, 0.3, 0.2]]).reshape(3, 3, 1, 1)
    out3, src3 = fuse(e3, fb, "highest", return_source=True)
    assert int(src3) == SOURCE_FALLBACK and torch.equal(out3, fb)


def test_upsampling_bands_match_interpolate():
    x = torch.rand(3, 4, 7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for size in [(28, 20), (7, 5), (4, 3), (13, 9)]:
        ref = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        fn = upsampling_expert_fn(x, size)
        torch.testing.assert_close(fn(slice(0, size[0])), ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(fn(slice(1, 3)), ref[:, :, 1:3], rtol=0, atol=1e-12)
    lowres = torch.rand(3, 3, 4, 4, dtype=torch.float64).softmax(dim=1)
    fb = torch.rand(3, 10, 12, dtype=torch.float64).softmax(dim=0)
    up = F.interpolate(lowres, size=(10, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(fuse_rows(upsampling_expert_fn(lowres, (10, 12)), fb, rows_per_band=3), fuse(up, fb))
    with pytest.raises(ValueError, match="size"):
        upsampling_expert_fn(lowres, (10,))


def _good():
    e = torch.rand(3, 3, 2, 2).softmax(dim=1)
    return e, torch.rand(3, 2, 2).softmax(dim=0)


@pytest.mark.parametrize("make, match", [
    (lambda e, f: fuse(e[0], f), "expert_probs: expected a 4-d"),
    (lambda e, f: fuse(e[:2], f), "one expert per class"),
    (lambda e, f: fuse(e, f[:2]), "fallback_probs: expected shape"),
    (lambda e, f: fuse(e, f.double()), "fallback_probs: expected dtype"),
    (lambda e, f: fuse(e * float("nan"), f), "expert_probs: expected finite"),
    (lambda e, f: fuse(e - 1, f), "expert_probs: expected non-negative"),
    (lambda e, f: fuse(e * 2, f), "expert_probs: expected probabilities summing to 1"),
    (lambda e, f: fuse(e, f * 2), "fallback_probs: expected probabilities summing to 1"),
    (lambda e, f: fuse(e, f, "max"), "strategy"),
    (lambda e, f: fuse(e, f, chunk_pixels=0), "chunk_pixels"),
    (lambda e, f: fuse(e.long(), f), "expert_probs: expected a floating"),
    (lambda e, f: fuse_rows(lambda r: e[:, :, r, :1], f), r"expert_fn\(0:2\)"),
    (lambda e, f: fuse_rows(e, f), "expert_fn"),
    (lambda e, f: fuse_rows(lambda r: e[:, :, r], f, rows_per_band=0), "rows_per_band"),
])
def test_bad_inputs_name_the_argument(make, match):
    e, f = _good()
    with pytest.raises((ValueError, TypeError), match=match):
        make(e, f)


def test_unnormalized_scores_and_average_all_with_other_expert_count():
    e, f = _good()
    out = fuse(e * 0.5, f * 0.5, normalized=False)  # NACLIP synonym maxima do not sum to 1
    assert out.shape == f.shape
    four = torch.rand(4, 3, 2, 2).softmax(dim=1)
    torch.testing.assert_close(fuse(four, f, "average_all"), four.mean(dim=0))
