"""floss.protocol.experiments and floss.report.analysis on tiny synthetic caches."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from floss.protocol import experiments
from floss.core.rankings import select_experts
from floss.report import analysis


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from report_root import build_root
    root = tmp_path_factory.mktemp("exp")
    build_root(root, [("clipdinoiser", "cityscapes")])
    return root


def test_lenient_experts_keeps_short_classes_and_uses_all_templates_when_none_is_valid():
    entries = lambda valid: [{"template_id": t, "entropy": 0.1 * t, "pixel_percentage": 1.0 if t in valid else 0.0,
                              "rank": t + 1} for t in range(80)]
    rankings = {"classes": {"a": {"entropy_ranking": entries(range(80))}, "b": {"entropy_ranking": entries([5, 7])},
                            "c": {"entropy_ranking": entries([])}}}
    experts, short = experiments.lenient_experts(rankings, n=4)
    assert experts[0] == [0, 1, 2, 3] and experts[1] == [5, 7] and experts[2] == list(range(80))
    assert short == ["b", "c"]


def test_spearman_and_metric_direction():
    assert analysis.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert analysis.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(analysis.spearman([1, 2], [1, 2]))


def test_experiments_on_a_tiny_synthetic_root(root):
    res = analysis.load_results(root, "clipdinoiser", "cityscapes")
    val = experiments.open_cache(root, "clipdinoiser", "cityscapes", "val")
    train = experiments.open_cache(root, "clipdinoiser", "cityscapes", "train")
    stats = experiments.load_stats(root, "clipdinoiser", "cityscapes")
    # low data: the full train set reproduces the rank stage's experts, hence the results' FLOSS mIoU
    frame = experiments.low_data(stats, train.ids, val, val.class_names, sizes=[2, len(train)], seeds=2)
    assert list(frame.columns[:3]) == ["size", "seed", "miou"] and len(frame) == 4
    full = frame[frame["size"] == len(train)]
    assert full["miou"].tolist() == pytest.approx([res["methods"]["floss"]["miou"]] * 2)
    summary = experiments.summarize(frame, "size")
    assert summary.loc[len(train), "std"] == pytest.approx(0.0) and summary["count"].tolist() == [2, 2]
    # metric ablation: entropy experts give the results' FLOSS; every metric yields a finite mIoU
    abl = experiments.metric_ablation(stats, val, val.class_names, ["entropy", "avgprob"])
    assert abl.at["entropy", "miou"] == pytest.approx(res["methods"]["floss"]["miou"])
    assert math.isfinite(abl.at["avgprob", "miou"])
    iou = analysis.per_template_iou(res)
    corr = analysis.metric_correlation(abl.at["entropy", "rankings"], iou, "entropy")
    assert corr["oriented"].dropna().between(-1, 1).all()
    assert (corr["oriented"].dropna() == -corr["spearman"].dropna()).all()       # entropy: lower is better
    # oracle N=1 uses the single best template per class
    names = val.class_names
    iou_t = torch.tensor(iou[names].to_numpy(), dtype=torch.float64)
    base_t = torch.tensor(analysis.class_iou(res, "baseline")[names].to_numpy(), dtype=torch.float64)
    oracle = experiments.oracle_sweep(iou_t, val, [1])
    assert oracle.at[1, "baseline"] == pytest.approx(res["methods"]["baseline"]["miou"])
    mix = experiments.rho_sweep(iou_t, base_t, val, [0.0, 1.0], seeds=1)
    assert mix.loc[mix.rho == 100.0, "achieved_rho"].iloc[0] >= mix.loc[mix.rho == 0.0, "achieved_rho"].iloc[0]
    # fallback/changed pixels are percentages; decision maps agree with the label's shape
    maps = experiments.decision_maps(val[0], val, res["experts"])
    assert maps["label"].shape == maps["floss"].shape and maps["changed"].dtype == torch.bool
    stats_fb = experiments.fallback_stats(val, res["experts"], max_images=1)
    assert 0.0 <= stats_fb["fallback_percent"] <= 100.0 and stats_fb["images"] == 1


def test_quality_and_summary_match_their_definitions(root):
    res = analysis.load_results(root, "clipdinoiser", "cityscapes")
    iou, base = analysis.per_template_iou(res), analysis.class_iou(res, "baseline")
    quality, mean = analysis.quality_per_class(res["experts"], iou, base, list(base.index))
    for k, name in enumerate(base.index):
        if math.isnan(base[name]):
            continue
        expected = 100.0 * sum(iou.at[t, name] > base[name] for t in res["experts"][k]) / len(res["experts"][k])
        assert quality[name] == pytest.approx(expected)
    summary = analysis.single_template_summary(iou, base)
    assert (summary["best_iou"] >= iou[list(base.index)].max() - 1e-9).all()
    assert summary.loc["road", "gain"] == pytest.approx(summary.loc["road", "best_iou"] - base["road"])


def test_missing_inputs_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="results/eval/maskclip/ade20k.json"):
        analysis.load_results(tmp_path, "maskclip", "ade20k")
    with pytest.raises(FileNotFoundError, match="extract"):
        experiments.open_cache(tmp_path, "maskclip", "ade20k", "val")
    with pytest.raises(KeyError, match="floss_average"):
        analysis.method_miou({"model": "m", "dataset": "d", "methods": {"baseline": {"miou": 1.0}}}, "floss_average")


def test_overlap_table_matches_names_without_spaces():
    table = analysis.overlap_table({"trafficlight": [1, 2, 3, 4]}, {"traffic light": [4, 3, 9, 8]})
    assert table.loc["traffic light", "overlap"] == 2
    with pytest.raises(ValueError, match="missing"):
        analysis.overlap_table({}, {"road": [1]})
