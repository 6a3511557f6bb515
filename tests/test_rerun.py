"""A rerun equals a fresh run, byte for byte: `rank --images`, `rank --dataset`, `extract` + `evaluate` and `dvc repro`
rerun into their old outputs after inputs were added, deleted and replaced, after a code change that changes the
numbers, with other weights and with other parameters. Whatever is reused (feature caches, ranking checkpoints, text
embeddings) is keyed by all that produced it (floss.util.provenance); the log says what was recomputed and why."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_GELU
from floss import cli
from floss.util import paths
from floss.data.cache import FeatureCache
from layouts import make_dataset, random_image, random_label, write_image, write_label

MODEL = ["--backbone", TINY_GELU, "--device", "cpu", "--workers", "0"]
RANDOM = [*MODEL, "--pretrained", "none"]


def _bytes(*files: Path) -> list[bytes]:
    return [f.read_bytes() for f in files]


def _rankings_outputs(out: Path) -> list[bytes]:
    """The rankings JSON, its experts file and the statistics (``--stats-out out.st``)."""
    return _bytes(out, out.with_name(out.stem + ".experts.json"), out.with_suffix(".st"))


def _rank(args: list[str], out: Path, capsys=None) -> str:
    assert cli.main(["rank", *args, "--out", str(out), "--stats-out", str(out.with_suffix(".st"))]) == 0
    return capsys.readouterr().err if capsys is not None else ""


def _touch_later(path: Path) -> None:
    """A rewrite a second later (mtime resolution of some file systems)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


# ------------------------------------------------------------------------------------- rank --images
def test_rank_images_rerun_after_inputs_deleted_replaced_and_added(tmp_path, capsys):
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    for name in ("a", "b", "c", "d"):
        write_image(images / f"{name}.png", random_image(rng, (40, 56)))
    (tmp_path / "classes.txt").write_text("road\ncar\nsky\n")
    source = ["--model", "maskclip", "--images", str(images), "--classes", str(tmp_path / "classes.txt"), *RANDOM]
    _rank(source, tmp_path / "r.json")
    first = _rankings_outputs(tmp_path / "r.json")

    (images / "b.png").unlink()                                         # deleted
    write_image(images / "c.png", random_image(rng, (40, 56)))          # replaced (new pixels)
    _touch_later(images / "c.png")
    write_image(images / "e.png", random_image(rng, (48, 40)))          # added
    log = _rank(source, tmp_path / "r.json", capsys)
    assert "inputs changed since the checkpoint (1 added: e; 1 deleted: b; 1 replaced: c); ranking from the start" \
        in log
    _rank(source, tmp_path / "fresh.json")
    assert _rankings_outputs(tmp_path / "r.json") == _rankings_outputs(tmp_path / "fresh.json")
    assert _rankings_outputs(tmp_path / "r.json") != first

    # one more image at the end of the order: the checkpoint is extended, not recomputed, and still exact
    write_image(images / "f.png", random_image(rng, (40, 56)))
    log = _rank(source, tmp_path / "r.json", capsys)
    assert "resuming the ranking" in log and "5 of 5 images done" not in log
    _rank(source, tmp_path / "fresh2.json")
    assert _rankings_outputs(tmp_path / "r.json") == _rankings_outputs(tmp_path / "fresh2.json")


# ------------------------------------------------------------------------------------ rank --dataset
@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    from rehearsal import _tiny_weights
    folder = tmp_path_factory.mktemp("weights")
    return [_tiny_weights(Path(TINY_GELU), folder / f"w{seed}.pt", seed) for seed in (0, 1)]


