"""Bad inputs never poison a result nor cost finished work: unreadable, empty or too-small images stop the run naming
the file (default) or are skipped and listed with their reasons (``--on-bad-image skip``), with counts in the outputs
they affect; wrong arguments and weight files are refused before any model is built; the paper profile checks only
the folders a run reads."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml

from conftest import TINY_GELU
from floss import cli
from floss.util import paths
from floss.data.cache import FeatureCache
from floss.pipeline.params import ParamsError, check_paper_inputs, validate_params
from layouts import make_cityscapes, random_image, random_label, write_image, write_label

MODEL = ["--backbone", TINY_GELU, "--pretrained", "none", "--device", "cpu", "--workers", "0"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``good``: three images with labels; ``bad``: the same plus a corrupt, an empty and a 1×3000-pixel image
    (too thin for the model's windows)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    rng = np.random.default_rng(3)
    for i, name in enumerate(["a", "b", "c"]):
        size = (40 + 8 * i, 64)
        image, label = random_image(rng, size), random_label(rng, size, 3)
        for folder in ("good", "bad"):
            write_image(root / folder / "images" / f"{name}.png", image)
            write_label(root / folder / "labels" / f"{name}.png", label)
    bad = root / "bad"
    (bad / "images" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    (bad / "images" / "empty.png").write_bytes(b"")
    write_image(bad / "images" / "thin.png", random_image(rng, (1, 3000)))
    for name in ("corrupt", "empty", "thin"):
        write_label(bad / "labels" / f"{name}.png", random_label(rng, (1, 3000), 3))
    (root / "classes.txt").write_text("road\ncar\nsky\n")
    return root


def _src(root, folder):
    return ["--images", str(root / folder / "images"), "--classes", str(root / "classes.txt")]


def test_the_default_stops_naming_the_bad_file(folders, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli.main(["rank", "--model", "maskclip", *_src(folders, "bad"), *MODEL, "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "corrupt.jpg" in err and "--on-bad-image skip" in err
    assert not out.exists()


def test_rank_skips_and_lists_bad_images_and_equals_a_run_without_them(folders, tmp_path):
    ok, skip = tmp_path / "good.json", tmp_path / "skip.json"
    assert cli.main(["rank", "--model", "maskclip", *_src(folders, "good"), *MODEL, "--out", str(ok)]) == 0
    assert not (tmp_path / "good.skipped.json").exists()
    assert cli.main(["rank", "--model", "maskclip", *_src(folders, "bad"), *MODEL, "--out", str(skip),
                     "--on-bad-image", "skip"]) == 0
    report = json.loads((tmp_path / "skip.skipped.json").read_text())
    assert report["skipped_images"] == 3
    reasons = {entry["id"]: entry["reason"] for entry in report["images"]}
    assert set(reasons) == {"corrupt", "empty", "thin"} and all(reasons.values())
    good, skipped = json.loads(ok.read_text()), json.loads(skip.read_text())
    assert (good["images"], good["skipped_images"]) == (3, 0)
    assert (skipped["images"], skipped["skipped_images"]) == (3, 3)
    for key in set(good) - {"images", "skipped_images"}:
        assert skipped[key] == good[key], key


def test_extract_skips_and_evaluate_counts_them(folders, tmp_path):
    common = ["--model", "maskclip", *MODEL, "--dtype", "fp32"]
    good, bad = tmp_path / "good", tmp_path / "bad"
    assert cli.main(["extract", *common, *_src(folders, "good"), "--labels", str(folders / "good" / "labels"),
                     "--out", str(good)]) == 0
    assert cli.main(["extract", *common, *_src(folders, "bad"), "--labels", str(folders / "bad" / "labels"),
                     "--out", str(bad), "--on-bad-image", "skip"]) == 0
    report = json.loads((tmp_path / "bad.skipped.json").read_text())
    assert [entry["id"] for entry in report["images"]] == ["corrupt", "empty", "thin"]
    assert [s["id"] for s in FeatureCache(bad).manifest["skipped"]] == ["corrupt", "empty", "thin"]
    assert len(FeatureCache(bad)) == len(FeatureCache(good)) == 3
    for which in (good, bad):
        assert cli.main(["rank", "--features", str(which), "--out", str(tmp_path / f"{which.name}.rank.json")]) == 0
        assert cli.main(["evaluate", "--features", str(which), "--rankings", str(tmp_path / f"{which.name}.rank.json"),
                         "--out", str(tmp_path / f"{which.name}.eval.json")]) == 0
    a = json.loads((tmp_path / "good.eval.json").read_text())
    b = json.loads((tmp_path / "bad.eval.json").read_text())
    assert b["config"]["skipped_images"] == 3 and a["config"]["skipped_images"] == 0
    assert a["methods"] == b["methods"]


def test_bad_arguments_are_refused_before_the_model_is_built(folders, tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the arguments were checked")

    monkeypatch.setattr(cli, "load_model", no_model)
    rank = ["rank", "--model", "maskclip", *_src(folders, "good"), *MODEL, "--out", str(tmp_path / "r.json")]
    assert cli.main([*rank, "--n-experts", "0"]) == 2
    assert "--n-experts" in capsys.readouterr().err
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(b"PK\x03\x04" + b"\0" * 40)
    for weights, words in ((empty, "empty"), (truncated, str(truncated.name))):
        monkeypatch.undo()
        args = [a if a != "none" else str(weights) for a in rank]
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert "--pretrained" in err and words in err, err
        monkeypatch.setattr(cli, "load_model", no_model)


def _paper_params(tmp_path, data_root, **rank):
    params = yaml.safe_load((paths.ROOT / "params.yaml").read_text())
    params.update(profile="paper", data_root=str(data_root))
    params["models"] = {"maskclip": ["cityscapes"]}
    params["transfer"]["models"] = []
    params["rank"].update(rank)
    weights = tmp_path / "weights.pt"
    if not weights.exists():
        import torch
        torch.save({"x": torch.zeros(1)}, weights)
    params["extract"]["weights"] = {"maskclip": {"backbone": TINY_GELU, "pretrained": str(weights),
                                                 "checkpoint": None}}
    return params


def test_check_params_refuses_an_empty_weight_file_and_demands_only_what_is_read(tmp_path):
    data = tmp_path / "data"
    make_cityscapes(data / "cityscapes")
    shutil.rmtree(data / "cityscapes" / "gtFine" / "train")        # ranking from images never reads them
    params = _paper_params(tmp_path, data, source="images")
    check_paper_inputs(params)
    with pytest.raises(ParamsError, match=r"gtFine/train"):
        check_paper_inputs(_paper_params(tmp_path, data, source="cache"))
    (tmp_path / "weights.pt").write_bytes(b"")
    with pytest.raises(ParamsError, match=r"extract\.weights\.maskclip\.pretrained: .*empty"):
        check_paper_inputs(params)
    with pytest.raises(ParamsError):
        validate_params(params)
