"""Rankings schema/io, expert selection (incl. the authors' 15 files), oracle, ρ-mix and expert quality."""
import copy
import json
import math

import pytest
import torch

from floss.core.classes import ranking_keys
from floss.util.paths import SHARED
from floss.core.rankings import (experts_overlap, expert_quality, iou_matrix_from_json, load_rankings, mixed_experts,
                            oracle_experts, save_rankings, select_experts, true_experts, validate_rankings)

AUTHORS = SHARED / "reference" / "authors"


def make_rankings(order_per_class, zero=None, metric="entropy"):
    """Rankings in the authors' schema; ``zero[class]`` = template ids with pixel_percentage 0 (put first)."""
    zero = zero or {}
    classes = {}
    for name, order in order_per_class.items():
        z = list(zero.get(name, []))
        ids = z + [t for t in order if t not in z] + [t for t in range(80) if t not in order and t not in z]
        classes[name] = {f"{metric}_ranking": [
            {"template_id": t, metric: 0.0 if t in z else 0.1 * (i + 1),
             "pixel_percentage": 0.0 if t in z else 1.0, "rank": i + 1} for i, t in enumerate(ids)]}
    return {"model": "maskclip", "dataset": "toy", "split": "train", "classes": classes}


def test_select_experts_filters_never_predicting_templates():
    r = make_rankings({"road": [5, 6, 7, 8, 9], "sky": [1, 2, 3, 4]}, zero={"road": [70, 71]})
    assert select_experts(r) == [[5, 6, 7, 8], [1, 2, 3, 4]]
    assert select_experts(r, n=2, class_names=["sky", "road"]) == [[1, 2], [5, 6]]
    assert select_experts(r, n=78) [0][:3] == [5, 6, 7]
    with pytest.raises(ValueError, match="'road' has only 78 valid"):
        select_experts(r, n=79, fewer="error")
    with pytest.raises(ValueError, match="fewer: expected one of"):
        select_experts(r, fewer="drop")
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="n:"):
            select_experts(r, n=bad)


def test_select_experts_follows_the_authors_rule_for_classes_short_of_valid_templates(caplog):
    """A class with fewer than n valid templates keeps those; one with none gets all 80 (the averaged
    classifier), as the authors' MaskCLIP/CLIP-DINOiser inferencer; both are logged (protocol §1.5)."""
    r = make_rankings({"road": [5, 6, 7, 8, 9], "sky": [1, 2, 3, 4], "car": [9]},
                      zero={"sky": [t for t in range(80) if t not in (1, 2)], "car": list(range(80))})
    with caplog.at_level("WARNING", logger="floss.core.rankings"):
        experts = select_experts(r)
    assert experts == [[5, 6, 7, 8], [1, 2], list(range(80))]
    assert "sky (2)" in caplog.text and "car (0)" in caplog.text


def test_select_experts_accepts_the_documented_defaults_of_template_stats():
    """README: floss.select_experts(st.rankings(names)) with model/dataset left as None (an API hole)."""
    import torch
    from floss import TemplateStats
    st = TemplateStats(80, 2)
    st.update(torch.rand(80, 2, 4, 4).softmax(dim=1))
    assert len(select_experts(st.rankings(["road", "sky"]))) == 2


def test_other_metric_key():
    r = make_rankings({"road": [3, 2, 1, 0]}, metric="avgprob")
    assert select_experts(r, metric="avgprob") == [[3, 2, 1, 0]]
    with pytest.raises(ValueError, match="entropy_ranking"):
        select_experts(r)


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r["classes"]["road"]["entropy_ranking"].pop(), "expected 80 entries"),
    (lambda r: r["classes"]["road"]["entropy_ranking"][3].update(template_id=0), "duplicates \\[0\\]"),
    (lambda r: r["classes"]["road"]["entropy_ranking"][3].update(template_id=80), "template_id"),
    (lambda r: r["classes"]["road"]["entropy_ranking"][3].update(rank=7), "'rank'.*expected 4"),
    (lambda r: r["classes"]["road"]["entropy_ranking"][3].update(pixel_percentage=101.0), "pixel_percentage"),
    (lambda r: r["classes"]["road"]["entropy_ranking"][3].update(entropy=math.nan), "'entropy'.*finite"),
    (lambda r: r["classes"]["road"]["entropy_ranking"][3].pop("rank"), "<missing>"),
    (lambda r: r["classes"].update(road=[]), "'road'"),
    (lambda r: r.pop("classes"), "'classes'"),
    (lambda r: r.update(split=3), "'split'"),
])
def test_validate_rankings_errors(mutate, match):
    r = make_rankings({"road": [1], "sky": [2]})
    mutate(r)
    with pytest.raises(ValueError, match=match):
        validate_rankings(r)


def test_validate_rankings_class_names():
    r = make_rankings({"road": [1], "sky": [2]})
    validate_rankings(r, class_names=["sky", "road"])
    with pytest.raises(ValueError, match=r"missing \['car'\], unknown \['sky'\]"):
        validate_rankings(r, class_names=["road", "car"])