def test_rank_dataset_rerun_with_other_weights_parameters_and_inputs(tmp_path, weight_files, capsys):
    root = make_dataset("cityscapes", tmp_path / "city", n_train=3, n_val=1, size=(32, 64))
    source = ["--model", "maskclip", "--dataset", "cityscapes", "--data-root", str(root), *MODEL]
    out = tmp_path / "r.json"
    _rank([*source, "--pretrained", str(weight_files[0])], out)

    # other weights
    log = _rank([*source, "--pretrained", str(weight_files[1])], out, capsys)
    assert "weights: cached='sha256:" in log and "ranking from the start" in log
    _rank([*source, "--pretrained", str(weight_files[1])], tmp_path / "fresh_w.json")
    assert _rankings_outputs(out) == _rankings_outputs(tmp_path / "fresh_w.json")

    # other parameters (the paper's protocol)
    log = _rank([*source, "--pretrained", str(weight_files[1]), "--protocol", "paper"], out, capsys)
    assert "settings.protocol: cached='authors' expected='paper'" in log
    _rank([*source, "--pretrained", str(weight_files[1]), "--protocol", "paper"], tmp_path / "fresh_p.json")
    assert _rankings_outputs(out) == _rankings_outputs(tmp_path / "fresh_p.json")

    # an image added to the train split (it sorts first: everything is recomputed in the fresh order)
    train = root / "leftImg8bit" / "train"
    city = next(p for p in train.iterdir() if p.is_dir())
    rng = np.random.default_rng(5)
    write_image(city / f"{city.name}_000000_000000_leftImg8bit.png", random_image(rng, (32, 64)))
    write_label(root / "gtFine" / "train" / city.name / f"{city.name}_000000_000000_gtFine_labelTrainIds.png",
                random_label(rng, (32, 64), 19))
    args = [*source, "--pretrained", str(weight_files[1]), "--protocol", "paper"]
    log = _rank(args, out, capsys)
    assert "1 added" in log
    _rank(args, tmp_path / "fresh_i.json")
    assert _rankings_outputs(out) == _rankings_outputs(tmp_path / "fresh_i.json")


# ------------------------------------------------------------------------------- extract + evaluate
def _extract(root: Path, out: Path, *extra: str) -> None:
    assert cli.main(["extract", "--model", "maskclip", "--dataset", "cityscapes", "--split", "val", "--data-root",
                     str(root), "--out", str(out), "--images-per-shard", "2", *RANDOM, *extra]) == 0


def _evaluate(cache: Path, out: Path) -> dict:
    assert cli.main(["evaluate", "--features", str(cache), "--out", str(out), "--device", "cpu"]) == 0
    results = json.loads(out.read_text())
    results["config"].pop("features")          # the cache's path, which differs between the two runs
    return results


def _cache_bytes(cache: Path) -> dict[str, bytes]:
    return {p.relative_to(cache).as_posix(): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}


def test_extract_and_evaluate_rerun_after_inputs_and_parameters_change(tmp_path, capsys):
    root = make_dataset("cityscapes", tmp_path / "city", n_train=1, n_val=5, size=(32, 64))
    cache = tmp_path / "cache"
    _extract(root, cache)
    before = _evaluate(cache, tmp_path / "before.json")

    images = sorted((root / "leftImg8bit" / "val").rglob("*.png"))
    labels = sorted((root / "gtFine" / "val").rglob("*_labelTrainIds.png"))
    rng = np.random.default_rng(7)
    images[4].unlink()                                               # deleted (the last one)
    labels[4].unlink()
    write_image(images[3], random_image(rng, (32, 64)))               # replaced
    _touch_later(images[3])
    write_label(labels[1], random_label(rng, (32, 64), 19))          # a label replaced
    _touch_later(labels[1])
    _extract(root, cache)
    log = capsys.readouterr().err
    ids = [str(p.relative_to(root / "leftImg8bit" / "val")).replace("_leftImg8bit.png", "") for p in images]
    assert f"inputs changed since the last run (1 deleted: {ids[4]}; 2 replaced: {ids[1]}, {ids[3]}): " \
        "re-extracting from image 2 of 4" in log
    _extract(root, tmp_path / "fresh")
    assert _cache_bytes(cache) == _cache_bytes(tmp_path / "fresh")
    after = _evaluate(cache, tmp_path / "after.json")
    assert after == _evaluate(tmp_path / "fresh", tmp_path / "fresh.json") and after != before
    assert FeatureCache(cache).manifest["images"][0]["source"]       # every image is keyed by its files

    # other parameters (fp16 features on disk)
    _extract(root, cache, "--dtype", "fp16")
    assert "dtype: cached='fp32' expected='fp16'" in capsys.readouterr().err
    _extract(root, tmp_path / "fresh16", "--dtype", "fp16")
    assert _cache_bytes(cache) == _cache_bytes(tmp_path / "fresh16")


