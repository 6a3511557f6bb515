"""The pipeline: dvc.yaml against params.yaml and the notebooks, params validation, the authors' data, the stages."""
from __future__ import annotations

import ast
import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from floss.util import paths
from floss.pipeline.params import ParamsError, load_params, validate_params
from floss.pipeline import NOTEBOOK_PARAMS, notebook_command, notebook_parameters, torchrun_command

ROOT = paths.ROOT
DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
AUTHORS = paths.SHARED / "reference" / "authors"


def _stages() -> dict[str, dict]:
    """dvc.yaml stages with foreach expanded (``${key}`` / ``${item}``), as DVC names them."""
    out = {}
    for name, stage in DVC_YAML["stages"].items():
        if "foreach" not in stage:
            out[name] = stage
            continue
        source = stage["foreach"].strip("${}").split(".")
        node = PARAMS
        for part in source:
            node = node[part]
        items = node.items() if isinstance(node, dict) else ((v, v) for v in node)
        for key, item in items:
            text = json.dumps(stage["do"]).replace("${key}", str(key))
            out[f"{name}@{key}"] = json.loads(text.replace("${item}", str(item)))
    return out


def _has_key(params: dict, dotted: str) -> bool:
    node = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _outs(stage: dict) -> set[str]:
    return {next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])}


def test_every_stage_param_exists_and_params_validate():
    load_params()
    for name, stage in _stages().items():
        for key in stage.get("params", []):
            assert isinstance(key, str) and _has_key(PARAMS, key), f"stage {name}: params key {key!r} not in params.yaml"


def test_the_report_stage_runs_every_notebook_with_the_params_they_read():
    sources = {p.stem for p in paths.NOTEBOOKS.glob("*.py")}
    report = _stages()["report"]
    assert sources == set(NOTEBOOK_PARAMS), "every notebook has exactly one parameter mapping"
    assert report["cmd"] == "python -m floss.pipeline notebooks"
    assert set(report["params"]) == {k for m in NOTEBOOK_PARAMS.values() for k in m.values()}
    assert {f"notebooks/{name}.py" for name in sources} <= set(report["deps"])
    # the executed notebooks (timings, absolute paths) are logs, not outs: dvc.lock stays machine-independent
    assert not any(o.startswith("reports/") for o in _outs(report))
    for name in sources:
        declared = _notebook_parameters(name)
        assert set(NOTEBOOK_PARAMS[name]) <= set(declared), f"{name}: unknown papermill parameters"


def _notebook_parameters(name: str) -> dict:
    """Names and defaults of the `# %% tags=["parameters"]` cell of a notebook."""
    text = (paths.NOTEBOOKS / f"{name}.py").read_text()
    cell = text.split('# %% tags=["parameters"]', 1)[1].split("\n# %%", 1)[0]
    values = {}
    for node in ast.parse(cell).body:
        if isinstance(node, ast.Assign):
            values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def _written_patterns(name: str) -> list[tuple[str, tuple[str, ...]]]:
    """Regexes of the table/figure files a notebook writes (write_table / save_figure calls, read statically;
    a number or slug given by a variable or an f-string matches any word)."""
    tree = ast.parse((paths.NOTEBOOKS / f"{name}.py").read_text())
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        if node.func.attr == "write_table":
            slug, number, folder, prefix, exts = node.args[1], node.args[2], "tables", "tab", ("md", "tex", "csv")
        elif node.func.attr == "save_figure":
            number, slug, folder, prefix, exts = node.args[1], node.args[2], "figures", "fig", ("png", "pdf")
        else:
            continue

        def part(arg):
            if isinstance(arg, ast.Constant):
                return re.escape(str(arg.value))
            if isinstance(arg, ast.JoinedStr):
                return "".join(re.escape(v.value) if isinstance(v, ast.Constant) else r"\w+" for v in arg.values)
            return r"\w+"
        found.append((f"{folder}/{prefix}{part(number)}_{part(slug)}", exts))
    return found


