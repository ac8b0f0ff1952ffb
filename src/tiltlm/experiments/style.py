"""How the study kit draws and writes numbers: one number format (`fmt`), figures on an explicit Agg canvas (no pyplot,
no global backend state), the colours and markers every figure shares, wrapped legend entries."""

from __future__ import annotations

import math
from pathlib import Path

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]


MARKERS, STYLES = "osD^vPX*<>", ["-", "--", ":", "-."]


DPI = 110


def fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "—"
    if math.isnan(x) or math.isinf(x):
        return "NaN" if math.isnan(x) else ("∞" if x > 0 else "-∞")
    return "0" if x == 0 else f"{x:.{digits - 2}e}" if abs(x) < 1e-3 else f"{x:#.{digits}g}".rstrip(".")


def fmt_beta(beta: float | None) -> str:
    return "—" if beta is None else f"{beta:g}"


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # explicit Agg canvas: no pyplot, no global backend state
    return fig


def save_figure(fig, path: Path) -> None:
    fig.savefig(path, dpi=DPI, metadata={"Software": None})


def legend_label(text: str, width: int = 32) -> str:
    """A legend entry wrapped onto lines of ``width`` characters: a long algorithm label must not squeeze the axes away."""
    import textwrap

    return "\n".join(textwrap.wrap(text, width, break_long_words=True, break_on_hyphens=True)) or text


def style_of(algorithms: list[str]) -> dict[str, tuple[str, str]]:
    return {a: (COLOURS[i % len(COLOURS)], MARKERS[i % len(MARKERS)]) for i, a in enumerate(algorithms)}
