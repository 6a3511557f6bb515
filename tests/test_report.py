"""floss.report: the paper's numbers, side-by-side tables (md/tex/csv) and deterministic figures."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from floss.report import paper, plots, tables


def test_paper_numbers_hold_every_item_with_its_source():
    data = paper.paper_numbers()
    for item in ("table1", "table2", "table3", "table4", "table5", "fig4c", "fig5", "oracle", "fusion"):
        assert item in data and paper.source_of(item)
    assert [paper.oracle_miou(n) for n in (1, 2, 3, 4)] == [37.1, 37.0, 37.3, 37.5]
    assert [paper.metric_miou(m) for m in ("avgprob", "mano", "iti", "entropy")] == [34.4, 29.9, 30.0, 34.6]
    assert paper.rho_100_miou() == 34.1 and paper.fallback_percent() == 2
    assert paper.paper_miou("clipdinoiser", "cityscapes") == 34.6
    assert paper.paper_miou("maskclip", "cityscapes", "baseline") == 25.0      # Table 1, not Table 3's 24.5
    assert paper.paper_miou("clipdinoiser", "acdc_fog") == 29.0
    assert paper.paper_miou("naclip_vitl14", "pascalco59", "baseline") == 32.1
    assert paper.expert_quality("naclip", "pascalvoc20") == 20
    assert paper.fusion_miou("clipdinoiser", "average") == 34.4
    with pytest.raises(KeyError, match="table1/reproduced/mymodel"):
        paper.paper_miou("mymodel", "cityscapes")
    with pytest.raises(ValueError, match="method"):
        paper.paper_miou("naclip", "cityscapes", "oracle")


def test_paper_averages_are_consistent_with_the_typed_rows():
    """A typo check: every printed Avg equals the mean of its row within the paper's rounding."""
    for item, variant, cols in (("table1", None, 5), ("table3", None, 6), ("table5", "vitb16", 2),
                                ("table5", "vitl14", 2), ("table2", None, 5)):
        frame = paper.table_frame(item, variant)
        values = frame.drop(columns=["quoted", "avg"])
        if item == "table3":
            values = values.drop(columns=["cityscapes"])
        full = values.notna().sum(axis=1) == cols
        diff = (values[full].mean(axis=1) - frame.loc[full, "avg"]).abs()
        assert (diff <= 0.11 if item != "table2" else diff <= 1.0).all(), (item, variant, diff[diff > 0.11])
    t1 = paper.table_frame("table1")
    # GEM's row is reproduced by gem_quoted (ClearCLIP's re-run of GEM): compared, not only quoted
    assert t1["quoted"].sum() == 7 and not t1.loc["clipdinoiser+floss", "quoted"]
    assert not t1.loc["gem_quoted", "quoted"] and t1.loc["gem_quoted", "cityscapes"] == 32.6
    assert paper.table_frame("table5", "vitb16").loc["gem_quoted", "pascalco59"] == 35.6
    assert paper.table_frame("table5", "vitl14").loc["GEM [3]", "quoted"]                # no L/14 variant: quoted


def _comparison():
    ref = paper.table_frame("table4")
    ours = ref.drop(columns="quoted").copy() - 0.25
    ours.loc["mymodel"] = [10.0, 11.0, 12.0, 13.0]
    return tables.compare(ours, ref)


def test_compare_puts_ours_paper_and_difference_side_by_side():
    table = _comparison()
    assert list(table.columns.get_level_values(1)[:3]) == ["ours", "paper", "Δ"]
    assert table.loc["clipdinoiser", ("highest", "paper")] == 34.6
    assert table.loc["clipdinoiser", ("highest", "Δ")] == pytest.approx(-0.25)
    assert math.isnan(table.loc["mymodel", ("highest", "paper")])           # our extra row: no paper value
    quoted = tables.compare(pd.DataFrame({"cityscapes": [1.0]}, index=["maskclip"]), paper.table_frame("table1"))
    assert "CLIP [46] (quoted)" in quoted.index and math.isnan(quoted.loc["CLIP [46] (quoted)", ("cityscapes", "ours")])
    with pytest.raises(ValueError, match="quoted"):
        tables.compare(pd.DataFrame({"cityscapes": [1.0]}, index=["CLIP [46]"]), paper.table_frame("table1"))


