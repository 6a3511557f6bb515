"""Every notebook of notebooks/ executes through papermill (kernel python3) with tiny parameters on a tiny
synthetic root, and its outputs are checked against the results JSON they were made from."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("papermill")
import jupytext  # noqa: E402
import pandas as pd  # noqa: E402
from jupyter_client.kernelspec import NoSuchKernel, KernelSpecManager  # noqa: E402

from floss.report.run import execute_notebooks  # noqa: E402
from floss.report.tables import DEMO_MARK  # noqa: E402

pytestmark = pytest.mark.slow
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PAIRS = [("clipdinoiser", "cityscapes"), ("clipdinoiser", "pascalvoc20"), ("maskclip", "cityscapes"),
         ("naclip", "cityscapes")]
WORKERS = 2   # warm kernels running the notebooks in parallel (2 cores)
TRANSFER = [("clipdinoiser", "acdc_fog"), ("maskclip", "acdc_fog")]
ALL = ["tab1_main_results", "tab2_expert_quality", "tab3_transfer", "tab4_fusion", "tab5_backbones",
       "fig1_single_templates", "fig3_low_data", "fig4_metrics_topn", "fig5_oracle", "fig6_best_experts",
       "fig7_improvement", "fig10_expert_quality", "fig12_entropy_iou", "qualitative", "authors_vs_ours",
       "beyond_six_models", "metric_bench"]
#: what the tiny root ran (the pipeline passes params.yaml's `models`): every other pair must read "not run"
MATRIX = {"clipdinoiser": ["cityscapes", "pascalvoc20"], "maskclip": ["cityscapes"], "naclip": ["cityscapes"]}
#: notebooks run a second time on a copy of the root without the authors' data (offline, no local copy)
OFFLINE = ["fig12_entropy_iou", "authors_vs_ours"]
TINY = {
    "tab1_main_results": {"models": ["maskclip", "clipdinoiser", "naclip"], "datasets": ["cityscapes", "pascalvoc20"]},
    "tab2_expert_quality": {"models": ["clipdinoiser"], "datasets": ["cityscapes", "pascalvoc20"]},
    "tab3_transfer": {"models": ["maskclip", "clipdinoiser"], "transfer_datasets": ["acdc_fog"]},
    "tab4_fusion": {"models": ["maskclip", "clipdinoiser", "naclip"]},
    "tab5_backbones": {"backbones": {"vitb16": "naclip"}, "datasets": ["cityscapes"]},
    "fig1_single_templates": {"appendix": {"8": "clipdinoiser"}, "appendix_datasets": ["cityscapes", "pascalvoc20"]},
    "fig3_low_data": {"datasets": ["cityscapes"], "sizes": [1, 3], "seeds": 2},
    "fig4_metrics_topn": {"metrics": ["avgprob", "entropy"], "ns": [1, 4]},
    "fig5_oracle": {"rhos": [1.0], "seeds": 1, "oracle_ns": [4]},
    "fig6_best_experts": {"models": ["clipdinoiser", "maskclip"]},
    "fig7_improvement": {"models": ["maskclip", "clipdinoiser"], "datasets": ["cityscapes"]},
    "fig10_expert_quality": {"figures": {"10": "clipdinoiser"}, "datasets": ["cityscapes", "pascalvoc20"]},
    "fig12_entropy_iou": {"figures": {"12": ["clipdinoiser", "cityscapes"], "14": ["naclip", "cityscapes"]},
                          "max_classes": 6},
    "qualitative": {"num_images": 2, "max_images_fallback": 2},
    "authors_vs_ours": {"models": ["clipdinoiser", "maskclip"], "datasets": ["cityscapes"]},
    "beyond_six_models": {"models": ["maskclip", "clipdinoiser", "naclip"], "datasets": ["cityscapes", "pascalvoc20"]},
    "metric_bench": {"metrics": ["entropy", "avgprob", "margin", "kurtosis", "spatial", "rank_ensemble"], "n": 4,
                     "models": None, "datasets": None},          # every pair of the matrix (default: Cityscapes)
}
TINY = {name: {**params, **({"matrix": MATRIX} if name != "fig3_low_data" else {})} for name, params in TINY.items()}
#: the metric bench also gets a pair without artifacts (maskclip/pascalvoc20): its cells must read "not run"
TINY["metric_bench"]["matrix"] = {**MATRIX, "maskclip": ["cityscapes", "pascalvoc20"]}


def _ensure_kernel() -> None:
    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:   # only touches the running environment (sys.prefix)
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"],
                       check=True, capture_output=True)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Build the tiny root once, run all 15 notebooks on it; returns (root, {notebook: error or None})."""
    from report_root import build_root
    _ensure_kernel()
    root = tmp_path_factory.mktemp("root")
    build_root(root, PAIRS, transfer=TRANSFER)
    (root / "nb").mkdir()
    (root / "reports").mkdir()
    offline = tmp_path_factory.mktemp("offline")
    shutil.copytree(root, offline, dirs_exist_ok=True, ignore=lambda d, names: ["authors"] if d.endswith("data") else [])
    cwd = tmp_path_factory.mktemp("cwd")   # notebooks must not depend on the working directory
    # the pipeline's runner (papermill's parameter injection, warm kernels with namespaces reset in between)
    jobs = [(name, NOTEBOOKS / f"{name}.py", root / "reports" / f"{name}.ipynb", {"root": str(root), **TINY[name]})
            for name in ALL]
    jobs += [(f"offline:{name}", NOTEBOOKS / f"{name}.py", offline / "reports" / f"{name}.ipynb",
              {"root": str(offline), **TINY[name]}) for name in OFFLINE]
    errors = execute_notebooks(jobs, cwd=cwd, workers=WORKERS)
    return root, errors, offline


