"""The prepared GPU profile (benchmarks/gpu_profile.py) runs end to end in its --tiny CPU mode and reports every
step with its time split and a paper-profile extrapolation (the GPU run itself needs a GPU machine)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from floss.util import paths

pytestmark = pytest.mark.slow


def test_gpu_profile_tiny_mode(tmp_path):
    out = tmp_path / "profile.json"
    run = subprocess.run([sys.executable, str(paths.ROOT / "benchmarks/gpu_profile.py"), "--tiny", "--out", str(out),
                          "--images", "1", "--workers", "0", "--scenarios", "cityscapes", "--models", "naclip"],
                         capture_output=True, text=True, cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": "",
                                                                             "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["tiny"] is True
    (result,) = report["results"]
    assert set(result["steps"]) == {"extract", "rank", "rank-images", "evaluate"}
    for step in result["steps"].values():
        assert step["images_per_s"] > 0 and step["seconds"] > 0
        assert sum(step["parts_s"].values()) == pytest.approx(step["seconds"], rel=0.05)
    assert "encoder" in result["steps"]["extract"]["parts_s"]
    assert "statistics" in result["steps"]["rank"]["parts_s"] and "rendering" in result["steps"]["evaluate"]["parts_s"]
    assert report["paper_profile"]["hours"] > 0
    assert "paper profile (extrapolated)" in run.stdout
