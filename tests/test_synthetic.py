"""The synthetic data source: real cache format, planted experts recoverable, the FLOSS effect, determinism."""
from __future__ import annotations

import logging
import pytest
import torch

from floss.data.cache import FeatureCache
from floss.core.classes import CLASS_NAMES, ranking_keys
from floss.data.synthetic import planted_experts, synthetic_settings, write_synthetic_cache


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors here are tiny: one torch thread is several times faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """CLIP-DINOiser on synthetic Cityscapes: a train split to rank on, a val split to evaluate."""
    root = tmp_path_factory.mktemp("synthetic")
    train = write_synthetic_cache(root / "train", "clipdinoiser", "cityscapes", "train", num_images=16, seed=3)
    val = write_synthetic_cache(root / "val", "clipdinoiser", "cityscapes", "val", num_images=10, seed=3)
    return FeatureCache(train), FeatureCache(val)


def test_cache_is_real_format_with_planted_truth(caches):
    train, _ = caches
    m = train.manifest
    assert m["source"] == "synthetic" and m["complete"] and len(train) == 16
    assert train.class_names == CLASS_NAMES["cityscapes"] and train.text.shape == (80, 19, 32)
    assert torch.allclose(train.text.norm(dim=-1), torch.ones(80, 19), atol=1e-5)
    settings = train.settings
    assert settings == synthetic_settings("clipdinoiser", "cityscapes")
    assert (settings.crop, settings.stride, settings.softmax_stage) == (64, 32, "window")
    rec = train[0]
    # 48x96 Cityscapes-like image -> 64x128 resized -> 1x3 windows of 4x4 patches, as 896x448 / 448 / 224
    assert rec.orig_size == (48, 96) and rec.resized_size == (64, 128) and tuple(rec.feats.shape) == (3, 32, 4, 4)
    assert rec.boxes.tolist() == [[0, 64, 0, 64], [0, 64, 32, 96], [0, 64, 64, 128]]
    assert torch.allclose(rec.feats.float().norm(dim=1), torch.ones(3, 4, 4), atol=2e-3)
    labels = torch.cat([r.label.flatten() for r in train])
    assert labels.dtype == torch.uint8 and bool((labels == 255).any())
    assert set(labels[labels != 255].unique().tolist()) == set(range(19))     # every class appears
    experts = planted_experts(train)
    assert len(experts) == 19 and all(len(e) == 4 and len(set(e)) == 4 for e in experts)


def test_entropy_ranking_recovers_planted_experts_and_floss_beats_baseline(caches):
    from floss.protocol import evaluate_cache, rank_cache
    from floss.core.rankings import select_experts

    train, val = caches
    stats = rank_cache(train, metrics=("entropy",), progress=False)
    keys = ranking_keys("cityscapes", "clipdinoiser")
    rankings = stats.rankings(keys, metric="entropy", model="clipdinoiser", dataset="cityscapes")
    experts = select_experts(rankings, n=4, class_names=keys)
    planted = planted_experts(train)
    hits = sum(len(set(e) & set(p)) for e, p in zip(experts, planted)) / (4 * len(planted))
    assert hits > 3 * (4 / 80), f"planted experts recovered {hits:.2f}, chance is {4 / 80:.2f}"
    res = evaluate_cache(val, experts, fusions=("highest",), progress=False)
    base, floss = res["methods"]["baseline"]["miou"], res["methods"]["floss"]["miou"]
    assert floss > base + 0.5, (base, floss)
    # the planted truth is an upper reference: its experts help too
    truth = evaluate_cache(val, planted, fusions=("highest",), progress=False)["methods"]["floss"]["miou"]
    assert truth > base


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, caplog):
    def shard_bytes(path):
        return [p.read_bytes() for p in sorted((path / "shards").glob("*.safetensors"))] + \
            [(path / "text.safetensors").read_bytes()]

    a = write_synthetic_cache(tmp_path / "a", "naclip", "pascalvoc20", "val", num_images=3, seed=5)
    b = write_synthetic_cache(tmp_path / "b", "naclip", "pascalvoc20", "val", num_images=3, seed=5)
    c = write_synthetic_cache(tmp_path / "c", "naclip", "pascalvoc20", "val", num_images=3, seed=6)
    assert shard_bytes(a) == shard_bytes(b)
    assert shard_bytes(a) != shard_bytes(c)
    cache = FeatureCache(a)
    # NACLIP on VOC20 prompts 30 query words and (as the authors) evaluates the whole image in one window
    assert cache.text.shape[1] == 30 and cache.settings.crop is None and cache[0].feats.shape[0] == 1
    # rewriting with the same arguments is a no-op; other arguments into the same folder replace the cache
    # (a rerun equals a fresh run) with a log line naming what changed
    before = shard_bytes(a)
    write_synthetic_cache(a, "naclip", "pascalvoc20", "val", num_images=3, seed=5)
    assert shard_bytes(a) == before
    with caplog.at_level(logging.INFO, logger="floss.data.cache"):
        write_synthetic_cache(a, "naclip", "pascalvoc20", "val", num_images=4, seed=5)
    assert "num_images" in caplog.text and "extracting every image again" in caplog.text
    write_synthetic_cache(tmp_path / "d", "naclip", "pascalvoc20", "val", num_images=4, seed=5)
    assert shard_bytes(a) == shard_bytes(tmp_path / "d") and len(FeatureCache(a)) == 4


def test_worlds_shared_and_distinct_as_documented(tmp_path):
    def text(model, dataset, split="val"):
        return FeatureCache(write_synthetic_cache(tmp_path / f"{model}-{dataset}-{split}", model, dataset, split,
                                                  num_images=1)).text

    city = text("maskclip", "cityscapes")
    assert torch.equal(city, text("maskclip", "acdc_night"))        # transfer sets: the Cityscapes world
    assert torch.equal(city, text("clipdinoiser", "cityscapes"))    # one text encoder (open_clip) for both
    assert not torch.equal(city, text("naclip", "cityscapes"))      # OpenAI CLIP: other embeddings
    night = FeatureCache(tmp_path / "maskclip-acdc_night-val")
    day = FeatureCache(tmp_path / "maskclip-cityscapes-val")
    assert night.class_names == day.class_names and planted_experts(night) == planted_experts(day)
    assert not torch.equal(night[0].feats, day[0].feats)


@pytest.mark.parametrize("kwargs, match", [
    (dict(model="clip"), "model"),
    (dict(dataset="kitti"), "dataset"),
    (dict(split="test"), "split"),
    (dict(dataset="bdd", split="train"), "evaluation-only"),
    (dict(num_images=0), "num_images"),
    (dict(feature_dim=4), "feature_dim"),
    (dict(planted_per_class=81), "planted_per_class"),
])
def test_bad_arguments_are_named(tmp_path, kwargs, match):
    args = dict(model="maskclip", dataset="cityscapes", split="val")
    args.update(kwargs)
    extra = {k: args.pop(k) for k in list(args) if k not in ("model", "dataset", "split")}
    with pytest.raises(ValueError, match=match):
        write_synthetic_cache(tmp_path / "x", args["model"], args["dataset"], args["split"], **extra)


def test_planted_experts_refuses_a_real_cache(tmp_path, caches):
    import json
    import shutil

    train, _ = caches
    copy = tmp_path / "real"
    shutil.copytree(train.root, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["source"], manifest["synthetic"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not a synthetic cache"):
        planted_experts(copy)
    assert len(FeatureCache(copy)) == 16
