"""The speed-per-model benchmark (benchmarks/bench_models.py) runs as the README prints its command, in its tiny
mode on one model and two datasets, and reports a table and a JSON of the expected structure. No timing threshold:
speed is measured by the benchmark, not asserted by a test."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest

from floss.util import paths

pytestmark = pytest.mark.slow

README = paths.ROOT / "README.md"
TINY_MODE = ["--shapes", "tiny", "--models", "maskclip", "--datasets", "pascalvoc20", "cityscapes", "--repeats", "1"]


def readme_command() -> list[str]:
    """The benchmark command of the README's "Speed per model" subsection, as printed (environment prefix apart)."""
    text = README.read_text()
    section = text[text.index("### Speed per model"):]
    match = re.search(r"`((?:CUDA_VISIBLE_DEVICES= )?python benchmarks/bench_models\.py[^`]*)`", section)
    assert match, "README: the Speed per model subsection prints no `python benchmarks/bench_models.py ...` command"
    words = shlex.split(match.group(1))
    if words[0] == "CUDA_VISIBLE_DEVICES=":
        words = words[1:]
    assert words[0] == "python"
    return words[1:]


def test_readme_command_in_tiny_mode(tmp_path):
    args = readme_command()
    out = tmp_path / "speed.json"
    if "--out" in args:                       # the README's output file, redirected into tmp_path
        i = args.index("--out")
        del args[i:i + 2]
    run = subprocess.run([sys.executable, *args, *TINY_MODE, "--out", str(out)], capture_output=True, text=True,
                         cwd=paths.ROOT, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin",
                                              "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(paths.ROOT)},
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    report = json.loads(out.read_text())
    env = report["environment"]
    assert env["device"] == "cpu" and env["threads"] >= 1 and env["torch"] and env["cpu"]
    assert len(report["load_average_before"]) == 3 and len(report["load_average_after"]) == 3
    assert report["repeats"] == 1 and "random" in report["weights"]
    (entry,) = report["results"]
    assert entry["shape"] == "tiny" and entry["model"] == "maskclip" and entry["not_run"] == []
    assert [r["dataset"] for r in entry["datasets"]] == ["pascalvoc20", "cityscapes"]
    for result in entry["datasets"]:
        assert result["images_per_s"] > 0 and result["s_per_image"] > 0 and len(result["seconds"]) == 1
        assert result["windows"] >= 1 and result["prepare_s_per_image"] + result["encode_s_per_image"] \
            == pytest.approx(result["s_per_image"])
    city = entry["datasets"][1]
    assert city["image_size"] == [1024, 2048] and city["resized_size"] == [448, 896]    # MaskCLIP: (896, 448)

    table = run.stdout[run.stdout.index("## tiny"):].splitlines()
    assert "| model | pascalvoc20 | cityscapes |" in table
    row = next(line for line in table if line.startswith("| maskclip |"))
    assert re.fullmatch(r"\| maskclip \| [0-9.e+-]+ \([0-9.e+-]+ s\) \| [0-9.e+-]+ \([0-9.e+-]+ s\) \|", row), row
