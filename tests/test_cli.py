"""Command line: extract -> rank -> evaluate on generated dataset layouts with a tiny random MaskCLIP; resume,
stale caches and the input errors (exit status 2, one line naming the file or value)."""
from __future__ import annotations

import json
import math
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_GELU
from floss import cli
from floss.data.cache import FeatureCache
from floss.protocol import evaluate_cache
from floss.core.rankings import load_rankings, select_experts
from layouts import make_dataset


def extract_args(root, out, split="train", dataset="cityscapes", *extra):
    return ["extract", "--model", "maskclip", "--dataset", dataset, "--split", split, "--data-root", str(root),
            "--out", str(out), "--backbone", TINY_GELU, "--pretrained", "none", "--device", "cpu",
            "--dtype", "fp32", *extra]


@pytest.fixture(scope="module")
def city(tmp_path_factory):
    return make_dataset("cityscapes", tmp_path_factory.mktemp("data") / "cityscapes", n_train=2, n_val=2)


@pytest.fixture(scope="module")
def caches(city, tmp_path_factory):
    out = tmp_path_factory.mktemp("features")
    assert cli.main(extract_args(city, out / "train", "train")) == 0
    assert cli.main(extract_args(city, out / "val", "val")) == 0
    return out


def usable(path):
    """A random tiny model predicts only a few classes: give never-predicting templates a tiny pixel share so
    that every class has experts (the file stays schema-valid; selection then takes the stored order)."""
    rankings = load_rankings(path)
    for entry in rankings["classes"].values():
        for item in entry["entropy_ranking"]:
            item["pixel_percentage"] = max(item["pixel_percentage"], 1e-6)
    path.write_text(json.dumps(rankings))
    return rankings


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert all(name in text for name in ("extract", "rank", "evaluate"))
    for name in ("extract", "rank", "evaluate"):
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        assert "--out" in capsys.readouterr().out


def test_round_trip_extract_rank_evaluate(caches, tmp_path):
    train, val = FeatureCache(caches / "train"), FeatureCache(caches / "val")
    assert len(train) == 2 and len(val) == 2 and val[0].label.dtype == torch.uint8
    assert train.manifest["fingerprint"]["weights"].startswith("none")
    assert cli.main(["rank", "--features", str(caches / "train"), "--out", str(tmp_path / "rk_{metric}.json"),
                     "--metric", "entropy", "avgprob", "--stats-out", str(tmp_path / "stats.safetensors")]) == 0
    rankings = load_rankings(tmp_path / "rk_entropy.json")
    assert list(rankings["classes"]) == train.class_names and rankings["split"] == "train"
    rankings = usable(tmp_path / "rk_entropy.json")
    assert (tmp_path / "rk_avgprob.json").is_file() and (tmp_path / "stats.safetensors").is_file()

    out = tmp_path / "res" / "results.json"
    assert cli.main(["evaluate", "--features", str(caches / "val"), "--out", str(out), "--rankings",
                     str(tmp_path / "rk_entropy.json"), "--fusion", "highest", "average", "--per-template"]) == 0
    res = json.loads(out.read_text())
    assert {"model", "dataset", "split", "methods", "per_template", "experts", "config"} <= set(res)
    assert set(res["methods"]) == {"baseline", "floss", "floss_highest", "floss_average"}
    assert len(res["per_template"]) == 80 and len(res["experts"]) == 19
    conf = load_file(tmp_path / "res" / "results.confusion.safetensors")
    assert conf["per_template"].shape == (80, 19, 19)
    # numbers consistent with the confusion matrices and with a direct library computation
    direct = evaluate_cache(val, select_experts(rankings, n=4), fusions=("highest",), progress=False)
    assert torch.equal(direct["confusion"]["floss_highest"], conf["floss_highest"])
    assert torch.equal(direct["confusion"]["baseline"], conf["baseline"])
    c = conf["baseline"].double()
    iou = 100 * c.diag() / (c.sum(0) + c.sum(1) - c.diag())
    for k, name in enumerate(val.class_names):
        got = res["methods"]["baseline"]["iou"][name]
        assert (got is None and math.isnan(iou[k])) or got == pytest.approx(float(iou[k]))
    assert res["methods"]["floss"] == res["methods"]["floss_highest"]