def test_write_table_md_tex_csv_with_bold_best_and_demo_mark(tmp_path):
    table = _comparison()
    out = tables.write_table(table, "fusion", 4, "Fusion strategies (50% _test_)", root=tmp_path, synthetic=True)
    assert sorted(p.name for p in out.values()) == ["tab4_fusion.csv", "tab4_fusion.md", "tab4_fusion.tex"]
    md, tex = out["md"].read_text(), out["tex"].read_text()
    assert tables.DEMO_MARK in md and tables.DEMO_MARK in tex
    # best reproduced "highest" value is NACLIP's 37.0 - 0.25 = 36.75 -> "36.8" in bold; paper best 37.0 bold
    assert "**36.8**" in md and "**37.0**" in md and r"\textbf{36.8}" in tex and r"\textbf{37.0}" in tex
    assert "**-0.2**" not in md and r"\textbf{-0.2" not in tex        # differences are never bold
    assert tex.startswith(r"\begin{table}") and r"\toprule" in tex and r"\bottomrule" in tex
    assert r"50\% \_test\_" in tex and r"$\Delta$" in tex
    csv = pd.read_csv(out["csv"], index_col=0)
    assert csv.loc["naclip", "highest ours"] == pytest.approx(36.75)    # unrounded in the CSV
    assert csv.loc["naclip", "highest paper"] == 37.0 and "highest delta" in csv.columns
    real = tables.write_table(table, "fusion", 4, "Fusion strategies", root=tmp_path, synthetic=False)
    assert tables.DEMO_MARK not in real["md"].read_text()
    assert not list(tmp_path.glob("tables/.*tmp"))                        # atomic: no temp files left


def test_write_table_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="non-empty"):
        tables.write_table(pd.DataFrame(), "x", 1, "c", root=tmp_path)
    with pytest.raises(ValueError, match="slug"):
        tables.write_table(_comparison(), "a/b", 1, "c", root=tmp_path)
    with pytest.raises(ValueError, match="best"):
        tables.write_table(_comparison(), "x", 1, "c", root=tmp_path, best="median")


def _figure(title):
    plots.use_style()
    fig, ax = plt.subplots(figsize=(3, 2))
    plots.mean_std_line(ax, [1, 2, 5], [30.0, 31.5, 33.0], [1.0, 0.5, 0.2], label="FLOSS")
    ax.set_title(title)
    return fig


def test_save_figure_bytes_are_stable_and_title_carries_demo_mark(tmp_path):
    title = plots.demo_title("Effect of the number of images", synthetic=True)
    assert tables.DEMO_MARK in title and plots.demo_title("t", False) == "t"
    first = plots.save_figure(_figure(title), 3, "low_data", root=tmp_path / "a")
    second = plots.save_figure(_figure(title), 3, "low_data", root=tmp_path / "b")
    assert {p.name for p in first.values()} == {"fig3_low_data.png", "fig3_low_data.pdf"}
    for fmt in ("png", "pdf"):
        digest = [hashlib.sha256(d[fmt].read_bytes()).hexdigest() for d in (first, second)]
        assert digest[0] == digest[1], fmt
    assert b"CreationDate" not in first["pdf"].read_bytes()
    with pytest.raises(ValueError, match="formats"):
        plots.save_figure(_figure("x"), 1, "x", root=tmp_path, formats=("jpg",))
    with pytest.raises(TypeError, match="Figure"):
        plots.save_figure("not a figure", 1, "x", root=tmp_path)


def test_the_figures_font_is_matplotlibs_own_whatever_the_system_has(tmp_path):
    """A system DejaVu (another version of the same family) listed first in the font cache must not reach the PDFs:
    use_style resolves "DejaVu Sans" to matplotlib's bundled file."""
    import shutil

    import matplotlib
    from matplotlib import font_manager

    bundled = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    impostor = tmp_path / "DejaVuSans.ttf"               # a second file of the family, as a system package adds
    shutil.copy(bundled, impostor)
    manager = font_manager.fontManager
    saved = list(manager.ttflist)
    try:
        entry = font_manager.FontEntry(fname=str(impostor), name="DejaVu Sans", style="normal", variant="normal",
                                       weight=400, stretch="normal", size="scalable")
        manager.ttflist = [entry] + [f for f in manager.ttflist if f.fname != str(bundled)]
        manager._findfont_cached.cache_clear()
        assert font_manager.findfont("DejaVu Sans") == str(impostor)      # the situation the pin guards against
        plots.use_style()
        assert font_manager.findfont("DejaVu Sans") == str(bundled)
        assert font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans", weight="bold")).startswith(
            str(bundled.parent))
    finally:
        manager.ttflist = saved
        manager._findfont_cached.cache_clear()
