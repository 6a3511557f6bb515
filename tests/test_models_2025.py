"""ResCLIP, SC-CLIP and GEM-as-quoted on tiny random open_clip ViTs: every formula written out again here
(straightforward loops, per head), on the native 4x4 grid and on interpolated ones, plus the checks of
OVSS-models-2025 §6 that random weights allow, the per-dataset settings and the registry.

A 12-block tiny ViT is used so that the models' default block indices (ResCLIP blocks 6-9, SC-CLIP 9 / 4 / 4..10)
are the real ones. Each formula test also checks that a deliberately wrong variant is far from the output.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ASSETS, TINY_QUICKGELU, _tiny_model
from test_models_more import _far, _ln, _windows, embedded, features, gem_reference, intermediates, out_proj, \
    qkv, scale_rule, size_rule
from floss.core.classes import query_names
from floss.models import available_models, authors_precision, create_model, settings_for
from floss.models.base import DRIVING_DATASETS
from floss.models.naclip import gaussian_addition
from floss.models.resclip import AUTHOR_CONFIGS, DATASET_PARAMS, ResCLIP, resclip_attention
from floss.models.scclip import SCCLIP, lof_anomalies, norm_anomalies
from floss.models.sfr import pamr, patch_labels, sfr_matrix

TINY_12 = str(ASSETS / "tiny-vit-quickgelu-12.json")
NATIVE = (4, 4)
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon"]


@pytest.fixture(scope="module")
def tiny_resclip():
    m = _tiny_model("resclip", TINY_12)
    m.configure("pascalco59", queries=WORDS)
    return m


@pytest.fixture(scope="module")
def tiny_scclip():
    return _tiny_model("scclip", TINY_12)


def _grid(size):
    return (size[0] // 16, size[1] // 16)


def _pos(sd, grid):
    return sd["positional_embedding"] if grid == NATIVE else scale_rule(sd, grid)


def sm(a):
    return torch.softmax(a, dim=-1)


# ============================================================================================== ResCLIP
def rcs_reference(m, x, pos, blocks=(6, 7, 8, 9)):
    """X_{L-1} of the unmodified model and mean_j softmax(s q_j k_j^T) per head, written out per block/head."""
    sd = m.visual.state_dict()
    L = len(m.visual.transformer.resblocks)
    xs = [embedded(sd, x, pos)] + intermediates(m, x, pos, list(range(L - 1)))     # X_0 .. X_{L-1}
    heads = m.visual.transformer.resblocks[0].attn.num_heads
    maps = []
    for j in blocks:                            # 1-based block j reads X_{j-1}
        b = f"transformer.resblocks.{j - 1}"
        Q, K, _ = qkv(sd, b, _ln(xs[j - 1], sd, f"{b}.ln_1"))
        dh = Q.shape[-1] // heads
        maps.append(torch.stack([sm(Q[..., h * dh:(h + 1) * dh] @ K[..., h * dh:(h + 1) * dh].transpose(1, 2)
                                    / math.sqrt(dh)) for h in range(heads)], dim=1))
    return xs[-1], sum(maps) / len(maps)


def last_block_reference(m, X, omega, a_rcs, rcs, S=None, sfr=(1.0, 0.0)):
    """ResCLIP's final (S given) or pass-1 (S None) attention on NACLIP, per head, then ln_post·proj, CLS kept."""
    sd = m.visual.state_dict()
    L = len(m.visual.transformer.resblocks) - 1
    b = f"transformer.resblocks.{L}"
    heads = m.visual.transformer.resblocks[-1].attn.num_heads
    Q, K, V = qkv(sd, b, _ln(X, sd, f"{b}.ln_1"))
    dh = Q.shape[-1] // heads
    outs = []
    for h in range(heads):
        k, v = K[..., h * dh:(h + 1) * dh], V[..., h * dh:(h + 1) * dh]
        logits = k @ k.transpose(1, 2) / math.sqrt(dh)
        if S is not None:
            S = S[:, 0] if S.dim() == 4 else S                                 # [B, 1, N, N]: shared by heads
            sbar = (S / S.amax(dim=(-2, -1), keepdim=True)).half()
            logits = sfr[0] * ((1 - sfr[1]) * logits + (sfr[1] * sbar).float())
        A = sm(logits + omega)
        if a_rcs is not None:
            A = rcs[0] * ((1 - rcs[1]) * A + rcs[1] * a_rcs[:, h])
        outs.append(A @ v)
    O = out_proj(sd, b, torch.cat(outs, dim=-1))
    return _ln(O, sd, "ln_post") @ sd["proj"]


