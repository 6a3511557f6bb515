"""Outputs written through a temporary file (then ``os.replace``) get the mode the umask gives a new file (0644 under
umask 022, 0600 under 077), not the 0600 of ``tempfile.mkstemp``, and leave no temporary file behind."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch

from conftest import TINY_GELU
from floss import cli
from floss.util.io import atomic_write, atomic_write_json, save_results
from floss.core.rankings import save_rankings
from floss.core.stats import TemplateStats
from floss.core.templates import NUM_TEMPLATES
from layouts import random_image, write_image

MODEL = ["--backbone", TINY_GELU, "--pretrained", "none", "--device", "cpu", "--workers", "0"]
UMASKS = [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)]


@pytest.fixture(params=UMASKS, ids=lambda p: f"umask{p[0]:03o}")
def umask(request):
    mask, mode = request.param
    old = os.umask(mask)
    try:
        yield mode
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _no_temporaries(folder) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_json_and_safetensors_writers(tmp_path, umask):
    from safetensors.torch import save_file
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write(tmp_path / "t.safetensors", lambda tmp: save_file({"x": torch.zeros(2)}, tmp))
    conf = save_results({"m": 1}, {"c": torch.zeros(2, 2)}, tmp_path / "results.json")
    for name in ("a.json", "t.safetensors", "results.json", conf.name):
        assert _mode(tmp_path / name) == umask, name
    _no_temporaries(tmp_path)


def _rankings():
    entries = [{"template_id": t, "entropy": float(t), "pixel_percentage": 1.0, "rank": t + 1}
               for t in range(NUM_TEMPLATES)]
    return {"model": "m", "dataset": "d", "split": "s", "classes": {"a": {"entropy_ranking": entries}}}


def test_rankings_and_statistics_writers(tmp_path, umask):
    save_rankings(_rankings(), tmp_path / "r.json")
    assert _mode(tmp_path / "r.json") == umask
    stats = TemplateStats(num_templates=2, num_classes=2)
    stats.save(tmp_path / "s.safetensors")
    assert _mode(tmp_path / "s.safetensors") == umask
    _no_temporaries(tmp_path)


def test_figure_writer(tmp_path, umask):
    import matplotlib.pyplot as plt
    from floss.report.plots import save_figure
    fig = plt.figure(figsize=(1, 1))
    paths = save_figure(fig, 1, "modes", root=tmp_path)
    assert {_mode(p) for p in paths.values()} == {umask}
    _no_temporaries(next(iter(paths.values())).parent)


def test_rank_cli_outputs(tmp_path):
    rng = np.random.default_rng(0)
    write_image(tmp_path / "images" / "a.png", random_image(rng, (32, 48)))
    (tmp_path / "classes.txt").write_text("road\nsky\n")
    for mask, mode in UMASKS[:2]:
        out = tmp_path / f"out{mask:03o}"
        old = os.umask(mask)
        try:
            assert cli.main(["rank", "--model", "maskclip", "--images", str(tmp_path / "images"), "--classes",
                             str(tmp_path / "classes.txt"), *MODEL, "--out", str(out / "r.json"),
                             "--stats-out", str(out / "s.safetensors")]) == 0
        finally:
            os.umask(old)
        written = {p.relative_to(out).as_posix(): _mode(p) for p in out.rglob("*") if p.is_file()}
        assert {"r.json", "r.experts.json", "s.safetensors"} <= set(written)
        assert json.loads((out / "r.json").read_text())["classes"].keys() == {"road", "sky"}
        assert written == dict.fromkeys(written, mode)
