"""The pipeline's stages with a template file and with worker processes: the one extract stage (every model),
rank and evaluate spread over `cpu_workers` processes write byte-identical files to a run in one process, and a
`templates` file flows from params.yaml to the caches, rankings and results."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from floss.util import paths
from floss.pipeline.params import validate_params

PARAMS = yaml.safe_load((paths.ROOT / "params.yaml").read_text())
CLIP_7 = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
          "a {} in a video game.", "art of the {}.", "a photo of the small {}."]


def _run(root: Path, monkeypatch, workers: int, templates: Path | None) -> dict[str, bytes]:
    import torch

    from floss import pipeline

    for name, sub in (("ROOT", ""), ("DATA", "data"), ("METRICS", "metrics")):
        monkeypatch.setattr(paths, name, root / sub if sub else root)
    params = copy.deepcopy(PARAMS)
    params["models"] = {"maskclip": ["cityscapes", "pascalvoc20"], "naclip": ["cityscapes"]}
    params["transfer"] = {"models": [], "datasets": []}
    params["synthetic"]["images"] = {"cityscapes": {"train": 3, "val": 2}, "pascalvoc20": {"train": 3, "val": 2}}
    params["rank"]["metrics"] = ["entropy", "avgprob", "mano"]
    params["evaluate"]["fusions"] = ["highest"]
    params["low_data"].update(model="maskclip", datasets=["cityscapes"])
    params["cpu_workers"] = workers
    params["templates"] = str(templates) if templates else None
    if templates:                     # the expert counts are bounded by M = 7
        params["topn"], params["oracle"]["ns"], params["synthetic"]["planted_per_class"] = [1, 2, 4], [1, 2], 2
    params = validate_params(params)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipeline.stage_extract(params)                   # DVC's one extract stage: every model of the matrix
        for model in params["models"]:
            pipeline.stage_rank(params, model)
            pipeline.stage_evaluate(params, model)
    finally:
        torch.set_num_threads(threads)
    return {p.relative_to(root).as_posix(): p.read_bytes() for top in ("results", "data/features")
            for p in sorted((root / top).rglob("*")) if p.is_file()}


def test_workers_write_the_bytes_of_one_process(tmp_path, monkeypatch):
    one = _run(tmp_path / "one", monkeypatch, 1, None)
    two = _run(tmp_path / "two", monkeypatch, 2, None)
    assert one.keys() == two.keys() and len(one) > 20
    assert [k for k in one if one[k] != two[k]] == []
    assert {"results/eval/maskclip/pascalvoc20.json", "results/eval/naclip/cityscapes.json",
            "results/rankings/maskclip/template_rankings_maskclip_cityscapes.mano.json"} <= set(one)


def test_a_template_file_flows_through_the_stages(tmp_path, monkeypatch):
    templates = tmp_path / "clip7.txt"
    templates.write_text("\n".join(CLIP_7) + "\n")
    files = _run(tmp_path / "run", monkeypatch, 2, templates)
    rankings = json.loads(files["results/rankings/maskclip/template_rankings_maskclip_cityscapes.json"])
    assert rankings["templates"] == CLIP_7
    assert all(0 <= e["template_id"] < 7 for c in rankings["classes"].values() for e in c["entropy_ranking"])
    res = json.loads(files["results/eval/naclip/cityscapes.json"])
    assert res["templates"] == CLIP_7 and len(res["per_template"]) == 7
    assert all(max(e) < 7 for e in res["experts"])
    manifest = json.loads(files["data/features/maskclip/pascalvoc20/val/manifest.json"])
    assert manifest["templates"] == CLIP_7 and manifest["num_templates"] == 7


def test_extract_without_a_model_on_the_command_line(tmp_path):
    """`python -m floss.pipeline stage extract` (dvc.yaml's command) needs no --model; rank and evaluate do."""
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-m", "floss.pipeline", "stage", "rank"], capture_output=True, text=True)
    assert run.returncode == 2 and "--model is required" in run.stderr
    stages = yaml.safe_load((paths.ROOT / "dvc.yaml").read_text())["stages"]
    assert stages["extract"]["cmd"] == "python -m floss.pipeline stage extract"
    assert "foreach" not in stages["extract"] and "foreach" in stages["rank"]
    with pytest.raises(KeyError):
        stages["extract"]["do"]