def pamr_reference(img, mask, iters=10, dilations=(8, 16)):
    """PAMR written with 3x3 difference / copy kernels and dilated convolutions (the paper's formulation)."""
    def local(x, kernel):
        B, K, H, W = x.shape
        x = x.reshape(B * K, 1, H, W)
        outs = [F.conv2d(F.pad(x, [d] * 4, mode="replicate"), kernel, dilation=d) for d in dilations]
        return torch.cat(outs, 1).reshape(B, K, -1, H, W)
    cells = [(r, c) for r in range(3) for c in range(3)]
    diff, copy, win = torch.zeros(8, 1, 3, 3), torch.zeros(8, 1, 3, 3), torch.zeros(9, 1, 3, 3)
    for i, (r, c) in enumerate([rc for rc in cells if rc != (1, 1)]):
        diff[i, 0, 1, 1], diff[i, 0, r, c], copy[i, 0, r, c] = 1, -1, 1
    for i, (r, c) in enumerate(cells):
        win[i, 0, r, c] = 1
    std = local(img, win).std(2, keepdim=True)
    aff = (-local(img, diff).abs() / (1e-8 + 0.1 * std)).mean(1, keepdim=True).softmax(2)
    for _ in range(iters):
        mask = (local(mask, copy) * aff).sum(2)
    return mask


def labels_reference(probs, patch, thd):
    pred = probs.argmax(0)
    pred[probs.max(0).values < thd] = 0
    gh, gw = probs.shape[1] // patch, probs.shape[2] // patch
    out = torch.zeros((gh, gw), dtype=torch.long)
    for r in range(gh):
        for c in range(gw):
            counts = Counter(pred[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch].flatten().tolist())
            best = max(counts.values())
            out[r, c] = min(k for k, n in counts.items() if n == best)      # torch.mode: smallest on ties (CPU)
    return out