# -------------------------------------------------------------------------------- a change of code
#: a change of code that changes the numbers, nothing else: cosines scaled (rankings) and the input normalisation
#: shifted (features)
NUMBERS_CHANGE = [
    ("floss/protocol/rendering.py", 'return torch.einsum("ndhw,cqd->ncqhw", feats.double()',
     'return 1.5 * torch.einsum("ndhw,cqd->ncqhw", feats.double()'),
    ("floss/models/preprocess.py", "    return (x - mean) / std\n", "    return (x - 0.5 * mean) / std\n"),
]


def _changed_package(dest: Path) -> Path:
    """A copy of the package, to edit."""
    shutil.copytree(paths.ROOT / "floss", dest / "floss", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _edit(package: Path) -> None:
    for rel, old, new in NUMBERS_CHANGE:
        source = (package / rel).read_text()
        assert source.count(old) == 1, f"{rel}: the line to change moved"
        (package / rel).write_text(source.replace(old, new))


def _cli(package: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": f"{package}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-m", "floss", *args], env=env, capture_output=True, text=True,
                         cwd=package)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stderr


def test_a_code_change_recomputes_caches_checkpoints_and_text(tmp_path, weight_files):
    """The user edits the code (cosines scaled, normalisation shifted): the same commands into the same outputs
    recompute, say why, and equal a fresh run of the edited code; the text-embedding cache is keyed by the code."""
    root = make_dataset("cityscapes", tmp_path / "city", n_train=2, n_val=2, size=(32, 64))
    package = _changed_package(tmp_path / "pkg")
    model = [*MODEL, "--pretrained", str(weight_files[0]), "--text-cache", str(tmp_path / "text")]
    rank = ["rank", "--model", "naclip", "--dataset", "cityscapes", "--data-root", str(root), *model]
    extract = ["extract", "--model", "naclip", "--dataset", "cityscapes", "--split", "val", "--data-root",
               str(root), *model]
    _cli(package, *rank, "--out", str(tmp_path / "r.json"))
    _cli(package, *extract, "--out", str(tmp_path / "cache"))
    old = _bytes(tmp_path / "r.json") + [FeatureCache(tmp_path / "cache")[0].feats.numpy().tobytes()]
    assert len(list((tmp_path / "text").glob("*.safetensors"))) == 1
    _edit(package)
    log = _cli(package, *rank, "--out", str(tmp_path / "r.json"))
    assert "code.floss: cached='sha256:" in log and "ranking from the start" in log
    log = _cli(package, *extract, "--out", str(tmp_path / "cache"))
    assert "code.floss: cached='sha256:" in log and "extracting every image again" in log
    assert len(list((tmp_path / "text").glob("*.safetensors"))) == 2       # not the old code's embeddings
    fresh = [*model[:-1], str(tmp_path / "text2")]
    _cli(package, *rank[:-len(model)], *fresh, "--out", str(tmp_path / "fresh.json"))
    _cli(package, *extract[:-len(model)], *fresh, "--out", str(tmp_path / "fresh"))
    assert _bytes(tmp_path / "r.json") == _bytes(tmp_path / "fresh.json")
    assert _cache_bytes(tmp_path / "cache") == _cache_bytes(tmp_path / "fresh")
    new = _bytes(tmp_path / "r.json") + [FeatureCache(tmp_path / "cache")[0].feats.numpy().tobytes()]
    assert new[0] != old[0] and new[1] != old[1]          # the edit changed both the rankings and the features


def test_the_edited_copy_is_what_runs(tmp_path):
    package = _changed_package(tmp_path / "pkg")
    env = {**os.environ, "PYTHONPATH": str(package)}
    run = subprocess.run([sys.executable, "-c", "import floss; print(floss.__file__)"], env=env, cwd=package,
                         capture_output=True, text=True, check=True)
    assert Path(run.stdout.strip()).resolve() == (package / "floss" / "__init__.py").resolve()


# ---------------------------------------------------------------------------------------- dvc repro
@pytest.mark.slow
def test_dvc_repro_after_a_code_change_equals_a_fresh_repro(tmp_path):
    """`dvc repro` of a one-model demo in a scratch copy; the protocol is edited; `dvc repro` again equals a
    repro from nothing of the edited tree (the rank and evaluate stages depend on the code identity)."""
    import yaml

    from rehearsal import copy_repository, git_env

    repo = copy_repository(paths.ROOT, tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["models"] = {"maskclip": ["cityscapes"]}
    params["transfer"] = {"models": [], "datasets": []}
    params["synthetic"]["images"] = {"cityscapes": {"train": 3, "val": 2}}
    params["low_data"].update(model="maskclip", datasets=["cityscapes"])
    params["evaluate"]["per_template"] = False
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    env = {**git_env(), "CUDA_VISIBLE_DEVICES": "", "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
           f"{os.environ['PATH']}", "PYTHONPATH": str(repo), "FLOSS_ROOT": str(repo)}
    outputs = ["results/rankings/maskclip", "results/eval/maskclip", "results/stats/maskclip"]

    def repro() -> dict[str, bytes]:
        run = subprocess.run([dvc, "repro", "evaluate@maskclip"], cwd=repo, env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
        return {str(p.relative_to(repo)): p.read_bytes() for o in outputs for p in sorted((repo / o).rglob("*"))
                if p.is_file()}

    first = repro()
    _edit(repo)
    rerun = repro()
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / "results")
    fresh = repro()
    assert rerun == fresh
    assert rerun != first


@pytest.mark.slow
def test_dvc_repro_paper_profile_after_inputs_weights_and_params_change_equals_a_fresh_repro(tmp_path):
    """The paper profile on one model and one dataset (images on disk, weights as files): `dvc repro` after an
    image deleted, replaced and added equals a repro from nothing; so does one with other weights and another
    parameter. DVC sees the images through the `inputs` stage."""
    import yaml

    from rehearsal import _tiny_weights, copy_repository, git_env

    repo = copy_repository(paths.ROOT, tmp_path / "repo")
    root = make_dataset("cityscapes", tmp_path / "data" / "cityscapes", n_train=3, n_val=2, size=(32, 64))
    weights = [_tiny_weights(Path(TINY_GELU), tmp_path / f"w{seed}.pt", seed) for seed in (0, 1)]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params.update(profile="paper", data_root=str(tmp_path / "data"))
    params["models"] = {"maskclip": ["cityscapes"]}
    params["transfer"] = {"models": [], "datasets": []}
    params["low_data"].update(model="maskclip", datasets=["cityscapes"])
    params["evaluate"]["per_template"] = False
    params["extract"]["workers"] = 0
    params["extract"]["weights"]["maskclip"] = {"backbone": TINY_GELU, "pretrained": str(weights[0]),
                                                "checkpoint": None}

    def write_params() -> None:
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    write_params()
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    env = {**git_env(), "CUDA_VISIBLE_DEVICES": "", "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
           f"{os.environ['PATH']}", "PYTHONPATH": str(repo), "FLOSS_ROOT": str(repo), "TQDM_DISABLE": "1",
           "FLOSS_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    outputs = ["results/rankings/maskclip", "results/eval/maskclip", "results/stats/maskclip"]

    def repro(fresh: bool = False) -> dict[str, bytes]:
        if fresh:
            shutil.rmtree(repo / "data", ignore_errors=True)
            shutil.rmtree(repo / "results", ignore_errors=True)
        run = subprocess.run([dvc, "repro", "evaluate@maskclip"], cwd=repo, env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
        return {str(p.relative_to(repo)): p.read_bytes() for o in outputs for p in sorted((repo / o).rglob("*"))
                if p.is_file()}

    first = repro()
    rng = np.random.default_rng(11)
    train = sorted((root / "leftImg8bit" / "train").rglob("*.png"))
    val = sorted((root / "leftImg8bit" / "val").rglob("*.png"))
    train[1].unlink()                                                       # deleted (train: ranked)
    write_image(train[2], random_image(rng, (32, 64)))                      # replaced
    _touch_later(train[2])
    write_image(val[0], random_image(rng, (32, 64)))                        # replaced (val: evaluated)
    _touch_later(val[0])
    added = val[1].with_name(val[1].name.replace("000001", "000009"))       # added, with its label
    write_image(added, random_image(rng, (32, 64)))
    label = root / "gtFine" / "val" / added.relative_to(root / "leftImg8bit" / "val")
    write_label(label.with_name(label.name.replace("leftImg8bit", "gtFine_labelTrainIds")),
                random_label(rng, (32, 64), 19))
    rerun = repro()
    assert rerun != first and rerun == repro(fresh=True)

    params["extract"]["weights"]["maskclip"]["pretrained"] = str(weights[1])    # other weights
    params["evaluate"]["n_experts"] = 8                                         # another parameter
    write_params()
    other = repro()
    assert other != rerun and other == repro(fresh=True)
