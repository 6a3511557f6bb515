"""The paper profile, rehearsed end to end as the README tells a user: `dvc exp run -S profile=paper -S
data_root=...` (weights keys pointing at local files) on fabricated datasets in all eight layouts and tiny random
open_clip models saved as files, in a scratch copy of the repository. Every table and figure of the paper comes out
of the real extract → rank → evaluate path, marked as computed from unofficial weights; then a partial run (one
model, one dataset, no transfer sets) still writes every item, with the cells it did not run shown as "not run".
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from floss.util import paths
from floss.report.analysis import OTHER_WEIGHTS_MARK
from floss.report.tables import DEMO_MARK, NOT_RUN
from rehearsal import copy_repository, git_env, make_paper_datasets, make_weights

pytestmark = pytest.mark.slow
README = paths.ROOT / "README.md"
AUTHORS = paths.SHARED / "reference" / "authors"


def readme_recipe() -> str:
    """The README's paper command (the line after the `# the paper profile` marker in its bash block)."""
    text = README.read_text()
    match = re.search(r"^\s*(dvc exp run -S profile=paper -S data_root=\S+)", text, re.M)
    assert match, "README: the paper recipe `dvc exp run -S profile=paper -S data_root=...` is missing"
    return match.group(1)


def readme_subset_flags() -> list[str]:
    """The README's subset recipe: the ``-S '...'`` overrides of its "A subset:" sentence, as printed."""
    text = README.read_text()
    sentence = text[text.index("A subset:"):]
    flags = re.findall(r"`(-S '[^']*')`", sentence[:sentence.index(";")])
    assert len(flags) == 3, f"README: the subset recipe changed: {flags}"
    return [arg for flag in flags for arg in shlex.split(flag)]


def _declared_outputs(repo: Path) -> list[str]:
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    outs = []
    for stage in stages.values():
        for out in stage.get("outs", []) if "foreach" not in stage else []:
            name = next(iter(out)) if isinstance(out, dict) else out
            if name.startswith(("tables/", "figures/")):
                outs.append(name)
    return outs