def sfr_reference(labels, sigma=5.0, full_segment=False, decay=True):
    """The §1.3 recipe with plain Python loops (float32 linspace, half-to-even rounding, 1-D raster Gaussian)."""
    gh, gw = labels.shape
    n = gh * gw
    lab = labels.flatten().tolist()
    pos = [(i // gw, i % gw) for i in range(n)]
    dmax = max(max(abs(a[0] - b[0]), abs(a[1] - b[1])) for a in pos for b in pos)
    t = torch.linspace(0, 1, dmax + 1).tolist()                                    # float32 values
    E = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        for j in range(n):
            if lab[i] != lab[j]:
                continue
            d = max(abs(pos[i][0] - pos[j][0]), abs(pos[i][1] - pos[j][1]))
            ok = True
            for m_ in range(d + 1):
                tm = np.float32(t[m_]) if not full_segment else np.float32(m_ / max(d, 1) if d else 0)
                p = [int(np.round(np.float32(pos[i][a]) * (np.float32(1) - tm) + np.float32(pos[j][a]) * tm))
                     for a in (0, 1)]
                ok &= lab[p[0] * gw + p[1]] == lab[i]
            E[i, j] = 1.0 if (ok or not decay) else np.float32(math.exp(-d / dmax))
    size = min(n, int(6 * sigma + 1))
    size += 1 - size % 2
    g = np.exp(-((np.arange(size) - size // 2) ** 2) / (2 * sigma ** 2))
    g /= g.sum()
    blurred = np.zeros((n, n), dtype=np.float64)           # zero padding, along the flattened key index
    for i in range(n):
        for j in range(n):
            blurred[i, j] = sum(E[i, j + k - size // 2] * g[k] for k in range(size) if 0 <= j + k - size // 2 < n)
    out = np.zeros((n + 1, n + 1), dtype=np.float64)
    out[1:, 1:] = blurred / (blurred.sum(1, keepdims=True) + 1e-8)
    return torch.tensor(out, dtype=torch.float32)


HAND_MAP = torch.tensor([[1, 1, 1, 2, 1, 1, 3, 3],
                         [1, 0, 0, 2, 1, 1, 3, 3],
                         [1, 0, 0, 2, 2, 2, 3, 3],
                         [1, 1, 1, 1, 1, 2, 3, 3],
                         [4, 4, 1, 5, 1, 2, 2, 2],
                         [4, 4, 1, 1, 1, 1, 1, 1],
                         [4, 4, 4, 4, 0, 0, 1, 1],
                         [4, 4, 4, 4, 0, 0, 1, 1]])


def test_sfr_matrix_on_a_hand_made_map_equals_the_recipe():
    got = sfr_matrix(HAND_MAP, 5.0)
    ref = sfr_reference(HAND_MAP)
    assert got.shape == (65, 65) and got.dtype == torch.float32
    assert float((got - ref).abs().max()) <= 1e-6
    assert got[0].abs().sum() == 0 and got[:, 0].abs().sum() == 0             # zero CLS row / column
    assert torch.allclose(got[1:].sum(1), torch.ones(64), atol=1e-5)
    assert _far(got, sfr_reference(HAND_MAP, full_segment=True))             # the whole segment is not checked
    assert torch.equal(sfr_matrix(HAND_MAP, decay=False), sfr_matrix(HAND_MAP, decay=False))
    assert float((sfr_matrix(HAND_MAP, decay=False) - sfr_reference(HAND_MAP, decay=False)).abs().max()) <= 1e-6
    # an isolated patch (label 5 at (4, 3)): mass 0.078 to its left neighbour, 0.0016 to the patch above
    assert abs(float(got[1 + 4 * 8 + 3, 1 + 4 * 8 + 2]) - 0.078) < 1e-3
    lonely = sfr_matrix(torch.arange(14 * 14).reshape(14, 14), 5.0)       # B/16 window: 14 x 14, all distinct
    assert abs(float(lonely[1 + 5 * 14 + 6, 1 + 5 * 14 + 5]) - 0.078) < 1e-3   # left neighbour
    assert abs(float(lonely[1 + 5 * 14 + 6, 1 + 4 * 14 + 6]) - 0.0016) < 1e-4  # the patch above
    assert abs(float(lonely[1 + 5 * 14 + 13, 1 + 6 * 14]) - 0.078) < 1e-3      # (5, 13) passes to (6, 0): wraps


def test_pamr_and_patch_labels():
    g = torch.Generator().manual_seed(0)
    img, mask = torch.randn(1, 3, 40, 56, generator=g), torch.randn(1, 5, 40, 56, generator=g)
    assert float((pamr(img, mask) - pamr_reference(img, mask)).abs().max()) <= 1e-5
    assert _far(pamr(img, mask), pamr_reference(img, mask, dilations=(1, 2)))
    probs = torch.softmax(3 * torch.randn(5, 48, 64, generator=g), dim=0)
    for thd in (0.0, 0.5, 0.7):
        assert torch.equal(patch_labels(probs, 16, thd), labels_reference(probs, 16, thd))
    tie = torch.zeros(3, 16, 16)
    tie[2, :8], tie[1, 8:] = 1, 1                                            # half 2, half 1: mode -> 1
    assert patch_labels(tie, 16, 0.0).tolist() == [[1]]
    assert patch_labels(tie, 16, 1.5).tolist() == [[0]]                      # below temp_thd -> query 0


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (96, 96)])
def test_resclip_trunk_rcs_and_last_block(tiny_resclip, size):
    m, grid = tiny_resclip, _grid(size)
    x = _windows((2, 3) + size, seed=7)
    pos = _pos(m.visual.state_dict(), grid)
    X, a_rcs = m.trunk(x, grid)
    X_ref, a_ref = rcs_reference(m, x, pos)
    assert float((X - X_ref).abs().max()) <= 1e-5                            # X_{L-1} = vanilla open_clip
    assert a_rcs.shape == (2, 2, 1 + grid[0] * grid[1], 1 + grid[0] * grid[1])   # per head, CLS included
    assert float((a_rcs - a_ref).abs().max()) <= 1e-6
    assert _far(a_rcs, a_ref.mean(1, keepdim=True).expand_as(a_ref))        # not head-averaged
    assert _far(a_rcs, rcs_reference(m, x, pos, (5, 6, 7, 8))[1])            # blocks 6-9, 1-based
    omega = gaussian_addition(*grid, 5.0)
    S = torch.rand((2, 1) + a_rcs.shape[-2:], generator=torch.Generator().manual_seed(1))
    blk = m.visual.transformer.resblocks[-1]
    for sfr_mat in (None, S):
        out = m.visual.ln_post(resclip_attention(blk, X, "naclip", omega, a_rcs, (2.0, 0.4), sfr_mat, (1.8, 0.7)))
        out = out @ m.visual.proj
        ref = last_block_reference(m, X, omega, a_ref, (2.0, 0.4), S if sfr_mat is not None else None, (1.8, 0.7))
        assert float((out - ref).abs().max()) <= 1e-5
    # wrong orders: Omega scaled with tau_sfr, RCS mixed before the softmax, no fp16 rounding of lam * Sbar
    assert _far(out, last_block_reference(m, X, 1.8 * omega, a_ref, (2.0, 0.4), S, (1.8, 0.7)))
    assert _far(out, last_block_reference(m, X, omega, None, (2.0, 0.4), S, (1.8, 0.7)))
    assert _far(out, last_block_reference(m, X, omega, a_ref, (2.0, 0.4), None))


def resclip_reference(m, x, pos, thd, rcs, sfr, text):
    """Two passes end to end: pass 1, cosines, bilinear, PAMR, softmax(40 ·), labels, Shat, pass 2; CLS dropped."""
    grid = _grid(x.shape[-2:])
    X, a_rcs = rcs_reference(m, x, pos)
    omega = gaussian_addition(*grid, 5.0)
    f1 = features(m.visual.state_dict(), _ln_post_inverse_free(m, X, omega, a_rcs, rcs), grid)
    mats = []
    for b in range(x.shape[0]):
        cos = torch.einsum("ehw,qe->qhw", f1[b], text)[None]
        cos = F.interpolate(cos, size=x.shape[-2:], mode="bilinear", align_corners=False)
        probs = torch.softmax(40 * pamr_reference(x[b:b + 1], cos)[0], dim=0)
        mats.append(sfr_reference(labels_reference(probs, 16, thd)))
    S = torch.stack(mats)[:, None]
    Fz = last_block_reference(m, X, omega, a_rcs, rcs, S, sfr)[:, 1:]
    Fz = Fz / Fz.norm(dim=-1, keepdim=True)
    return Fz.reshape(x.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2), S


def _ln_post_inverse_free(m, X, omega, a_rcs, rcs):
    """Pass-1 block output before ln_post (``features`` applies ln_post and proj)."""
    sd = m.visual.state_dict()
    L = len(m.visual.transformer.resblocks) - 1
    b = f"transformer.resblocks.{L}"
    heads = m.visual.transformer.resblocks[-1].attn.num_heads
    Q, K, V = qkv(sd, b, _ln(X, sd, f"{b}.ln_1"))
    dh = Q.shape[-1] // heads
    outs = []
    for h in range(heads):
        k, v = K[..., h * dh:(h + 1) * dh], V[..., h * dh:(h + 1) * dh]
        A = rcs[0] * ((1 - rcs[1]) * sm(k @ k.transpose(1, 2) / math.sqrt(dh) + omega) + rcs[1] * a_rcs[:, h])
        outs.append(A @ v)
    return out_proj(sd, b, torch.cat(outs, dim=-1))


def _spread_text(m, x):
    """Pass-1 'text' rows that split a random ViT's (nearly collinear) patch features into several labels: the
    centred features of five patches of the first window."""
    grid = _grid(x.shape[-2:])
    X, a_rcs = m.trunk(x[:1], grid)
    f = m.patch_features(resclip_attention(m.visual.transformer.resblocks[-1], X, "naclip", m.omega(grid), a_rcs,
                                           m.rcs), grid)[0].flatten(1).T
    n = f.shape[0]
    t = f[[0, n // 4, n // 2, 3 * n // 4, n - 1]] - f.mean(0)
    return t / t.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("size", [(64, 64), (96, 96), (64, 96)])
def test_resclip_end_to_end(tiny_resclip, size):
    m, grid = tiny_resclip, _grid(size)
    x = _windows((2, 3) + size, seed=8)
    thd, rcs, sfr = DATASET_PARAMS["pascalco59"]
    assert (m.temp_thd, m.rcs, m.sfr) == (thd, rcs, sfr) and m.vocabulary == WORDS
    m._text = _spread_text(m, x)
    out = m.window_features(x)
    ref, S = resclip_reference(m, x, _pos(m.visual.state_dict(), grid), thd, rcs, sfr, m._text)
    assert out.shape == (2, 32) + grid
    assert float((out - ref).abs().max()) <= 1e-5
    assert float(S.max()) < 1.0 and len(torch.unique(S[0, 0, 1:, 1:] > 0)) == 2   # SFR is not trivial
    # pass 2 differs from pass 1 (use_sfr=False) and from a run without RCS
    for kw in ({"use_sfr": False}, {"use_rcs": False}):
        other = create_model("resclip", backbone=TINY_12, pretrained="none", **kw)
        other.clip.load_state_dict(m.clip.state_dict())
        other.configure("pascalco59", queries=WORDS)
        other._text = m._text
        assert _far(out, other.window_features(x))


@pytest.mark.parametrize("base", ["sclip", "clearclip"])
def test_resclip_other_bases(tiny_resclip, base):
    m = tiny_resclip
    x = _windows((1, 3, 64, 64), seed=9)
    X, a_rcs = m.trunk(x, NATIVE)
    S = torch.rand((1, 1, 17, 17), generator=torch.Generator().manual_seed(2))
    blk, sd = m.visual.transformer.resblocks[-1], m.visual.state_dict()
    out = resclip_attention(blk, X, base, None, a_rcs, (2.0, 0.3), S, (2.1, 0.7))
    b = "transformer.resblocks.11"
    Q, K, V = qkv(sd, b, _ln(X, sd, f"{b}.ln_1"))
    sbar = (0.7 * (S[0, 0] / S.max()).half()).float()
    outs = []
    for h in range(2):
        q, k, v = (M[..., h * 32:(h + 1) * 32] for M in (Q, K, V))
        mix = lambda a: 2.1 * (0.3 * a / math.sqrt(32) + sbar)                 # noqa: E731
        A = sm(mix(q @ q.transpose(1, 2))) + (sm(mix(k @ k.transpose(1, 2))) if base == "sclip" else 0)
        outs.append((2.0 * (0.7 * A + 0.3 * a_rcs[:, h])) @ v)
    ref = out_proj(sd, b, torch.cat(outs, -1))
    if base == "sclip":                                                    # residual + FFN kept
        from test_models_more import ffn
        ref = X + ref
        ref = ref + ffn(sd, b, ref)
    assert float((out - ref).abs().max()) <= 1e-5


def test_resclip_settings_configuration_and_errors(tiny_quickgelu_config, tmp_path):
    for ds in ("pascalco59", "ade20k", "cocostuff"):
        s = settings_for("resclip", ds)
        assert (s.scale, s.crop, s.stride, s.logit_scale, s.softmax_stage) == ((2048, 336), 224, 112, 40.0, "final")
    voc = settings_for("resclip", "pascalvoc20")
    assert (voc.scale, voc.crop, voc.stride) == ((2048, 336), None, None)        # whole image
    for ds in DRIVING_DATASETS:
        assert (settings_for("resclip", ds).scale, settings_for("resclip", ds).crop) == ((2048, 560), 224)
        assert DATASET_PARAMS[ds] == AUTHOR_CONFIGS["city_scapes"] == (0.10, (2.0, 0.2), (2.1, 0.6))
    assert DATASET_PARAMS["pascalvoc20"] == (0.10, (2.0, 0.6), (2.1, 0.6))
    assert DATASET_PARAMS["ade20k"] == (0.25, (2.0, 0.3), (2.1, 0.7))
    assert DATASET_PARAMS["cocostuff"] == (0.11, (2.0, 0.4), (1.8, 0.7))
    assert len(query_names("pascalvoc20", "resclip")[0]) == 30                  # NACLIP's class files
    m = create_model("resclip", backbone=TINY_12, pretrained="none")
    with pytest.raises(RuntimeError, match="configure"):
        m.window_features(_windows((1, 3, 64, 64)))
    m.set_vocabulary(WORDS)
    assert m.protocol_settings("bdd") == settings_for("resclip", "bdd")          # configures the model
    assert (m.dataset, m.temp_thd, m.vocabulary) == ("bdd", 0.10, WORDS)         # set vocabulary kept
    with pytest.raises(ValueError, match="rcs_blocks"):
        create_model("resclip", backbone=tiny_quickgelu_config, pretrained="none")     # 3 blocks: no 6-9
    assert create_model("resclip", backbone=tiny_quickgelu_config, pretrained="none", rcs_blocks=(1, 2)).rcs_blocks
    with pytest.raises(ValueError, match="base"):
        create_model("resclip", backbone=TINY_12, pretrained="none", base="maskclip")


# ============================================================================================== SC-CLIP
def lof_reference(tokens, k=30, contamination=0.05):
    t = tokens.double()
    n = t.shape[0]
    d = [[float(((t[i] - t[j]) ** 2).sum()) for j in range(n)] for i in range(n)]
    nbrs = [sorted(range(n), key=lambda j: d[i][j])[1:k + 1] for i in range(n)]
    kappa = [d[i][nbrs[i][-1]] for i in range(n)]
    scores = torch.tensor([sum(kappa[i] / kappa[j] for j in nbrs[i]) / k for i in range(n)])
    return sorted(torch.nonzero(scores > torch.quantile(scores, 1 - contamination))[:, 0].tolist())


def fill_reference(P, O, grid):
    gh, gw = grid
    out = P.clone()
    for i in O:
        r, c = divmod(i, gw)
        nb = [(r + a) * gw + c + b for a in (-1, 0, 1) for b in (-1, 0, 1) if (a, b) != (0, 0)
              and 0 <= r + a < gh and 0 <= c + b < gw and (r + a) * gw + c + b not in O]
        if nb:
            out[i] = P[nb].mean(0)
    return out


def scclip_reference(m, x, pos, O_of, multi_sum=True, cls_term=True, fill_post=False):
    sd = m.visual.state_dict()
    grid = _grid(x.shape[-2:])
    xs = intermediates(m, x, pos, list(range(11)))                            # X_1 .. X_11
    b = "transformer.resblocks.11"

    def n(t):
        return t / t.norm(dim=-1, keepdim=True)

    def agg(t, S):
        S = torch.where(S < 0.4, torch.zeros_like(S), S)
        return (S / (S.sum(-1, keepdim=True) + 1e-6)) @ t

    def attn(Y, s_mid):
        _, K, V = qkv(sd, b, _ln(Y, sd, f"{b}.ln_1"))
        M = 3 * (s_mid - s_mid.mean())
        M[M < 0] = float("-inf")
        outs = [(0.5 * (sm(M) + sm(K[:, h * 32:(h + 1) * 32] @ K[:, h * 32:(h + 1) * 32].T / math.sqrt(32))))
                @ V[:, h * 32:(h + 1) * 32] for h in range(2)]
        return out_proj(sd, b, torch.cat(outs, -1))

    feats = []
    for i in range(x.shape[0]):
        last = xs[10][i]
        O = O_of(last[1:])
        P = fill_reference(last[1:], O, grid)
        s_mid = n(fill_reference(xs[8][i, 1:], O, grid)) @ n(fill_reference(xs[8][i, 1:], O, grid)).T
        post = fill_reference(xs[3][i, 1:], O, grid) if fill_post else xs[3][i, 1:]
        s_post = n(post) @ n(post).T
        R = sum(xs[j][i] for j in range(3, 10)) / (1 if multi_sum else 7)
        g = 0.3 if cls_term else 0.0
        z = agg(attn(agg(P, s_mid), s_mid) + g * last[:1], s_post) + agg(attn(R[1:], s_mid) + g * R[:1], s_post)
        f = _ln(z, sd, "ln_post") @ sd["proj"]
        feats.append(n(f).reshape(grid[0], grid[1], -1).permute(2, 0, 1))
    return torch.stack(feats)


def test_scclip_detectors():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(196, 64, generator=g)
    tokens[[5, 77, 150]] += 4 * torch.randn(3, 64, generator=g)
    got = lof_anomalies(tokens).tolist()
    assert len(got) == 10 and sorted(got) == lof_reference(tokens)           # 10 of 196 at 224 px (B/16)
    assert {5, 77, 150} <= set(got)
    assert sorted(norm_anomalies(tokens).tolist()) == sorted(torch.topk(tokens.norm(dim=-1), 10).indices.tolist())
    # at most k patches (the original raises): every other patch is a neighbour (k = N - 1)
    assert sorted(lof_anomalies(tokens[:30]).tolist()) == lof_reference(tokens[:30], k=29)


@pytest.mark.parametrize("size", [(96, 96), (112, 112)])
def test_scclip_formula(tiny_scclip, size):
    m, grid = tiny_scclip, _grid(size)
    x = _windows((2, 3) + size, seed=10)
    pos = scale_rule(m.visual.state_dict(), grid)
    out = m.window_features(x)
    O_of = lambda t: lof_reference(t)                                           # noqa: E731
    ref = scclip_reference(m, x, pos, O_of)
    assert out.shape == (2, 32) + grid                                           # N tokens, none dropped
    assert float((out - ref).abs().max()) <= 1e-5
    assert _far(out, scclip_reference(m, x, pos, O_of, multi_sum=False))       # mean instead of sum
    assert _far(out, scclip_reference(m, x, pos, O_of, cls_term=False))        # no + gamma CLS
    assert _far(out, scclip_reference(m, x, pos, O_of, fill_post=True))        # fill in S_post
    assert _far(out, scclip_reference(m, x, size_rule(m.visual.state_dict(), grid), O_of))
    norm = create_model("scclip", backbone=TINY_12, pretrained="none", detector="norm")
    norm.clip.load_state_dict(m.clip.state_dict())
    top10 = lambda t: torch.topk(t.norm(dim=-1), 10).indices.tolist()           # noqa: E731
    assert float((norm.window_features(x) - scclip_reference(m, x, pos, top10)).abs().max()) <= 1e-5


def test_scclip_native_grid_and_errors(tiny_scclip):
    m = create_model("scclip", backbone=TINY_12, pretrained="none", lof_k=5)
    m.clip.load_state_dict(tiny_scclip.clip.state_dict())
    x = _windows((1, 3, 64, 64), seed=11)
    ref = scclip_reference(m, x, m.visual.state_dict()["positional_embedding"], lambda t: lof_reference(t, k=5))
    assert float((m.window_features(x) - ref).abs().max()) <= 1e-5
    # beyond the original's domain (it raises there): a non-square grid fills from its true h x w neighbours ...
    x2 = _windows((1, 3, 96, 112), seed=12)
    ref2 = scclip_reference(m, x2, scale_rule(m.visual.state_dict(), _grid(x2.shape[-2:])),
                            lambda t: lof_reference(t, k=5))
    assert float((m.window_features(x2) - ref2).abs().max()) <= 1e-5
    # ... and a window of at most k patches takes every other patch as a LOF neighbour (k = N - 1)
    tokens = torch.randn(28, 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(lof_anomalies(tokens, k=30), lof_anomalies(tokens, k=27))
    assert sorted(lof_anomalies(tokens, k=30).tolist()) == lof_reference(tokens, k=27)
    small = tiny_scclip.window_features(_windows((1, 3, 32, 224)))          # a 2 x 14 grid, 28 patches
    assert small.shape[-2:] == (2, 14) and torch.isfinite(small).all()
    with pytest.raises(ValueError, match="blocks"):
        create_model("scclip", backbone=TINY_QUICKGELU, pretrained="none")
    with pytest.raises(ValueError, match="detector"):
        create_model("scclip", backbone=TINY_12, pretrained="none", detector="sklearn")
    assert (tiny_scclip.pre, tiny_scclip.post, tiny_scclip.multi, tiny_scclip.res_cls) == (9, 4, (4, 10), 0.3)


def test_scclip_settings():
    for ds in ("pascalvoc20", "pascalco59", "ade20k", "cocostuff"):
        s = settings_for("scclip", ds)
        assert (s.scale, s.crop, s.stride, s.logit_scale, s.softmax_stage) == ((2048, 336), 224, 112, 40.0, "final")
    for ds in DRIVING_DATASETS:
        assert (settings_for("scclip", ds).scale, settings_for("scclip", ds).crop) == ((2048, 560), 224)
    assert query_names("pascalvoc20", "scclip") == query_names("pascalvoc20", "naclip")


# =========================================================================================== GEM quoted
@pytest.mark.parametrize("size", [(64, 64), (48, 80), (96, 96)])
def test_gem_quoted_is_the_last_block_self_self_output(size):
    deep = str(ASSETS / "tiny-vit-quickgelu-deep.json")
    m = _tiny_model("gem_quoted", deep)
    grid = _grid(size)
    x = _windows((2, 3) + size, seed=12)
    sd = m.visual.state_dict()
    pos = sd["positional_embedding"] if grid == NATIVE else size_rule(sd, grid, antialias=True)
    out = m.window_features(x)
    assert float((out - gem_reference(m, x, pos, accumulate=False)).abs().max()) <= 1e-5
    assert _far(out, gem_reference(m, x, pos))                                  # the original GEM accumulates
    gem = create_model("gem", backbone=deep, pretrained="none")
    gem.clip.load_state_dict(m.clip.state_dict())
    assert float((gem.window_features(x) - gem_reference(m, x, pos)).abs().max()) <= 1e-5    # gem unchanged
    assert m.protocol_settings("ade20k") == settings_for("gem_quoted", "ade20k") == settings_for("gem", "ade20k")
    assert m.protocol_settings("cityscapes") == settings_for("clearclip", "cityscapes")


# ============================================================================================= registry
def test_registry_of_the_new_models(tmp_path, tiny_quickgelu_config):
    assert {"resclip", "scclip", "gem_quoted", "gem"} <= set(available_models())
    for name, cls in (("resclip", ResCLIP), ("scclip", SCCLIP)):
        assert cls.name == name and (cls.default_backbone, cls.default_pretrained) == ("ViT-B-16-quickgelu", "openai")
    for name in ("resclip", "scclip", "gem_quoted"):
        assert authors_precision(name) == "fp16"
        with pytest.raises(FileNotFoundError, match="openai"):                  # fails fast, names the weights
            create_model(name, cache_dir=str(tmp_path))
        with pytest.raises(ValueError, match="quickgelu"):
            create_model(name, backbone="ViT-B-16", pretrained="openai", cache_dir=str(tmp_path))
        with pytest.raises(ValueError, match="checkpoint"):
            create_model(name, backbone=TINY_12, pretrained="none", checkpoint="x.pt")
        with pytest.raises(ValueError, match="CUDA"):
            create_model(name, backbone=TINY_12, pretrained="none", precision="fp16")
    assert authors_precision("gem") == "fp32"
    assert create_model("gem_quoted", backbone=TINY_12, pretrained="none").ignore_residual
    assert not create_model("gem", backbone=TINY_12, pretrained="none").ignore_residual


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 runs only on CUDA")
@pytest.mark.parametrize("model", ["resclip", "scclip", "gem_quoted"])
def test_fp16_on_cuda_matches_fp32(tmp_path, model):
    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    torch.save(create_model(model, backbone=TINY_12, pretrained="none").clip.state_dict(), path)
    m16 = create_model(model, backbone=TINY_12, pretrained=str(path), device="cuda", precision="fp16")
    m32 = create_model(model, backbone=TINY_12, pretrained=str(path), device="cuda")
    img = np.random.default_rng(6).integers(0, 256, (240, 240, 3), dtype=np.uint8)
    s16, s = m16.protocol_settings("ade20k"), m32.protocol_settings("ade20k")     # (ResCLIP: configures)
    a, b = m16.extract(img, s), m32.extract(img, s)
    assert a.feats.dtype == torch.float32 and a.feats.device.type == "cuda" and s16.logits_fp16
    assert (a.feats * b.feats).sum(1).min() > 0.99                  # cosine of fp16 vs fp32 features
