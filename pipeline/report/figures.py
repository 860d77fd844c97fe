"""Charts of every report (matplotlib, the Agg backend), returned as `data:image/png` URIs so a
page needs no file beside it. Each function draws one figure and closes it."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from contextlib import contextmanager


@contextmanager
def axes(width: float = 5.0, height: float = 3.0):
    """A figure's axes with the reports' look; the figure is closed on leaving."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(width, height))
    ax.spines[["top", "right"]].set_visible(False)
    try:
        yield ax
    finally:
        plt.close(figure)


def png(ax_or_figure) -> str:
    """The figure as a `data:image/png;base64,...` URI."""
    figure = getattr(ax_or_figure, "figure", ax_or_figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def jpeg(image, *, max_side: int = 320, quality: int = 80) -> str:
    """A PIL image, shrunk to `max_side`, as a `data:image/jpeg` URI (sample grids)."""
    image = image.convert("RGB")
    image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def histograms(series: dict[str, Sequence[float]], *, bins, xlabel: str, ylabel: str = "count", log: bool = False) -> str:
    """Overlaid histograms of each named series on the same bins ("" when all are empty)."""
    if not any(len(values) for values in series.values()):
        return ""
    with axes() as ax:
        for name, values in series.items():
            if len(values):
                ax.hist(values, bins=bins, alpha=0.55, label=f"{name} ({len(values):,})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.legend(frameon=False, fontsize=8)
        return png(ax)


def lines(series: dict[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str, ylabel: str, log: bool = False,
          width: float = 5.0, from_zero: bool = False) -> str:
    """One line per named (x, y) series ("" when there is none); `from_zero`: the y axis starts at 0
    (a rate, whose small wobbles should not fill the chart)."""
    series = {name: xy for name, xy in series.items() if len(xy[0])}
    if not series:
        return ""
    with axes(width=width) as ax:
        for name, (x, y) in series.items():
            ax.plot(x, y, label=name, marker="." if len(x) < 30 else None, linewidth=1.2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        elif from_zero:
            ax.set_ylim(bottom=0)
        if len(series) > 1:
            ax.legend(frameon=False, fontsize=8)
        return png(ax)