def test_save_load_roundtrip_is_atomic(tmp_path):
    r = make_rankings({"road": [1, 2], "traffic light": [3]})
    path = save_rankings(r, tmp_path / "sub" / "r.json")
    assert load_rankings(path) == r
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]
    bad = copy.deepcopy(r)
    bad["classes"]["road"]["entropy_ranking"].pop()
    with pytest.raises(ValueError):
        save_rankings(bad, path)
    assert load_rankings(path) == r  # the invalid content was not written
    with pytest.raises(FileNotFoundError, match="path"):
        load_rankings(tmp_path / "none.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_rankings(tmp_path / "broken.json")


def _authors_files():
    files = sorted((AUTHORS / "rankings").glob("*/*.json"))
    if not files or not (AUTHORS / "top4_experts.json").is_file():
        pytest.skip("authors' rankings not available under floss.util.paths.SHARED")
    return files


def test_authors_rankings_select_their_top4():
    files = _authors_files()               # skips when ../shared is absent
    top4 = json.loads((AUTHORS / "top4_experts.json").read_text())
    assert len(files) == 15
    for path in files:
        r = load_rankings(path)
        keys = ranking_keys(r["dataset"], r["model"])
        validate_rankings(r, class_names=keys)
        expected = top4[f"{r['model']}/{r['dataset']}"]
        assert list(expected) == keys
        assert select_experts(r, class_names=keys) == list(expected.values()), path.name
    # protocol §8.2 examples
    cs = load_rankings(AUTHORS / "rankings" / "maskclip" / "template_rankings_maskclip_cityscapes.json")
    assert select_experts(cs)[0] == [66, 9, 54, 2]


def test_authors_iou_oracle_and_quality():
    path = AUTHORS / "iou_per_template_clipdinoiser_cityscapes.json"
    if not path.is_file():
        pytest.skip("authors' per-template IoU not available")
    names = ranking_keys("cityscapes", "clipdinoiser")
    iou = iou_matrix_from_json(json.loads(path.read_text()), names)
    assert iou.shape == (80, 19)
    oracle = oracle_experts(iou, n=4)
    assert oracle[0] == [58, 75, 24, 44] and oracle[1] == [51, 77, 61, 12]  # protocol §8.3 (road, sidewalk)
    # with the best single template as baseline nothing is strictly better: quality 0 everywhere
    quality, mean = expert_quality(oracle, iou, iou.max(dim=0).values)
    assert mean == 0.0 and bool((quality == 0).all())


def test_oracle_ties_and_nan():
    iou = torch.tensor([[1.0, math.nan], [3.0, 2.0], [3.0, math.nan], [0.5, 1.0]], dtype=torch.float64)
    assert oracle_experts(iou, n=2) == [[1, 2], [1, 3]]
    with pytest.raises(ValueError, match=r"classes \[1\]"):
        oracle_experts(iou, n=3)
    with pytest.raises(ValueError, match="iou"):
        oracle_experts(-iou, n=1)
    with pytest.raises(ValueError, match="iou"):
        oracle_experts(iou[0], n=1)


def test_true_experts_quality_and_overlap():
    iou = torch.tensor([[10., 5., 1.], [20., 5., 2.], [30., 4., 3.], [40., 6., 4.]], dtype=torch.float64)
    baseline = torch.tensor([15., 5., math.nan], dtype=torch.float64)
    assert true_experts(iou, baseline) == [{1, 2, 3}, {3}, set()]  # strictly greater; NaN -> none
    quality, mean = expert_quality([[0, 1], [3, 0], [0]], iou, baseline)
    torch.testing.assert_close(quality[:2], torch.tensor([50.0, 50.0], dtype=torch.float64))
    assert math.isnan(quality[2]) and mean == 50.0
    with pytest.raises(ValueError, match="selected"):
        expert_quality([[0]], iou, baseline)
    with pytest.raises(ValueError, match="baseline_iou"):
        true_experts(iou, baseline[:2])
    assert experts_overlap([[1, 2, 3], [4]], [[3, 2, 9], [5]]) == [2, 0]
    with pytest.raises(ValueError, match="a, b"):
        experts_overlap([[1]], [])


def _mix_inputs():
    g = torch.Generator().manual_seed(1)
    iou = torch.rand(80, 6, generator=g, dtype=torch.float64) * 100
    baseline = iou.median(dim=0).values  # 39-40 true experts per class
    return iou, baseline


@pytest.mark.parametrize("rho, n, n_true", [(0.0, 4, 0), (0.25, 4, 1), (0.5, 4, 2), (0.75, 4, 3), (1.0, 4, 4),
                                            (0.5, 3, 2)])
def test_mixed_experts_ratio(rho, n, n_true):
    iou, baseline = _mix_inputs()
    sel = mixed_experts(iou, baseline, rho, n=n, seed=3)
    truth = true_experts(iou, baseline)
    assert all(len(s) == len(set(s)) == n for s in sel)
    assert [len(set(s) & t) for s, t in zip(sel, truth)] == [n_true] * 6
    assert sel == mixed_experts(iou, baseline, rho, n=n, seed=3)
    quality, mean = expert_quality(sel, iou, baseline)
    assert mean == pytest.approx(100.0 * n_true / n)


def test_mixed_experts_seed_and_shortage():
    iou, baseline = _mix_inputs()
    assert mixed_experts(iou, baseline, 0.5, seed=0) != mixed_experts(iou, baseline, 0.5, seed=1)
    baseline2 = baseline.clone()
    baseline2[2] = iou[:, 2].sort(descending=True).values[2]  # class 2: exactly 2 true experts
    with pytest.raises(ValueError, match=r"classes \[2\]"):
        mixed_experts(iou, baseline2, 0.75)
    sel = mixed_experts(iou, baseline2, 0.75, on_shortage="fill")
    truth = true_experts(iou, baseline2)
    assert len(set(sel[2]) & truth[2]) == 2 and len(sel[2]) == 4
    assert len(set(sel[0]) & truth[0]) == 3
    for kwargs, match in (({"rho": 1.5}, "rho"), ({"rho": 0.5, "n": 0}, "n:"),
                          ({"rho": 0.5, "on_shortage": "x"}, "on_shortage"), ({"rho": 0.5, "seed": 0.5}, "seed")):
        with pytest.raises(ValueError, match=match):
            mixed_experts(iou, baseline, **kwargs)