def test_every_table_and_figure_a_notebook_writes_is_a_declared_out():
    stages = _stages()
    report = stages["report"]
    written = [o for o in _outs(report) if o.startswith(("tables/", "figures/"))]
    patterns = [p for name in NOTEBOOK_PARAMS for p in _written_patterns(name)]
    for name in NOTEBOOK_PARAMS:
        assert _written_patterns(name), f"{name} writes no table or figure"
    for pattern, exts in patterns:
        for ext in exts:
            assert any(re.fullmatch(f"{pattern}\\.{ext}", o) for o in written), \
                f"writes {pattern}.{ext} but dvc.yaml declares no such out"
    for out in written:       # and nothing is declared that no notebook can write
        assert any(re.fullmatch(f"{p}\\.({'|'.join(e)})", out) for p, e in patterns), out
    for out in written:       # small text/PNG outs live in git (README), not in the DVC cache
        entry = next(o for o in report["outs"] if isinstance(o, dict) and out in o)
        assert entry[out] == {"cache": False}
    # after a pipeline run: every file in tables/ and figures/ belongs to a stage
    declared = set().union(*(_outs(s) for s in stages.values()))
    made = [p.relative_to(ROOT).as_posix() for d in (paths.TABLES, paths.FIGURES) if d.is_dir()
            for p in d.iterdir() if p.is_file() and not p.name.startswith(".")]
    assert not [m for m in made if m not in declared], "undeclared files in tables/ or figures/"


def _mutated(path: str, value):
    params = copy.deepcopy(PARAMS)
    node = params
    *parents, last = path.split(".")
    for part in parents:
        node = node[part]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return params


@pytest.mark.parametrize("path, value, message", [
    ("profile", "full", "profile: expected one of demo, paper, got 'full'"),
    ("evaluate.n_experts", 0, "evaluate.n_experts: expected an integer in 1..80, got 0"),
    ("evaluate.n_experts", 81, "evaluate.n_experts: expected an integer in 1..80, got 81"),
    ("evaluate.fusions", ["highest", "max"], "evaluate.fusions[1]: expected one of"),
    ("evaluate.metric", "iou", "evaluate.metric: expected one of entropy"),
    ("rank.metrics", ["entropy", "confidence"], "rank.metrics[1]: expected one of"),
    ("models.segformer", ["cityscapes"], "models: expected one of maskclip"),
    ("models.maskclip", ["cityscapes", "kitti"], "models.maskclip[1]: expected one of"),
    ("transfer.datasets", ["acdc_dusk"], "transfer.datasets[0]"),
    ("extract.gpus", 0, "extract.gpus: expected an integer in 1..64, got 0"),
    ("extract.device", "tpu", "extract.device: expected auto, cpu, cuda or cuda:N"),
    ("extract.precision", "bf16", "extract.precision: expected one of auto, fp32, fp16, got 'bf16'"),
    ("extract.cache_dtype", "int8", "extract.cache_dtype: expected one of fp32, fp16, got 'int8'"),
    ("extract.workers", -1, "extract.workers: expected an integer in 0..64, got -1"),
    ("rank.source", "disk", "rank.source: expected one of images, cache, got 'disk'"),
    ("extract.weights.naclip", {"backbone": "ViT-B-16"}, "extract.weights.naclip"),
    ("synthetic.images.cityscapes", {"train": 0, "val": 4}, "synthetic.images.cityscapes.train"),
    ("evaluate.per_template", "yes", "evaluate.per_template: expected true or false"),
    ("evaluate.typo", 1, "evaluate: unknown key(s) ['typo']"),
    ("rank", KeyError, "rank: missing"),
    ("oracle.rhos", [0.0, 0.3], "oracle.rhos: expected"),
    ("topn", [0, 4], "topn: expected"),
    ("low_data.model", "segformer", "low_data.model: expected one of"),
    ("authors.url", "ftp://example.org", "authors.url: expected an http(s) URL"),
])
def test_bad_params_fail_naming_the_key(path, value, message):
    with pytest.raises(ParamsError, match=re.escape(f"params.yaml: {message}")):
        validate_params(_mutated(path, value))


def test_paper_profile_needs_an_existing_data_root(tmp_path):
    with pytest.raises(ParamsError, match="params.yaml: data_root: expected the folder of the datasets"):
        validate_params(_mutated("profile", "paper"))
    params = _mutated("profile", "paper")
    params["data_root"] = str(tmp_path / "absent")
    with pytest.raises(ParamsError, match="data_root: expected an existing folder"):
        validate_params(params)


