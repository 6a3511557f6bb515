"""Side-by-side tables (reproduced | paper | difference) written as Markdown, LaTeX (booktabs) and CSV.

``compare`` builds the frame; ``write_table`` writes ``tables/tab{N}_{slug}.{md,tex,csv}`` atomically.
The CSV keeps full precision (tests and readers compare it with the results JSON); Markdown and LaTeX are
rounded for reading, with the best value of every reproduced/paper column in bold.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from floss.util.io import atomic_write_text
from floss.util import paths

logger = logging.getLogger(__name__)

#: the words every caption/title made from synthetic data carries
DEMO_MARK = "synthetic demo data"
#: column parts of a comparison table, and how the CSV spells them (ASCII)
PARTS = ("ours", "paper", "Δ")
_CSV_PART = {"ours": "ours", "paper": "paper", "Δ": "delta"}
QUOTED_SUFFIX = " (quoted)"
#: what a reproduced cell shows when params.yaml did not run it (a partial matrix, missing fusions...)
NOT_RUN = "not run"
_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}



def demo_caption(caption: str, synthetic: bool | str) -> str:
    """``caption`` with the synthetic-data mark appended when the numbers come from the demo data (``True``), or
    with the given mark (a str, e.g. unofficial weights: floss.report.analysis.provenance)."""
    if isinstance(synthetic, str) and synthetic:
        return f"{caption} ({synthetic})"
    return f"{caption} ({DEMO_MARK}; not comparable with the paper)" if synthetic else caption


def compare(ours: pd.DataFrame, paper: pd.DataFrame, *, row_labels: Mapping[str, str] | None = None,
            column_labels: Mapping[str, str] | None = None, not_run=()) -> pd.DataFrame:
    """Reproduced values, the paper's values and their difference side by side.

    ``ours`` and ``paper``: rows = methods, columns = datasets (or fusions, metrics...). ``paper`` may carry a
    boolean ``quoted`` column: those rows are quoted from the paper (no reproduction) and their label gets
    " (quoted)". Rows follow the paper's order, then the rows only we have. Columns follow the paper's
    order, then our extra columns. Returns columns ``MultiIndex(column, part)`` with part in ``PARTS``;
    Δ = ours − paper (NaN where either is missing). ``not_run``: (row, column) keys of ``ours`` cells that the
    pipeline did not run; :func:`write_table` shows them as "not run" (kept in ``out.attrs["not_run"]``).
    """
    for name, frame in (("ours", ours), ("paper", paper)):
        if not isinstance(frame, pd.DataFrame):
            raise TypeError(f"{name}: expected a pandas DataFrame, received {type(frame).__name__}")
    quoted = set(paper.index[paper["quoted"].astype(bool)]) if "quoted" in paper.columns else set()
    paper = paper.drop(columns=["quoted"], errors="ignore")
    ours = ours.drop(columns=["quoted"], errors="ignore")
    clash = quoted & set(ours.index)
    if clash:
        raise ValueError(f"ours: rows {sorted(clash)} are quoted from the paper and cannot also be reproduced")
    rows = list(paper.index) + [r for r in ours.index if r not in set(paper.index)]
    cols = list(paper.columns) + [c for c in ours.columns if c not in set(paper.columns)]
    o = ours.reindex(index=rows, columns=cols).astype("float64")
    p = paper.reindex(index=rows, columns=cols).astype("float64")
    parts = {"ours": o, "paper": p, "Δ": o - p}
    out = pd.concat(parts, axis=1).swaplevel(0, 1, axis=1)
    out = out.reindex(columns=pd.MultiIndex.from_product([cols, PARTS]))
    row_labels = dict(row_labels or {})
    label_of = {r: row_labels.get(r, r) + (QUOTED_SUFFIX if r in quoted else "") for r in rows}
    out.index = [label_of[r] for r in rows]
    column_labels = dict(column_labels or {})
    if column_labels:
        out.columns = out.columns.set_levels([column_labels.get(c, c) for c in out.columns.levels[0]], level=0)
    out.attrs["not_run"] = {(label_of[r], column_labels.get(c, c)) for r, c in not_run if r in label_of}
    return out


def mark_not_run(df: pd.DataFrame, cells) -> pd.DataFrame:
    """``df`` with (row label, column) cells flagged "not run" for :func:`write_table` (tables without a paper
    side; ``compare`` takes the same keys as ``not_run=``)."""
    df = df.copy()
    df.attrs["not_run"] = set(df.attrs.get("not_run", set())) | {(r, c) for r, c in cells}
    return df


def _not_run_mask(df: pd.DataFrame) -> pd.DataFrame:
    """True for the cells of rows/columns flagged "not run" in ``df.attrs`` (every part but the paper's)."""
    mask = pd.DataFrame(False, index=df.index, columns=df.columns)
    for row, col in df.attrs.get("not_run", set()):
        if row not in df.index:
            continue
        for c in df.columns:
            head, part = (c[0], c[-1]) if isinstance(c, tuple) else (c, None)
            if head == col and part != "paper":
                mask.loc[row, c] = True
    return mask


def _best_mask(df: pd.DataFrame, best: str | None) -> pd.DataFrame:
    """True where a value is the best of its column; Δ columns and non-numeric columns never are."""
    mask = pd.DataFrame(False, index=df.index, columns=df.columns)
    if best is None:
        return mask
    if best not in ("max", "min"):
        raise ValueError(f"best: expected 'max', 'min' or None, received {best!r}")
    for col in df.columns:
        part = col[-1] if isinstance(col, tuple) else None
        values = df[col]
        if part == "Δ" or not pd.api.types.is_numeric_dtype(values) or values.isna().all():
            continue
        target = values.max() if best == "max" else values.min()
        mask[col] = values == target
    return mask


def _format_number(value, precision: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (int, float)):
        return f"{value:.{precision}f}"
    return str(value)


def _flat_columns(columns: pd.Index, csv: bool = False) -> list[str]:
    if isinstance(columns, pd.MultiIndex):
        return [" ".join([str(c) for c in col[:-1]] + [_CSV_PART.get(col[-1], col[-1]) if csv else col[-1]])
                for col in columns]
    return [str(c) for c in columns]


def to_markdown(df: pd.DataFrame, *, precision: int = 1, best: str | None = "max") -> str:
    """A GitHub Markdown table; best values in **bold**, missing values as "–"."""
    mask = _best_mask(df, best)
    missing = _not_run_mask(df)
    cells = df.copy().astype(object)
    for col in df.columns:
        for i, value in enumerate(df[col]):
            text = _format_number(value, precision)
            if missing[col].iloc[i]:
                text = NOT_RUN if (col[-1] if isinstance(col, tuple) else None) != "Δ" else "–"
            cells.iloc[i, df.columns.get_loc(col)] = f"**{text}**" if mask[col].iloc[i] else text
    cells.columns = _flat_columns(df.columns)
    return cells.to_markdown(stralign="right", numalign="right")


def latex_escape(text: str) -> str:
    """Escape LaTeX special characters of a plain string (captions, labels)."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def to_latex(df: pd.DataFrame, *, caption: str, label: str, precision: int = 1, best: str | None = "max") -> str:
    """A booktabs LaTeX table through ``pandas.io.formats.style.Styler.to_latex``; best values in bold."""
    mask = _best_mask(df, best)
    missing = _not_run_mask(df)
    shown = df
    if missing.to_numpy().any():
        shown = df.astype(object).where(~missing, NOT_RUN)
        for col in df.columns:       # a not-run Δ is simply empty
            if isinstance(col, tuple) and col[-1] == "Δ":
                shown.loc[missing[col], col] = None
    styler = shown.style.format(precision=precision, na_rep="--", escape="latex")
    styler = styler.format_index(escape="latex", axis=0)
    # the Δ part label becomes math; every other column label is escaped text
    styler = styler.format_index(lambda v: r"$\Delta$" if v == "Δ" else latex_escape(v), axis=1)
    styler = styler.apply(lambda _: mask.replace({True: "textbf:--rwrap;", False: ""}), axis=None)
    numeric = ["r" if pd.api.types.is_numeric_dtype(df[c]) else "l" for c in df.columns]
    return styler.to_latex(hrules=True, caption=latex_escape(caption), label=label, position_float="centering",
                           multicol_align="c", column_format="l" * df.index.nlevels + "".join(numeric))


def table_paths(slug: str, number: int | str, root: str | os.PathLike | None = None) -> dict[str, Path]:
    """Where ``write_table`` puts table ``number``: ``<root>/tables/tab{number}_{slug}.{md,tex,csv}``."""
    if not str(slug) or any(ch in str(slug) for ch in "/\\ "):
        raise ValueError(f"slug: expected a file-name fragment without '/', '\\' or spaces, received {slug!r}")
    base = Path(root) / "tables" if root is not None else paths.TABLES
    return {ext: base / f"tab{number}_{slug}.{ext}" for ext in ("md", "tex", "csv")}


def write_table(df: pd.DataFrame, slug: str, number: int | str, caption: str, *,
                root: str | os.PathLike | None = None, synthetic: bool = False, best: str | None = "max",
                precision: int = 1) -> dict[str, Path]:
    """Write ``df`` as ``tables/tab{number}_{slug}.{md,tex,csv}`` (atomic) and return the three paths.

    ``synthetic=True`` adds the "synthetic demo data" mark to the caption of the Markdown and LaTeX files.
    The CSV holds the unrounded values (flat column names, Δ spelled ``delta``).
    """
    if not isinstance(df, pd.DataFrame) or df.empty:
        raise ValueError(f"df: expected a non-empty pandas DataFrame for table {number} ({slug}), "
                         f"received {type(df).__name__}{'' if not isinstance(df, pd.DataFrame) else ' (empty)'}")
    out = table_paths(slug, number, root)
    full_caption = demo_caption(caption, synthetic)
    md = f"**Table {number}.** {full_caption}\n\n{to_markdown(df, precision=precision, best=best)}\n"
    tex = to_latex(df, caption=f"{full_caption}", label=f"tab:{slug}", precision=precision, best=best)
    missing = _not_run_mask(df)
    csv_frame = df.copy()
    if missing.to_numpy().any():
        def cell(v):
            return f"{v:.10g}" if isinstance(v, float) and not math.isnan(v) else v
        csv_frame = df.astype(object).map(cell).where(~missing, NOT_RUN)
        for col in df.columns:
            if isinstance(col, tuple) and col[-1] == "Δ":
                csv_frame.loc[missing[col], col] = None
    csv_frame.columns = _flat_columns(df.columns, csv=True)
    csv = csv_frame.to_csv(index_label="method", float_format="%.10g", lineterminator="\n")
    atomic_write_text(out["md"], md)
    atomic_write_text(out["tex"], tex)
    atomic_write_text(out["csv"], csv)
    logger.info("wrote table %s (%s) to %s", number, slug, out["md"].parent)
    return out


def frame_from_nested(values: Mapping[str, Mapping[str, float | None]], *, rows: Sequence[str] | None = None,
                      columns: Sequence[str] | None = None) -> pd.DataFrame:
    """A float DataFrame from ``{row: {column: value}}`` (missing entries and ``None`` become NaN)."""
    frame = pd.DataFrame.from_dict({r: dict(v) for r, v in values.items()}, orient="index")
    if rows is not None:
        frame = frame.reindex(index=list(rows))
    if columns is not None:
        frame = frame.reindex(columns=list(columns))
    return frame.astype("float64")
