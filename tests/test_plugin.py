"""The plug-in point: a user's own dense model gets FLOSS (extract -> rank -> evaluate) without core changes."""
import json

from floss import cli
from floss.data.cache import FeatureCache
from tests.layouts import make_cityscapes


def test_user_model_through_the_command_line(tmp_path):
    root = make_cityscapes(tmp_path / "cs", n_train=2, n_val=2, size=(32, 64))
    feats = tmp_path / "features"
    for split in ("train", "val"):
        assert cli.main(["--plugin", "tests.plugin_model", "extract", "--model", "patchmean", "--dataset",
                         "cityscapes", "--split", split, "--data-root", str(root), "--out", str(feats / split),
                         "--dtype", "fp32"]) == 0
    cache = FeatureCache(feats / "val")
    assert cache.manifest["model"] == "patchmean" and cache.settings.crop == 32
    # 32x64 image, scale (64, 32) keeps it; 32-px windows with stride 16 -> 3 windows of 4x4 patches
    assert tuple(cache[0].feats.shape) == (3, 16, 4, 4)
    assert cli.main(["rank", "--features", str(feats / "train"), "--out", str(tmp_path / "rankings.json")]) == 0
    rankings = json.loads((tmp_path / "rankings.json").read_text())
    assert list(rankings["classes"]) == cache.class_names and rankings["model"] == "patchmean"


def test_unknown_plugin_module_is_a_clear_error(capsys):
    assert cli.main(["--plugin", "no_such_module_xyz", "rank", "--features", "x", "--out", "y"]) == 2
    assert "no_such_module_xyz" in capsys.readouterr().err