def test_check_params_command_exits_2_with_the_key(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(_mutated("evaluate.n_experts", 0)))
    run = subprocess.run([sys.executable, "-m", "floss.pipeline", "check-params", "--params", str(bad)],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2
    assert "evaluate.n_experts: expected an integer in 1..80, got 0" in run.stderr
    ok = subprocess.run([sys.executable, "-m", "floss.pipeline", "check-params"], capture_output=True, text=True,
                        cwd=ROOT)
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("stage", ["inputs", "extract", "rank", "evaluate", "transfer", "metrics", "authors"])
def test_only_the_stages_that_open_weights_or_images_check_them(tmp_path, monkeypatch, stage):
    """The paper profile's weights and dataset folders are checked by the stages that open them (``inputs``,
    first in every run, refuses a problem before any heavy work); the stages that read caches only skip the check
    and with it the import of open_clip (issue 14: no stage imports open_clip unless it builds a model)."""
    import floss.pipeline as pipeline
    import floss.pipeline.params as params_module

    params = _mutated("profile", "paper")
    params["data_root"] = str(tmp_path)            # an empty folder: the check would refuse it
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    checked = []
    monkeypatch.setattr(params_module, "check_paper_inputs", lambda p: checked.append(stage))
    for name in ("stage_extract", "stage_rank", "stage_evaluate", "stage_transfer", "stage_metrics", "stage_inputs"):
        monkeypatch.setattr(pipeline, name, lambda *a, **k: None)
    monkeypatch.setattr(pipeline, "stage_authors", lambda p: {"available": False})
    assert pipeline.main(["stage", stage, "--params", str(path)] + (["--model", "maskclip"]
                                                                    if stage in ("rank", "evaluate") else [])) == 0
    assert checked == ([stage] if stage in ("inputs", "extract", "rank") else [])


@pytest.mark.parametrize("command", [["notebooks"], ["notebook", "tab1_main_results"]])
def test_the_report_reads_results_without_checking_weights(tmp_path, monkeypatch, command):
    """The notebooks read results only: a paper-profile report runs where the weights and datasets are absent."""
    import floss.pipeline as pipeline
    import floss.pipeline.params as params_module

    params = _mutated("profile", "paper")
    params["data_root"] = str(tmp_path)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    checked, ran = [], []
    monkeypatch.setattr(params_module, "check_paper_inputs", lambda p: checked.append(1))
    monkeypatch.setattr(pipeline, "run_notebooks", lambda p, names, workers: ran.append(p["profile"]))
    monkeypatch.setattr(pipeline, "run_notebook", lambda p, name: ran.append(p["profile"]))
    assert pipeline.main(command + ["--params", str(path)]) == 0
    assert ran == ["paper"] and checked == []


def test_commands_built_from_params(tmp_path, monkeypatch):
    params = copy.deepcopy(PARAMS)
    params["extract"]["gpus"] = 4
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cmd = torchrun_command(params, ["stage", "extract", "--model", "naclip_vitl14"])
    assert cmd[1:5] == ["--standalone", "--nproc_per_node=4", "-m", "floss.pipeline"]
    assert cmd[5:] == ["stage", "extract", "--model", "naclip_vitl14"]
    monkeypatch.setenv("WORLD_SIZE", "4")            # already a torchrun rank: run in this process
    assert torchrun_command(params, ["stage", "rank"]) is None
    params["extract"]["gpus"] = 1
    monkeypatch.delenv("WORLD_SIZE")
    assert torchrun_command(params, ["stage", "rank"]) is None
    assert notebook_parameters(PARAMS, "tab1_main_results") == {"matrix": PARAMS["models"]}
    nb = notebook_command(PARAMS, "fig3_low_data")
    assert "| papermill - " in nb and "-k python3 --log-output --no-progress-bar" in nb
    injected = yaml.safe_load(nb.split(" -y ", 1)[1].strip("'"))
    assert injected["sizes"] == PARAMS["low_data"]["sizes"] and injected["n"] == PARAMS["evaluate"]["n_experts"]


def test_default_params_need_nothing_outside_the_repository():
    """Defaults are what users get: nothing points at the development sandbox (../shared)."""
    assert PARAMS["authors"]["local"] is None
    assert PARAMS["authors"]["url"].endswith("/ccf1d49dba37d0e35316dc50be57d133745a168a")
    for name in ("params.yaml", "dvc.yaml", "Makefile", "pyproject.toml"):
        assert "../shared" not in (ROOT / name).read_text(), name


@pytest.mark.skipif(not AUTHORS.is_dir(), reason="../shared/reference/authors is absent")
def test_authors_fetch_with_local_override(tmp_path):
    from floss.data.authors import fetch_authors

    dest = fetch_authors(tmp_path / "authors", url="http://127.0.0.1:9", local=AUTHORS)
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.json"))
    assert len(files) == 17 and "top4_experts.json" in files
    assert json.loads((dest / "top4_experts.json").read_text()) == json.loads((AUTHORS / "top4_experts.json").read_text())
    # a broken copy is refused before anything is written
    broken = tmp_path / "broken"
    shutil.copytree(AUTHORS, broken)
    path = broken / "rankings/maskclip/template_rankings_maskclip_cityscapes.json"
    doc = json.loads(path.read_text())
    doc["classes"]["road"]["entropy_ranking"][0]["rank"] = 7
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="rank"):
        fetch_authors(tmp_path / "never", url="http://127.0.0.1:9", local=broken)
    assert not (tmp_path / "never").exists()


