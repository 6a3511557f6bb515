"""Bring your own images: a folder (nested, labels optional) + a class-names file with synonyms, ranked without any
cache (identical to ranking the fp32 cache of the same images), evaluated when labels exist, and the cache-free
ranking of a dataset of the paper resumes after an interruption with the same statistics."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import TINY_GELU, TINY_QUICKGELU
from floss import cli
from floss.data.datasets.folder import open_folder, read_class_file
from floss.core.rankings import load_rankings
from floss.core.stats import TemplateStats
from layouts import make_dataset, random_image, random_label, write_image, write_label

MODEL = ["--backbone", TINY_GELU, "--pretrained", "none", "--device", "cpu", "--workers", "0"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("mine")
    rng = np.random.default_rng(0)
    for i, rel in enumerate(["street/a", "street/b", "park/c", "d"]):
        size = (40 + 8 * i, 72)
        write_image(root / "images" / f"{rel}.{'jpg' if i % 2 else 'png'}", random_image(rng, size))
        write_label(root / "labels" / f"{rel}.png", random_label(rng, size, 3))
    (root / "classes.txt").write_text("# my classes\nroad\ncar: automobile, vehicle\n\nsky\n")
    return root


def test_class_file_and_folder_layout(folder, tmp_path):
    assert read_class_file(folder / "classes.txt") == [("road",), ("car", "automobile", "vehicle"), ("sky",)]
    ds = open_folder(folder / "images", folder / "classes.txt", folder / "labels")
    assert ds.ids == ("d", "park/c", "street/a", "street/b")
    assert ds.query_names() == (["road", "car", "automobile", "vehicle", "sky"], [0, 1, 1, 1, 2])
    assert ds[1].label.shape == ds[1].image.shape[:2] == (56, 72)
    bad = tmp_path / "bad.txt"
    bad.write_text("road\ncar: road\n")
    with pytest.raises(ValueError, match="bad.txt:2: name 'road' is already used on line 1"):
        read_class_file(bad)
    with pytest.raises(FileNotFoundError, match="--labels: 4 of 4 images have no label"):
        open_folder(folder / "images", folder / "classes.txt", tmp_path)


def test_rank_own_images_without_a_cache_equals_the_cached_path(folder, tmp_path, capsys):
    src = ["--images", str(folder / "images"), "--classes", str(folder / "classes.txt")]
    assert cli.main(["rank", "--model", "maskclip", *src, *MODEL, "--out", str(tmp_path / "direct.json"),
                     "--metric", "entropy", "avgprob"]) == 2          # several metrics need {metric}
    assert cli.main(["rank", "--model", "maskclip", *src, *MODEL, "--out", str(tmp_path / "direct.{metric}.json"),
                     "--metric", "entropy", "avgprob", "--stats-out", str(tmp_path / "direct.safetensors")]) == 0
    experts = json.loads((tmp_path / "direct.entropy.experts.json").read_text())
    assert list(experts["experts"]) == ["road", "car", "sky"] and experts["n"] == 4
    # the same images through an fp32 feature cache (with labels) and `rank --features`
    assert cli.main(["extract", "--model", "maskclip", *src, "--labels", str(folder / "labels"), *MODEL,
                     "--out", str(tmp_path / "cache"), "--dtype", "fp32"]) == 0
    assert cli.main(["rank", "--features", str(tmp_path / "cache"), "--out", str(tmp_path / "cached.{metric}.json"),
                     "--metric", "entropy", "avgprob", "--stats-out", str(tmp_path / "cached.safetensors")]) == 0
    direct, cached = (TemplateStats.load(tmp_path / f"{k}.safetensors") for k in ("direct", "cached"))
    assert torch.equal(direct.counts, cached.counts) and torch.equal(direct.pixels, cached.pixels)
    # same features, same arithmetic: bit-identical statistics (NaN where a template never predicts a class)
    torch.testing.assert_close(direct.values("entropy"), cached.values("entropy"), rtol=0, atol=0, equal_nan=True)
    for metric in ("entropy", "avgprob"):
        a, b = (load_rankings(tmp_path / f"{k}.{metric}.json") for k in ("direct", "cached"))
        assert a["classes"] == b["classes"] and a["dataset"] == b["dataset"] == "folder"
    # evaluation works when labels exist
    assert cli.main(["evaluate", "--features", str(tmp_path / "cache"), "--rankings",
                     str(tmp_path / "direct.entropy.json"), "--out", str(tmp_path / "res.json")]) == 0
    res = json.loads((tmp_path / "res.json").read_text())
    assert set(res["methods"]["baseline"]["iou"]) == {"road", "car", "sky"}
    # what FLOSS changes, as pictures: the masks are the evaluation's decisions
    assert cli.main(["segment", "--model", "maskclip", *src, *MODEL, "--rankings", str(tmp_path / "direct.entropy.json"),
                     "--out", str(tmp_path / "masks")]) == 0
    from PIL import Image
    from floss.data.cache import FeatureCache
    from floss.protocol import Predictor
    from floss.core.rankings import select_experts
    cache = FeatureCache(tmp_path / "cache")
    predictor = Predictor(cache.text, cache.settings, cache.query_to_class, 3,
                          select_experts(load_rankings(tmp_path / "direct.entropy.json"), n=4))
    for image_id in ("d", "street/a"):
        maps = predictor.predict(cache[image_id])
        for method, folder in (("baseline", "baseline"), ("floss_highest", "floss")):
            png = np.array(Image.open(tmp_path / "masks" / folder / f"{image_id}.png"))
            assert np.array_equal(png, maps[method].numpy()), (image_id, method)
        strip = Image.open(tmp_path / "masks/side_by_side" / f"{image_id}.png")
        assert strip.size[1] == png.shape[0] and strip.size[0] == 4 * png.shape[1] + 12
    classes = json.loads((tmp_path / "masks/classes.json").read_text())
    assert classes["1"]["name"] == "car" and len(classes["1"]["rgb"]) == 3


def test_cache_free_ranking_resumes_with_identical_statistics(tmp_path, monkeypatch):
    """Interrupted after two images (the periodic checkpoint comes every 64 images: the two are saved because the
    checkpoint is written on any exception), the rerun completes the same statistics as an uninterrupted run; a
    checkpoint of other settings is not reused."""
    from floss.protocol import extraction

    root = make_dataset("pascalvoc20", tmp_path / "voc", n_train=3, n_val=1, size=(32, 48))
    source = ["rank", "--model", "naclip", "--dataset", "pascalvoc20", "--data-root", str(root)]
    weights = ["--pretrained", "none", "--device", "cpu", "--workers", "0"]
    base = [*source, "--backbone", TINY_QUICKGELU, *weights]
    assert cli.main([*base, "--out", str(tmp_path / "once.json"), "--stats-out", str(tmp_path / "once.st")]) == 0
    real = extraction.encode_or_skip
    calls = {"n": 0}

    def crash(*args, **kwargs):       # an interrupt while the third image is encoded
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(extraction, "encode_or_skip", crash)
    with pytest.raises(KeyboardInterrupt):
        cli.main([*base, "--out", str(tmp_path / "resumed.json")])
    monkeypatch.setattr(extraction, "encode_or_skip", real)
    state = tmp_path / "resumed.json.state" / "rank0.safetensors"
    assert len(TemplateStats.load(state).extra["processed"]) == 2
    assert cli.main([*base, "--out", str(tmp_path / "resumed.json"), "--stats-out", str(tmp_path / "resumed.st")]) == 0
    # bit for bit: the same statistics file and the same rankings
    assert (tmp_path / "once.st").read_bytes() == (tmp_path / "resumed.st").read_bytes()
    assert (tmp_path / "once.json").read_bytes() == (tmp_path / "resumed.json").read_bytes()
    # another model's checkpoint is not reused: the ranking starts over and equals a fresh run of that model
    other = [*source, "--backbone", TINY_GELU, *weights]
    assert cli.main([*other, "--out", str(tmp_path / "resumed.json")]) == 0
    assert cli.main([*other, "--out", str(tmp_path / "fresh.json")]) == 0
    assert (tmp_path / "fresh.json").read_bytes() == (tmp_path / "resumed.json").read_bytes()