def test_transfer_rankings_from_another_dataset(caches, tmp_path):
    """Cityscapes experts applied to ACDC (same classes) work; a mismatched class list is a clear error."""
    acdc = make_dataset("acdc_night", tmp_path / "acdc", n_train=0, n_val=1)
    assert cli.main(extract_args(acdc, tmp_path / "acdc_val", "val", "acdc_night")) == 0
    assert cli.main(["rank", "--features", str(caches / "train"), "--out", str(tmp_path / "rk.json")]) == 0
    usable(tmp_path / "rk.json")
    assert cli.main(["evaluate", "--features", str(tmp_path / "acdc_val"), "--out", str(tmp_path / "r.json"),
                     "--rankings", str(tmp_path / "rk.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["dataset"] == "acdc_night"
    bad = load_rankings(tmp_path / "rk.json")
    bad["classes"]["lorry"] = bad["classes"].pop("truck")
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert cli.main(["evaluate", "--features", str(tmp_path / "acdc_val"), "--out", str(tmp_path / "r2.json"),
                     "--rankings", str(tmp_path / "bad.json")]) == 2


def test_interrupted_extraction_resumes_identically(city, tmp_path, monkeypatch):
    from floss.data.cache import CacheWriter
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert cli.main(extract_args(city, ref, "train", "cityscapes", "--images-per-shard", "1")) == 0
    real_flush, calls = CacheWriter._flush, []

    def crashing_flush(self):
        if self._buffer and len(calls) == 1:
            raise KeyboardInterrupt("simulated crash after the first shard")
        calls.append(1)
        real_flush(self)

    monkeypatch.setattr(CacheWriter, "_flush", crashing_flush)
    with pytest.raises(KeyboardInterrupt):
        cli.main(extract_args(city, run, "train", "cityscapes", "--images-per-shard", "1"))
    monkeypatch.setattr(CacheWriter, "_flush", real_flush)
    assert len(json.loads((run / "manifest.rank0.json").read_text())["images"]) == 1
    assert cli.main(extract_args(city, run, "train", "cityscapes", "--images-per-shard", "1")) == 0
    a, b = FeatureCache(ref), FeatureCache(run)
    assert a.manifest["shards"] == b.manifest["shards"]          # names and sha256 of every shard
    assert (ref / "text.safetensors").read_bytes() == (run / "text.safetensors").read_bytes()


def test_a_stale_cache_is_replaced_saying_why(caches, city, tmp_path, capsys):
    """Other settings into an existing cache: recomputed (never reused), the log names what changed, and the
    cache equals a fresh extraction's byte for byte."""
    import shutil
    shutil.copytree(caches / "train", tmp_path / "rerun")
    assert cli.main(extract_args(city, tmp_path / "rerun", "train", "cityscapes", "--protocol", "paper")) == 0
    assert "settings.protocol: cached='authors' expected='paper'" in capsys.readouterr().err      # the log
    assert cli.main(extract_args(city, tmp_path / "fresh", "train", "cityscapes", "--protocol", "paper")) == 0
    for name in ("manifest.json", "text.safetensors"):
        assert (tmp_path / "rerun" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()


def test_input_errors_name_the_value_or_file(city, tmp_path, capsys):
    def fails(args, *needles):
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"floss {args[0]}: error:") and "Traceback" not in err, err
        assert all(n in last for n in needles), last

    fails(extract_args(city, tmp_path / "o", "train")[:2] + ["nosuchmodel"] + extract_args(city, tmp_path / "o")[3:],
          "unknown model 'nosuchmodel'")
    fails(extract_args(city, tmp_path / "o", "train", "nosuchset"), "unknown dataset 'nosuchset'")
    fails(extract_args(tmp_path / "empty", tmp_path / "o"), "does not exist")            # wrong layout
    broken = make_dataset("cityscapes", tmp_path / "broken", n_train=2, n_val=0)
    label = next((broken / "gtFine" / "train").rglob("*_labelTrainIds.png"))
    label.unlink()
    fails(extract_args(broken, tmp_path / "o"), "no label", label.name)                  # missing label
    label_back = make_dataset("cityscapes", tmp_path / "bad_img", n_train=1, n_val=0)
    image = next((label_back / "leftImg8bit" / "train").rglob("*.png"))
    image.write_bytes(b"not an image")
    fails(extract_args(label_back, tmp_path / "o2"), str(image), "could not be decoded")  # unreadable image
    fails(["rank", "--features", str(tmp_path / "nothing"), "--out", str(tmp_path / "r.json")], "nothing")


def test_missing_weights_fail_fast_and_cleanly(city, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = extract_args(city, tmp_path / "o")
    args[args.index("--pretrained") + 1] = "laion2b_s34b_b88k"
    args[args.index("--backbone") + 1] = "ViT-B-16"
    start = time.monotonic()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - start < 20
    assert "laion2b_s34b_b88k" in err and "Traceback" not in err
