"""The metric bench: the candidates beyond the paper (formulas on tiny tensors, planted experts recovered), the
metric kinds of TemplateStats (the paper's metrics unchanged), and metric plug-ins ("module:function": the CLI, the
pipeline parameter, errors, and the rerun key)."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from floss.core import metrics as registry
from floss.core.metrics import (ensemble_values, kurtosis_score, load_metric_plugin, margin_score,
                                metric_plugin_digest, spatial_score)
from floss.core.stats import TemplateStats

REPO = Path(__file__).resolve().parents[1]
NEW = ("margin", "kurtosis", "spatial", "rank_ensemble")
PAPER = ("entropy", "avgprob", "mano")


@pytest.fixture(autouse=True)
def clean_registry():
    """Plug-ins registered by a test are removed afterwards (the registry is process-wide)."""
    before, plugins = dict(registry._REGISTRY), dict(registry._PLUGINS)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(before)
    registry._PLUGINS.clear()
    registry._PLUGINS.update(plugins)


def _probs(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(*shape, generator=g, dtype=dtype)).softmax(dim=1)


# ------------------------------------------------------------------------------------------- formulas
def test_margin_is_top1_minus_top2():
    q = _probs(3, 5, 7)
    s = q.sort(dim=1, descending=True).values
    assert torch.equal(margin_score(q), s[:, 0] - s[:, 1])
    one = torch.ones(2, 1, 4)
    assert torch.equal(margin_score(one), torch.ones(2, 4))     # K = 1: the top probability


def test_kurtosis_matches_the_moment_formula():
    q = _probs(2, 6, 5)
    out = kurtosis_score(q)
    for m in range(2):
        for p in range(5):
            v = [float(x) for x in q[m, :, p]]
            mu = sum(v) / len(v)
            m2 = sum((x - mu) ** 2 for x in v) / len(v)
            m4 = sum((x - mu) ** 4 for x in v) / len(v)
            assert float(out[m, p]) == pytest.approx(m4 / m2 ** 2 - 3, rel=1e-12)
    flat = torch.full((1, 4, 3), 0.25)
    assert torch.equal(kurtosis_score(flat), torch.full((1, 3), registry.KURTOSIS_CONSTANT, dtype=torch.float64))
    onehot = torch.zeros(1, 10, 1)
    onehot[0, 3] = 1.0
    assert float(kurtosis_score(onehot)) > float(kurtosis_score(_probs(1, 10, 1)))   # peaked > spread


def test_spatial_is_the_share_of_4_neighbours_with_the_same_class():
    q = _probs(2, 3, 4, 5)
    pred = q.argmax(dim=1)
    out = spatial_score(q)
    for m in range(2):
        for y in range(4):
            for x in range(5):
                nb = [(y + dy, x + dx) for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))
                      if 0 <= y + dy < 4 and 0 <= x + dx < 5]
                same = sum(int(pred[m, a, b] == pred[m, y, x]) for a, b in nb)
                assert float(out[m, y, x]) == pytest.approx(same / len(nb))
    assert torch.equal(spatial_score(torch.ones(1, 2, 1, 1)), torch.ones(1, 1, 1))      # no neighbours


def test_rank_ensemble_is_the_mean_average_rank_over_members():
    a = torch.tensor([[1.0, 2.0], [3.0, float("nan")], [1.0, 0.5]], dtype=torch.float64)   # lower is better
    b = torch.tensor([[0.2, 0.9], [0.8, float("nan")], [0.5, 0.1]], dtype=torch.float64)   # higher is better
    out = ensemble_values([a, b], [False, True])
    # class 0: a ranks (1.5, 3, 1.5) (tie), b ranks (3, 1, 2); class 1: a (2, -, 1), b (1, -, 2)
    expected = torch.tensor([[2.25, 1.5], [2.0, float("nan")], [1.75, 1.5]], dtype=torch.float64)
    assert torch.allclose(out, expected, equal_nan=True)


# ------------------------------------------------------------------------------------ TemplateStats kinds
def test_new_metrics_leave_the_paper_metrics_bit_identical_and_spatial_is_exact():
    p = _probs(5, 4, 6, 7, seed=1, dtype=torch.float32)
    both = TemplateStats(5, 4, metrics=PAPER + NEW).update(p, size=(12, 15))
    alone = TemplateStats(5, 4, metrics=PAPER).update(p, size=(12, 15))
    assert torch.equal(both.counts, alone.counts)
    for m in PAPER:
        assert torch.equal(both.values(m).nan_to_num(), alone.values(m).nan_to_num()), m
    up = F.interpolate(p, size=(12, 15), mode="bilinear", align_corners=False)
    pred, score = up.argmax(1), spatial_score(up)
    for t in range(5):
        for k in range(4):
            sel = pred[t] == k
            want = float(score[t][sel].double().mean()) if sel.any() else float("nan")
            got = float(both.values("spatial")[t, k])
            assert (got == pytest.approx(want, rel=1e-6)) or (want != want and got != got)
    ens = ensemble_values([both.values(m) for m in registry.ENSEMBLE_MEMBERS], [False, True, True])
    assert torch.allclose(both.values("rank_ensemble"), ens, equal_nan=True)


@pytest.mark.parametrize("m,k,h,w,size", [(5, 4, 6, 7, (12, 15)), (3, 19, 9, 16, (64, 128)), (2, 3, 5, 5, None)])
def test_spatial_from_the_blocks_argmax_equals_the_whole_map_path_bit_for_bit(m, k, h, w, size):
    """The built-in spatial reuses the argmax of the statistics' blocks (argmax_map_sums); a registered map metric
    goes through map_sums (each template's whole map upsampled again): the same sums to the last bit."""
    from floss.core.kernels.stats import accumulate, map_sums
    p = _probs(m, k, h, w, seed=3, dtype=torch.float32)
    p[0, :, 0, 0] = 1.0 / k                                      # a tie: first index wins in both
    out = size or (h, w)
    _, sums, _ = accumulate(p, out, None, ("entropy", "spatial"))
    whole = map_sums(p, out, [registry.get_metric("spatial")], torch.float32)
    assert torch.equal(sums[1], whole[0])


def test_stats_with_new_metrics_save_load_and_merge(tmp_path):
    p = _probs(3, 4, 5, 6, seed=2, dtype=torch.float32)
    a = TemplateStats(3, 4, metrics=PAPER + NEW).update(p)
    b = TemplateStats(3, 4, metrics=PAPER + NEW).update(p.flip(-1))
    a.save(tmp_path / "s.safetensors")
    back = TemplateStats.load(tmp_path / "s.safetensors")
    merged = a.merge(b)
    for m in PAPER + NEW:
        assert torch.equal(back.values(m).nan_to_num(), a.values(m).nan_to_num()), m
        assert merged.values(m).shape == (3, 4)


def test_rank_ensemble_needs_its_members():
    with pytest.raises(ValueError, match="metrics: 'rank_ensemble' combines"):
        TemplateStats(3, 4, metrics=("entropy", "rank_ensemble"))


# ---------------------------------------------------------------------------------- planted experts
@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from floss.data.cache import FeatureCache
    from floss.data.synthetic import planted_experts, write_synthetic_cache
    from floss.protocol import rank_cache

    root = tmp_path_factory.mktemp("planted")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train = FeatureCache(write_synthetic_cache(root / "train", "clipdinoiser", "cityscapes", "train",
                                                   num_images=8, seed=3))
        stats = rank_cache(train, metrics=PAPER + NEW, progress=False)
    finally:
        torch.set_num_threads(threads)
    return stats, train.class_names, planted_experts(train)


@pytest.mark.parametrize("metric", NEW)
def test_each_new_metric_recovers_planted_experts_better_than_chance(planted, metric):
    from floss.core.rankings import select_experts

    stats, names, truth = planted
    experts = select_experts(stats.rankings(names, metric=metric), n=4, metric=metric, class_names=names)
    hits = sum(len(set(e) & set(t)) for e, t in zip(experts, truth)) / (4 * len(truth))
    assert hits > 2 * (4 / 80), f"{metric}: planted experts recovered {hits:.2f}, chance is {4 / 80:.2f}"


def test_spatial_prefers_coherent_maps_on_a_constructed_case():
    """Templates 0-1 ("experts") predict smooth blocks; the others salt-and-pepper noise of equal confidence."""
    g = torch.Generator().manual_seed(0)
    k, h, w = 3, 16, 16
    blocks = (torch.arange(h).view(h, 1) // 8 + torch.arange(w).view(1, w) // 8 * 0) % k
    probs = torch.full((6, k, h, w), 0.1)
    for t in range(6):
        labels = blocks if t < 2 else torch.randint(0, k, (h, w), generator=g)
        probs[t].scatter_(0, labels.unsqueeze(0), 0.8)
    st = TemplateStats(6, k, metrics=("spatial",)).update(probs)
    from floss.core.rankings import select_experts
    experts = select_experts(st.rankings(["a", "b", "c"], metric="spatial"), n=2, metric="spatial")
    assert all(set(e) == {0, 1} for e in experts[:2])


# -------------------------------------------------------------------------------------------- plug-ins
PLUGIN = '''
import floss

def register():
    floss.register_metric("peak{tag}", lambda q: q.amax(dim=1) ** 2, higher_is_better=True)

def as_dict():
    return {{"name": "gap{tag}", "pixel_score": lambda q: 1 - q.amax(dim=1), "higher_is_better": False}}

def clash():
    return {{"name": "entropy", "pixel_score": lambda q: q.sum(1), "higher_is_better": True}}

def nothing():
    return None

NOT_A_FUNCTION = 3
'''


def _plugin(folder: Path, name: str, tag: str = "") -> Path:
    path = folder / f"{name}.py"
    path.write_text(PLUGIN.format(tag=tag))
    return path


def test_plugin_registers_by_module_function_and_errors_name_the_argument(tmp_path, monkeypatch):
    _plugin(tmp_path, "bench_plugin_a", "_a")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_metric_plugin("bench_plugin_a:register") == ["peak_a"]
    assert load_metric_plugin("bench_plugin_a:register") == ["peak_a"]          # once per process
    assert load_metric_plugin("bench_plugin_a:as_dict") == ["gap_a"]
    assert registry.get_metric("gap_a").higher_is_better is False
    st = TemplateStats(2, 3, metrics=("entropy", "peak_a", "gap_a")).update(_probs(2, 3, 4, 4, dtype=torch.float32))
    assert st.values("peak_a").shape == (2, 3)
    for spec, match in (("nope_module_xyz:register", "--metric-plugin: cannot import module 'nope_module_xyz'"),
                        ("bench_plugin_a:missing", "--metric-plugin: module 'bench_plugin_a' has no function"),
                        ("bench_plugin_a:NOT_A_FUNCTION", "expected a callable"),
                        ("bench_plugin_a", "--metric-plugin: expected 'module:function'"),
                        ("bench_plugin_a:clash", "'entropy', which is already registered"),
                        ("bench_plugin_a:nothing", "registered no metric")):
        with pytest.raises(ValueError, match=match):
            load_metric_plugin(spec)


def test_cli_rank_with_a_metric_plugin(tmp_path):
    from floss.data.synthetic import write_synthetic_cache

    _plugin(tmp_path, "bench_plugin_cli", "_cli")
    cache = write_synthetic_cache(tmp_path / "train", "maskclip", "cityscapes", "train", num_images=2, seed=1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "floss", "rank", "--features", str(cache), "--out", str(tmp_path / "r.{metric}.json"),
           "--metric", "entropy", "peak_cli", "--metric-plugin", "bench_plugin_cli:register",
           "--stats-out", str(tmp_path / "s.safetensors")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    doc = json.loads((tmp_path / "r.peak_cli.json").read_text())
    assert len(doc["classes"]["road"]["peak_cli_ranking"]) == 80
    from safetensors import safe_open
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as f:
        extra = json.loads(f.metadata()["floss_template_stats"])["extra"]
    assert list(extra["metric_plugins"]) == ["bench_plugin_cli:register"]
    bad = subprocess.run(cmd[:-4] + ["--metric-plugin", "bench_plugin_cli:nope"], env=env, capture_output=True,
                         text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "--metric-plugin: module 'bench_plugin_cli' has no function 'nope'" in bad.stderr
    unknown = subprocess.run(cmd[:-4], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert unknown.returncode == 2 and "--metric: unknown metric(s) ['peak_cli']" in unknown.stderr


def test_editing_a_plugin_changes_the_rank_key_and_the_checkpoint_is_recomputed(tmp_path, monkeypatch):
    from floss.pipeline.params import metric_plugin_key
    from floss.protocol.extraction import RankCheckpoint

    path = _plugin(tmp_path, "bench_plugin_key", "_key")
    monkeypatch.syspath_prepend(str(tmp_path))
    params = {"rank": {"metric_plugins": ["bench_plugin_key:register"]}}
    key = metric_plugin_key(params)
    assert key == {"metric_plugins": metric_plugin_digest(["bench_plugin_key:register"])}
    assert metric_plugin_key({"rank": {"metric_plugins": []}}) == {}          # no plug-in: keys as before
    load_metric_plugin("bench_plugin_key:register")
    st = TemplateStats(2, 3, metrics=("entropy", "peak_key")).update(_probs(2, 3, 4, 4, dtype=torch.float32))
    inputs = [["img0", ""]]
    ckpt = RankCheckpoint(tmp_path / "ckpt.safetensors", {"metrics": ["peak_key"], **key}, inputs)
    ckpt.processed = inputs
    ckpt.save(st)
    assert RankCheckpoint(tmp_path / "ckpt.safetensors", {"metrics": ["peak_key"], **key}, inputs).load("cpu") is not None
    path.write_text(path.read_text().replace("** 2", "** 3"))                 # the user edits the metric
    edited = metric_plugin_key(params)
    assert edited != key
    assert RankCheckpoint(tmp_path / "ckpt.safetensors", {"metrics": ["peak_key"], **edited}, inputs).load("cpu") is None
    # the pipeline's code stage sees it too (every stage downstream of data/code.json reruns)
    (tmp_path / "params.yaml").write_text("rank:\n  metric_plugins: [bench_plugin_key:register]\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    out = subprocess.run([sys.executable, "-m", "floss.util.provenance", "--params", str(tmp_path / "params.yaml")],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["metric_plugins"] == edited["metric_plugins"]


def test_params_metric_plugins_are_validated_and_their_metrics_accepted(tmp_path, monkeypatch):
    import yaml

    from floss.pipeline.params import ENSEMBLE_MEMBERS, METRICS, ParamsError, validate_params

    assert set(METRICS) <= set(registry.available_metrics()) and ENSEMBLE_MEMBERS == registry.ENSEMBLE_MEMBERS
    _plugin(tmp_path, "bench_plugin_params", "_p")
    monkeypatch.syspath_prepend(str(tmp_path))
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    ok = copy.deepcopy(base)
    ok["rank"]["metric_plugins"] = ["bench_plugin_params:register"]
    ok["rank"]["metrics"] = ["entropy", "peak_p"]
    validate_params(ok, check_paths=False)
    for plugins, metrics, match in (("x:y", ["entropy"], "rank.metric_plugins: expected a list"),
                                    (["no_such_mod_q:f"], ["entropy"], "rank.metric_plugins: cannot import module"),
                                    ([], ["entropy", "peak_zz"], r"rank.metrics\[1\]: expected one of"),
                                    ([], ["entropy", "rank_ensemble"], "rank.metrics: expected the members")):
        bad = copy.deepcopy(base)
        bad["rank"]["metric_plugins"], bad["rank"]["metrics"] = plugins, metrics
        with pytest.raises(ParamsError, match=match):
            validate_params(bad, check_paths=False)
    del base["rank"]["metric_plugins"]          # optional: older params files validate as before
    validate_params(base, check_paths=False)