def test_authors_download_fails_fast_naming_the_override(tmp_path):
    from floss.data.authors import fetch_authors

    with pytest.raises(ConnectionError, match="authors.local"):
        fetch_authors(tmp_path / "authors", url="http://127.0.0.1:9/FLOSS", timeout=5)
    with pytest.raises(FileNotFoundError, match="authors.local"):
        fetch_authors(tmp_path / "authors", url="http://127.0.0.1:9", local=tmp_path / "nowhere")


def test_authors_stage_records_unavailable_data_and_never_fails(tmp_path):
    """Offline and no local copy: the stage succeeds, records why, and says how to get the data."""
    from floss.data.authors import GET_IT, authors_status, obtain_authors, unavailable_note

    status = obtain_authors(tmp_path / "data/authors", url="http://127.0.0.1:9/FLOSS", timeout=5,
                            local=tmp_path / "nowhere")
    assert status["available"] is False and status["get_it"] == GET_IT
    assert [r.split(" ", 1)[0] for r in status["reasons"]] == ["local", "url"]
    assert authors_status(tmp_path) == status
    assert sorted(p.name for p in (tmp_path / "data/authors").iterdir()) == ["status.json"]
    note = unavailable_note(status)
    assert "unavailable" in note and "dvc repro" in note and "authors.local" in note
    # what tables and figures print does not depend on how the machine's network fails
    assert "(the pinned URL: no network access)" in note and "127.0.0.1" not in note


@pytest.mark.skipif(not AUTHORS.is_dir(), reason="../shared/reference/authors is absent")
def test_authors_stage_with_a_local_copy(tmp_path):
    from floss.data.authors import authors_status, obtain_authors

    status = obtain_authors(tmp_path / "data/authors", url="http://127.0.0.1:9/FLOSS", local=AUTHORS, timeout=5)
    assert status["available"] is True and status["source"] == f"local:{AUTHORS}"
    assert authors_status(tmp_path)["available"] and (tmp_path / "data/authors/top4_experts.json").is_file()