def test_every_notebook_has_one_parameters_cell_with_root():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.py")) == sorted(ALL)
    for name in ALL:
        nb = jupytext.read(NOTEBOOKS / f"{name}.py")
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1 and 'root = ""' in tagged[0].source, name
        assert set(TINY[name]) <= set(_parameter_names(tagged[0].source)), name


def _parameter_names(source: str) -> list[str]:
    return [line.split("=")[0].strip() for line in source.splitlines() if "=" in line and not line.startswith(" ")]


@pytest.mark.parametrize("name", ALL + [f"offline:{n}" for n in OFFLINE])
def test_notebook_executes(executed, name):
    errors = executed[1]
    assert errors[name] is None, errors[name]


def test_items_not_in_the_matrix_say_not_run(executed):
    root = executed[0]
    t1 = pd.read_csv(root / "tables/tab1_main_results.csv", index_col=0)
    assert t1.loc["MaskCLIP + FLOSS", "VOC20 ours"] == "not run"       # the matrix has no maskclip/pascalvoc20
    assert t1.loc["NACLIP", "Avg ours"] == "not run" and t1.loc["NACLIP", "CS ours"] != "not run"
    assert "not run" in (root / "tables/tabB_beyond_six_models.md").read_text()
    t5 = (root / "tables/tab5_backbones.md").read_text()
    assert "not run" in t5 and "SCLIP vitb16 + FLOSS (beyond the paper)" in t5


def test_without_the_authors_data_the_items_say_so(executed):
    offline = executed[2]
    for stem in ("tabA_authors_vs_ours", "tabA_authors_vs_ours_summary"):
        text = (offline / "tables" / f"{stem}.md").read_text()
        assert "The authors' published data was unavailable" in text and "dvc repro" in text
    assert (offline / "figures/fig12_entropy_iou_authors.png").stat().st_size > 1000


def _results(root, model, dataset, kind="eval"):
    return json.loads((root / "results" / kind / model / f"{dataset}.json").read_text())


def test_table1_numbers_equal_the_results(executed):
    root = executed[0]
    csv = pd.read_csv(root / "tables/tab1_main_results.csv", index_col=0)
    for model, label in (("maskclip", "MaskCLIP"), ("clipdinoiser", "CLIP-DINOiser")):
        for dataset, col in (("cityscapes", "CS"),):
            res = _results(root, model, dataset)
            assert csv.loc[label, f"{col} ours"] == pytest.approx(res["methods"]["baseline"]["miou"])
            assert csv.loc[f"{label} + FLOSS", f"{col} ours"] == pytest.approx(res["methods"]["floss"]["miou"])
    assert csv.loc["CLIP-DINOiser + FLOSS", "CS paper"] == 34.6
    assert "CLIP [46] (quoted)" in csv.index
    for ext in ("md", "tex"):
        assert DEMO_MARK in (root / f"tables/tab1_main_results.{ext}").read_text()