def _run(cmd: list[str], repo: Path, env: dict) -> subprocess.CompletedProcess:
    run = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    assert run.returncode == 0, f"{shlex.join(cmd)} failed:\n{run.stdout[-6000:]}\n{run.stderr[-6000:]}"
    return run


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    base = tmp_path_factory.mktemp("rehearsal")
    repo = copy_repository(paths.ROOT, base / "repo")
    data = make_paper_datasets(base / "datasets")
    weights = make_weights(base / "weights")
    env = {**git_env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "FLOSS_CACHE": str(base / "cache"), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("FLOSS_ROOT", None)
    overrides = [f"extract.weights.{m}.{k}={v}" for m, entry in weights.items() for k, v in entry.items()
                 if v is not None]
    if AUTHORS.is_dir():     # CI and tests pass the development copy explicitly where it exists
        overrides.append(f"authors.local={AUTHORS}")
    recipe = readme_recipe().replace("data_root=/data", f"data_root={data}")
    cmd = shlex.split(recipe) + [a for o in overrides for a in ("-S", o)] + ["-S", "extract.workers=0"]
    # check-params refuses a weights/dataset problem before any heavy work
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["profile"] == "demo"
    start = time.time()
    full = _run(cmd, repo, env)
    return {"repo": repo, "data": data, "env": env, "cmd": cmd, "start": start, "log": full.stdout + full.stderr,
            "seconds": time.time() - start}


def test_the_readme_recipe_runs_the_whole_paper_profile(rehearsal):
    repo, start = rehearsal["repo"], rehearsal["start"]
    print(f"paper rehearsal: {rehearsal['seconds']:.0f} s")
    # every table and figure declared in dvc.yaml was (re)written by this run
    declared = _declared_outputs(repo)
    assert len(declared) > 50
    stale = [o for o in declared if not (repo / o).is_file() or (repo / o).stat().st_mtime < start]
    assert not stale, f"not written by the paper run: {stale}"
    # from the real path: no synthetic data anywhere, unofficial weights marked everywhere
    for path in (repo / "results" / "eval").glob("*/*.json"):
        doc = json.loads(path.read_text())
        assert doc.get("source") == "real" and doc["config"]["fingerprint"]["backbone"].startswith("tiny"), path
        assert len(doc["per_template"]) == 80
    tables = [p for p in (repo / "tables").glob("*.md")]
    for md in tables:
        text = md.read_text()
        assert DEMO_MARK not in text, md
        if md.name not in ("tabA_authors_vs_ours.md", "tabA_authors_vs_ours_summary.md") or "unavailable" not in text:
            assert OTHER_WEIGHTS_MARK in text, f"{md.name} does not say its numbers come from other weights"
    table1 = (repo / "tables/tab1_main_results.md").read_text()
    # the full matrix ran: no "not run" in the paper's models' rows (GEM-quoted runs on the datasets the paper
    # quotes GEM on, plus PC59; its other cells say "not run" by design)
    paper_rows = [line for line in table1.splitlines()
                  if line.lstrip("| ").startswith(("MaskCLIP", "NACLIP", "CLIP-DINOiser"))]
    assert len(paper_rows) == 6 and not any(NOT_RUN in row for row in paper_rows)
    # Table 1 equals the results it was made from
    res = json.loads((repo / "results/eval/naclip/pascalvoc20.json").read_text())
    row = next(line for line in table1.splitlines() if line.lstrip("| ").startswith("NACLIP + FLOSS"))
    assert f"{res['methods']['floss']['miou']:.1f}" in row
    metrics = json.loads((repo / "metrics/miou.json").read_text())
    assert set(metrics) == set(yaml.safe_load((repo / "params.yaml").read_text())["models"])     # all nine
    assert set(metrics["clipdinoiser"]) >= {"cityscapes", "ade20k", "acdc_night", "mapillary"}
    # the paper profile ranks without a train cache: only val caches were written
    assert not list((repo / "data/features").glob("*/*/train"))
    assert (repo / "results/stats/clipdinoiser/cityscapes.safetensors").is_file()
    authors = json.loads((repo / "data/authors/status.json").read_text())
    assert authors["available"] is AUTHORS.is_dir()


def test_a_partial_paper_run_writes_every_item_with_not_run_cells(rehearsal):
    """A user with only Cityscapes and one model: every table and figure is still written."""
    repo, env = rehearsal["repo"], rehearsal["env"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    # the README's three flags as printed ("-S '~models.gem'" repeated for every other model), nothing else
    drop_gem, keep_one, no_transfer = (readme_subset_flags()[i:i + 2] for i in (0, 2, 4))
    assert drop_gem == ["-S", "~models.gem"] and keep_one == ["-S", "models.clipdinoiser=[cityscapes]"]
    drop = [a.replace("gem", m) for m in params["models"] if m != "clipdinoiser" for a in drop_gem]
    cmd = rehearsal["cmd"] + drop + keep_one + no_transfer
    start = time.time()
    _run(cmd, repo, env)
    print(f"partial paper run: {time.time() - start:.0f} s")
    for out in _declared_outputs(repo):
        assert (repo / out).is_file() and (repo / out).stat().st_mtime >= start, out
    table1 = (repo / "tables/tab1_main_results.md").read_text()
    row = next(line for line in table1.splitlines() if line.lstrip("| ").startswith("NACLIP |"[:6]))
    assert NOT_RUN in row
    cd_row = next(line for line in table1.splitlines() if line.lstrip("| ").startswith("CLIP-DINOiser + FLOSS"))
    assert cd_row.count(NOT_RUN) == 5         # VOC20, PC59, ADE, Stuff and the average; Cityscapes ran
    assert NOT_RUN in (repo / "tables/tab3_transfer.md").read_text()
    assert json.loads((repo / "results/transfer/index.json").read_text()) == {"models": [], "datasets": []}