def test_demo_stages_end_to_end(tmp_path, monkeypatch):
    """extract -> rank -> evaluate -> transfer -> metrics on a tiny demo matrix in a scratch root."""
    import torch

    from floss import pipeline

    for name, sub in (("ROOT", ""), ("DATA", "data"), ("METRICS", "metrics")):
        monkeypatch.setattr(paths, name, tmp_path / sub if sub else tmp_path)
    params = copy.deepcopy(PARAMS)
    params["models"] = {"maskclip": ["cityscapes"]}
    params["transfer"] = {"models": ["maskclip"], "datasets": ["acdc_night"]}
    params["synthetic"]["images"] = {"cityscapes": {"train": 4, "val": 3}, "transfer": {"val": 2}}
    params["rank"]["metrics"] = ["entropy", "avgprob"]
    params["evaluate"]["fusions"] = ["highest", "average"]
    params["low_data"].update(model="maskclip", datasets=["cityscapes"])
    params = validate_params(params)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipeline.stage_extract(params, "maskclip")
        pipeline.stage_rank(params, "maskclip")
        pipeline.stage_evaluate(params, "maskclip")
        pipeline.stage_transfer(params)
        metrics = json.loads(pipeline.stage_metrics(params).read_text())
    finally:
        torch.set_num_threads(threads)
    assert sorted(p.relative_to(tmp_path / "data/features/maskclip").as_posix()
                  for p in (tmp_path / "data/features/maskclip").glob("*/*")) == \
        ["acdc_night/val", "cityscapes/train", "cityscapes/val"]
    rankings = tmp_path / "results/rankings/maskclip"
    assert sorted(p.name for p in rankings.iterdir()) == [
        "template_rankings_maskclip_cityscapes.avgprob.json", "template_rankings_maskclip_cityscapes.json"]
    assert (tmp_path / "results/stats/maskclip/cityscapes.safetensors").is_file()
    res = json.loads((tmp_path / "results/eval/maskclip/cityscapes.json").read_text())
    assert res["source"] == "synthetic" and res["model"] == "maskclip"
    assert set(res["methods"]) == {"baseline", "floss", "floss_highest", "floss_average"}
    assert len(res["per_template"]) == 80 and (tmp_path / "results/eval/maskclip/cityscapes.confusion.safetensors").is_file()
    assert set(metrics["maskclip"]) == {"cityscapes", "acdc_night"}
    assert metrics["maskclip"]["cityscapes"] == {"baseline": round(res["methods"]["baseline"]["miou"], 2),
                                                 "floss": round(res["methods"]["floss"]["miou"], 2)}
    with pytest.raises(ValueError, match="--dataset/--split"):
        pipeline.stage_rank(params, "maskclip", "ade20k")


def test_dvc_lock_is_up_to_date():
    """dvc.lock matches the code, notebooks, params and stage list of this commit: every dependency that git tracks
    hashes as recorded (data outputs are absent from a fresh clone, so `deleted` there is expected)."""
    if not (ROOT / "dvc.lock").is_file():
        pytest.skip("dvc.lock is absent: the pipeline has not been run and committed yet (dvc repro)")
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    names = subprocess.run([dvc, "stage", "list", "--name-only"], capture_output=True, text=True, cwd=ROOT)
    assert names.returncode == 0, names.stderr
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    assert set(names.stdout.split()) == set(lock), "dvc.lock lacks stages or has stale ones: run dvc repro"
    run = subprocess.run([dvc, "status", "--json"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    tracked = set(subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT).stdout.split())
    stale = []
    for stage, entries in json.loads(run.stdout or "{}").items():
        for entry in entries:
            if entry == "changed command":
                stale.append(f"{stage}: command")
            if not isinstance(entry, dict):
                continue
            for path, status in entry.get("changed deps", {}).items():
                in_git = path in tracked or any(t.startswith(path.rstrip("/") + "/") for t in tracked)
                if in_git or status != "deleted":
                    stale.append(f"{stage}: {path} {status}")
    assert not stale, "dvc.lock is stale (run dvc repro):\n" + "\n".join(stale)


def test_experts_follow_the_authors_rule_for_classes_without_enough_valid_templates(tmp_path, monkeypatch):
    from floss import pipeline
    from floss.core.classes import CLASS_NAMES
    from floss.core.rankings import save_rankings

    monkeypatch.setattr(paths, "ROOT", tmp_path)
    classes = {}
    for k, name in enumerate(CLASS_NAMES["cityscapes"]):
        order = [(t + k) % 80 for t in range(80)]
        valid = {0: 0, 1: 2}.get(k, 80)          # road: no valid template, sidewalk: two
        classes[name] = {"entropy_ranking": [{"template_id": t, "entropy": 0.0 if i >= valid else 0.1 * (i + 1),
                                              "pixel_percentage": 1.0 if i < valid else 0.0, "rank": i + 1}
                                             for i, t in enumerate(order)]}
    save_rankings({"model": "maskclip", "dataset": "cityscapes", "split": "train", "classes": classes},
                  pipeline.rankings_path("maskclip", "cityscapes"))
    experts = pipeline._experts(PARAMS, "maskclip", "cityscapes")
    assert experts[0] == list(range(80)) and experts[1] == [1, 2] and experts[2] == [2, 3, 4, 5]