def test_tables_3_4_numbers_equal_the_results(executed):
    root = executed[0]
    t3 = pd.read_csv(root / "tables/tab3_transfer.csv", index_col=0)
    fog = _results(root, "clipdinoiser", "acdc_fog", kind="transfer")
    assert t3.loc["CLIP-DINOiser + FLOSS", "Fog ours"] == pytest.approx(fog["methods"]["floss"]["miou"])
    t4 = pd.read_csv(root / "tables/tab4_fusion.csv", index_col=0)
    cs = _results(root, "naclip", "cityscapes")
    assert t4.loc["NACLIP + FLOSS", "Expert Average ours"] == pytest.approx(cs["methods"]["floss_average"]["miou"])
    assert t4.loc["NACLIP + FLOSS", "Expert Average paper"] == 36.7


def test_every_expected_output_exists_with_demo_marks(executed):
    root = executed[0]
    for stem in ("tab1_main_results", "tab2_expert_quality", "tab3_transfer", "tab4_fusion", "tab5_backbones",
                 "tabfig4c_metrics", "tabfig5_oracle", "tabQ_fallback", "tabA_authors_vs_ours"):
        for ext in ("md", "tex", "csv"):
            assert (root / "tables" / f"{stem}.{ext}").is_file(), f"{stem}.{ext}"
        assert DEMO_MARK in (root / "tables" / f"{stem}.md").read_text(), stem
    for stem in ("fig1_single_templates", "fig8_single_templates_clipdinoiser", "fig3_low_data", "fig4_metrics_topn",
                 "fig5_oracle", "fig6_best_experts", "fig7_improvement", "fig10_expert_quality_clipdinoiser",
                 "fig12_entropy_iou_clipdinoiser_cityscapes", "fig14_entropy_iou_naclip_cityscapes",
                 "fig12_entropy_iou_authors", "figQ_qualitative"):
        for ext in ("png", "pdf"):
            assert (root / "figures" / f"{stem}.{ext}").stat().st_size > 1000, f"{stem}.{ext}"


def test_authors_vs_ours_overlap_and_oracle_table(executed):
    root = executed[0]
    overlap = pd.read_csv(root / "tables/tabA_authors_vs_ours.csv", index_col=0)
    # the tiny root's "authors" files are our own clipdinoiser/cityscapes experts: full overlap
    assert (overlap["overlap"] == 4).all() and len(overlap) == 19
    oracle = pd.read_csv(root / "tables/tabfig5_oracle.csv", index_col=0)
    assert oracle.loc["oracle N=4", "mIoU paper"] == 37.5
    res = _results(root, "clipdinoiser", "cityscapes")
    assert oracle.loc["FLOSS (entropy)", "mIoU ours"] == pytest.approx(res["methods"]["floss"]["miou"])


def test_metric_bench_table_measures_every_metric_against_the_results(executed):
    """tabM: one row per metric, ρ̂ and ΔmIoU per pair; the entropy row equals the evaluate stage's FLOSS − baseline
    and Table 2's ρ̂ (the same experts), and a pair without artifacts reads "not run"."""
    root = executed[0]
    table = pd.read_csv(root / "tables/tabM_metric_bench.csv", index_col=0)
    assert list(table.index) == ["Entropy", "Avg. Probability", "margin", "kurtosis", "spatial", "Rank ensemble"]
    assert (table["MaskCLIP VOC20 ρ̂"] == "not run").all() and (table["MaskCLIP VOC20 ΔmIoU"] == "not run").all()
    res = _results(root, "clipdinoiser", "cityscapes")
    gain = res["methods"]["floss_highest"]["miou"] - res["methods"]["baseline"]["miou"]
    assert float(table.loc["Entropy", "CLIP-DINOiser CS ΔmIoU"]) == pytest.approx(gain, abs=1e-6)
    from floss.report import analysis
    baseline = analysis.class_iou(res, "baseline")
    _, rho = analysis.quality_per_class(res["experts"], analysis.per_template_iou(res), baseline, list(baseline.index))
    assert float(table.loc["Entropy", "CLIP-DINOiser CS ρ̂"]) == pytest.approx(rho)
    for column in table.columns:
        if "VOC20" not in column or "CLIP-DINOiser" in column:
            assert table[column].astype(float).notna().all(), column
    assert DEMO_MARK in (root / "tables/tabM_metric_bench.md").read_text()
    assert (root / "figures/figM_metric_bench.png").stat().st_size > 1000
