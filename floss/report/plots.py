"""One figure style and deterministic figure files (``figures/fig{N}_{slug}.{png,pdf}``).

matplotlib writes timestamps and tool names into PDF/PNG metadata, so a naive ``savefig`` changes the bytes on
every run and every ``dvc repro`` reports changed outputs. ``save_figure`` clears those fields (the recipe
of pytest-mpl) so the same figure gives the same bytes run to run.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never a display (CI, DVC stages, papermill kernels)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

from floss.util import paths  # noqa: E402
from floss.util.io import atomic_write  # noqa: E402
from floss.report.tables import DEMO_MARK  # noqa: E402

logger = logging.getLogger(__name__)

#: metadata that would otherwise carry dates and versions into the files
_METADATA = {"pdf": {"CreationDate": None, "Producer": None, "Creator": None}, "png": {"Software": None}}
#: the one style block of every figure of the artifact
STYLE = {
    "figure.dpi": 100,
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
    "pdf.fonttype": 42,  # TrueType in PDFs: camera-ready and editable
    "ps.fonttype": 42,
    "svg.hashsalt": "floss",
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "font.family": "DejaVu Sans",
}
#: colours of the two methods every figure compares
BASELINE_COLOR = "#7f7f7f"
FLOSS_COLOR = "#1f77b4"
PAPER_COLOR = "#d62728"


def use_style() -> None:
    """Apply the artifact's seaborn theme and rcParams (idempotent; call once per notebook)."""
    sns.set_theme(context="paper", style="whitegrid", palette="colorblind")
    matplotlib.rcParams.update(STYLE)
    _pin_bundled_dejavu()


def _pin_bundled_dejavu() -> None:
    """Make "DejaVu Sans" (and its mathtext siblings) matplotlib's own font files. A machine with the system's
    DejaVu package (Debian's fonts-dejavu: version 2.37; matplotlib ships 2.35) can otherwise resolve the family
    to either file, depending on the order of the user's font cache: the PNGs stay the same, but the PDFs embed
    another font program and every PDF output changes its bytes (seen on the build machine in December 2026)."""
    from matplotlib import font_manager

    bundled = sorted((Path(matplotlib.get_data_path()) / "fonts" / "ttf").glob("DejaVu*.ttf"))
    keep = {str(p) for p in bundled}
    manager = font_manager.fontManager
    manager.ttflist = [f for f in manager.ttflist if not f.name.startswith("DejaVu") or f.fname in keep]
    known = {f.fname for f in manager.ttflist}
    for path in bundled:
        if str(path) not in known:
            manager.addfont(str(path))
    cached = getattr(manager, "_findfont_cached", None)   # findfont memoizes per properties (a private cache)
    if cached is not None:
        cached.cache_clear()


def demo_title(title: str, synthetic: bool | str) -> str:
    """``title`` with the synthetic-data mark when the figure is drawn from the demo data (``True``), or with the
    given mark (a str: floss.report.analysis.provenance)."""
    if isinstance(synthetic, str) and synthetic:
        return f"{title}\n({synthetic})"
    return f"{title}\n({DEMO_MARK})" if synthetic else title


def figure_paths(number: int | str, slug: str, root: str | os.PathLike | None = None,
                 formats: Sequence[str] = ("png", "pdf")) -> dict[str, Path]:
    """Where ``save_figure`` puts figure ``number``: ``<root>/figures/fig{number}_{slug}.{fmt}``."""
    if not str(slug) or any(ch in str(slug) for ch in "/\\ "):
        raise ValueError(f"slug: expected a file-name fragment without '/', '\\' or spaces, received {slug!r}")
    bad = [f for f in formats if f not in _METADATA]
    if bad:
        raise ValueError(f"formats: expected a subset of {sorted(_METADATA)}, received {list(formats)}")
    base = Path(root) / "figures" if root is not None else paths.FIGURES
    return {fmt: base / f"fig{number}_{slug}.{fmt}" for fmt in formats}


def save_figure(fig: matplotlib.figure.Figure, number: int | str, slug: str, *,
                root: str | os.PathLike | None = None, formats: Sequence[str] = ("png", "pdf"),
                close: bool = True) -> dict[str, Path]:
    """Save ``fig`` as ``figures/fig{number}_{slug}.png`` and ``.pdf`` with stable bytes; atomic writes.

    Returns the written paths by format. ``close=True`` releases the figure (notebooks draw many).
    """
    if not isinstance(fig, matplotlib.figure.Figure):
        raise TypeError(f"fig: expected a matplotlib Figure, received {type(fig).__name__}")
    out = figure_paths(number, slug, root, formats)
    for fmt, path in out.items():
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, metadata=_METADATA[fmt]))
    if close:
        plt.close(fig)
    logger.info("wrote figure %s (%s) to %s", number, slug, next(iter(out.values())).parent)
    return out


def class_grid(num_panels: int, *, ncols: int = 5, panel_size: tuple[float, float] = (2.6, 2.2),
               sharex: bool = False, sharey: bool = False):
    """A figure with one small axes per class (unused trailing axes hidden); returns ``(fig, axes_list)``."""
    if num_panels < 1:
        raise ValueError(f"num_panels: expected at least 1, received {num_panels}")
    ncols = min(ncols, num_panels)
    nrows = math.ceil(num_panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size[0] * ncols, panel_size[1] * nrows),
                             sharex=sharex, sharey=sharey, squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[num_panels:]:
        ax.set_visible(False)
    return fig, flat[:num_panels]


def template_colors(num_templates: int = 80) -> np.ndarray:
    """One colour per template id (the paper colours the single-template dots by template id)."""
    return np.asarray(sns.color_palette("husl", num_templates))


def bar_gains(ax, labels: Sequence[str], values: Sequence[float], *, color: str = FLOSS_COLOR,
              ylabel: str = "Δ IoU (pp)") -> None:
    """Bars of signed gains with a zero line and readable rotated class names."""
    x = np.arange(len(labels))
    vals = np.asarray(values, dtype=float)
    ax.bar(x, np.nan_to_num(vals), color=[color if v >= 0 else BASELINE_COLOR for v in np.nan_to_num(vals)])
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x, labels, rotation=60, ha="right")
    ax.set_ylabel(ylabel)


def mean_std_line(ax, x: Sequence[float], mean: Sequence[float], std: Sequence[float], *, label: str,
                  color: str = FLOSS_COLOR, marker: str = "o") -> None:
    """A mean line with a ±1 std band (low-data and ρ sweeps)."""
    x = np.asarray(x, dtype=float)
    mean = np.asarray(mean, dtype=float)
    std = np.nan_to_num(np.asarray(std, dtype=float))
    ax.plot(x, mean, marker=marker, color=color, label=label)
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)


def message_figure(title: str, message: str, *, size: tuple[float, float] = (7.0, 2.2)) -> matplotlib.figure.Figure:
    """A figure that only says why it has no data (a run params.yaml did not make, the authors' data offline):
    the pipeline still writes every declared figure, and the reader sees the reason instead of a gap."""
    import textwrap

    fig, ax = plt.subplots(figsize=size)
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, "\n".join(textwrap.wrap(message, 90)), ha="center", va="center", fontsize=9,
            transform=ax.transAxes)
    return fig
