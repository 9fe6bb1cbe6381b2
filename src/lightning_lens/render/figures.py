"""matplotlib figures through the object API only (``Figure`` + ``FigureCanvasAgg``): no pyplot state, no ``show``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_lens.utils.checks import check_instance, check_int

__all__ = ["figure_to_array", "new_figure", "plot_curves", "plot_heatmap_matrix"]

SeriesLike = Union[Sequence[float], np.ndarray, torch.Tensor]


def new_figure(
    nrows: int = 1,
    ncols: int = 1,
    figsize: Optional[tuple[float, float]] = None,
    dpi: int = 100,
) -> tuple[Figure, Any]:
    """A ``Figure`` with an Agg canvas and its axes, like ``plt.subplots`` but without pyplot's global state.

    Returns ``(fig, axes)``: one ``Axes`` for 1x1, else a numpy array of axes (squeezed as ``plt.subplots`` does).
    The figure is garbage-collected normally; nothing registers it globally, so no ``close`` is needed.

    Example:
        >>> fig, ax = new_figure()
        >>> _ = ax.plot([0, 1], [1, 0])
        >>> figure_to_array(fig).dtype
        dtype('uint8')
    """
    check_int(nrows, "nrows", minimum=1)
    check_int(ncols, "ncols", minimum=1)
    check_int(dpi, "dpi", minimum=1)
    if figsize is None:
        figsize = (4.0 * ncols, 3.2 * nrows)
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=True)
    return fig, axes


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render ``fig`` with Agg and return its pixels as uint8 (H, W, 3); the figure is left open and unchanged.

    Example:
        >>> fig, ax = new_figure(figsize=(2, 1), dpi=50)
        >>> figure_to_array(fig).shape
        (50, 100, 3)
    """
    check_instance(fig, "fig", Figure, hint="matplotlib.figure.Figure, e.g. from new_figure()")
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.array(np.asarray(canvas.buffer_rgba())[..., :3], dtype=np.uint8)


def _series(values: SeriesLike, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def plot_curves(
    x: SeriesLike,
    ys: Mapping[str, SeriesLike],
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    xticklabels: Optional[Sequence[str]] = None,
    bands: Optional[Mapping[str, tuple[SeriesLike, SeriesLike]]] = None,
    ylim: Optional[tuple[float, float]] = None,
    figsize: Optional[tuple[float, float]] = None,
    band_label: Optional[str] = None,
) -> Figure:
    """Line plot of named series over a shared x, with optional shaded bands (e.g. mean +- std over probes).

    Used for sanity-check similarity curves (x = randomized layers, ``xticklabels`` their names) and intervention
    curves (x = fraction of features removed).

    Args:
        x: x positions, length n.
        ys: series name -> n values (one line each, in the mapping's order; NaN leaves a gap).
        title, xlabel, ylabel: texts.
        xticklabels: a label per x position (drawn rotated when long).
        bands: series name -> (low, high) arrays drawn as a translucent band in the series' colour.
        ylim: y-axis limits.
        figsize: inches; default grows with the number of x ticks.
        band_label: what the bands are (e.g. ``"band: +- 1 std over 5 random orders"``), one legend entry; the legend
            then sits right of the plot, where it covers no curve.

    Example:
        >>> fig = plot_curves([0, 1, 2], {"gradient": [1.0, 0.5, 0.1]}, title="MPRT", ylabel="SSIM")
        >>> figure_to_array(fig).ndim
        3
    """
    xs = _series(x, "x")
    check_instance(ys, "ys", Mapping, hint="a dict mapping series names to values")
    if not ys:
        raise ValueError("ys must be a non-empty dict mapping series names to values")
    if xticklabels is not None and len(xticklabels) != len(xs):
        raise ValueError(f"xticklabels has {len(xticklabels)} entries for {len(xs)} x positions")
    if figsize is None:
        figsize = (max(5.0, 0.45 * len(xs) + 2.5), 3.8)
    fig, ax = new_figure(figsize=figsize)
    for name, values in ys.items():
        arr = _series(values, f"ys[{name!r}]")
        if len(arr) != len(xs):
            raise ValueError(f"ys[{name!r}] has {len(arr)} values for {len(xs)} x positions")
        (line,) = ax.plot(xs, arr, marker="o", markersize=3.5, label=str(name))
        if bands is not None and name in bands:
            low, high = (_series(v, f"bands[{name!r}]") for v in bands[name])
            if len(low) != len(xs) or len(high) != len(xs):
                raise ValueError(f"bands[{name!r}] must hold two arrays of {len(xs)} values")
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    if bands is not None:
        unknown = set(bands) - set(ys)
        if unknown:
            raise ValueError(f"bands names series that are not in ys: {sorted(unknown)}")
    if xticklabels is not None:
        ax.set_xticks(xs)
        long = max((len(str(t)) for t in xticklabels), default=0) > 6
        ax.set_xticklabels([str(t) for t in xticklabels], rotation=60 if long else 0, ha="right" if long else "center")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if bands and band_label:
        from matplotlib.patches import Patch

        handles, labels = ax.get_legend_handles_labels()
        handles.append(Patch(color="0.5", alpha=0.2, linewidth=0))
        labels.append(str(band_label))
        ax.legend(handles, labels, fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    elif len(ys) > 1 or bands:
        ax.legend(fontsize="small")
    return fig


def plot_heatmap_matrix(
    matrix: Union[np.ndarray, torch.Tensor, Sequence[Sequence[float]]],
    row_labels: Optional[Sequence[str]] = None,
    col_labels: Optional[Sequence[str]] = None,
    title: str = "",
    cmap: str = "viridis",
    annotate: Optional[bool] = None,
    fmt: Optional[str] = None,
    xlabel: str = "",
    ylabel: str = "",
    center: Optional[float] = None,
) -> Figure:
    """A matrix as a coloured table with a colorbar and (for small matrices) the values written in the cells.

    Signed values (an accuracy drop that is sometimes a gain) take ``center=0`` with a diverging ``cmap`` such as
    ``"RdBu_r"``: the colour scale is then symmetric around ``center``, so ``center`` is the colormap's neutral
    middle colour and equal magnitudes above and below it get equally strong colours.

    Used e.g. for expert x class routing counts and confusion-like summaries.

    Args:
        matrix: (R, C) numbers; NaN cells are left blank.
        row_labels, col_labels: tick labels (default: indices).
        title, xlabel, ylabel: texts.
        cmap: a matplotlib colormap name (sequential; diverging with ``center``).
        annotate: write values in cells; default when R * C <= 400.
        fmt: format of the values; default ``"d"`` for integral matrices, else ``".2g"``.
        center: the value at the middle of the colour scale (symmetric limits around it); None: min to max.

    Example:
        >>> fig = plot_heatmap_matrix([[3, 0], [1, 5]], ["expert 0", "expert 1"], ["0", "1"], title="routing")
        >>> figure_to_array(fig).dtype
        dtype('uint8')
    """
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().cpu().numpy()
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"matrix must be a non-empty 2-D array, got shape {m.shape}")
    n_rows, n_cols = m.shape
    if row_labels is not None and len(row_labels) != n_rows:
        raise ValueError(f"row_labels has {len(row_labels)} entries for {n_rows} rows")
    if col_labels is not None and len(col_labels) != n_cols:
        raise ValueError(f"col_labels has {len(col_labels)} entries for {n_cols} columns")
    finite = m[np.isfinite(m)]
    if fmt is None:
        fmt = "d" if finite.size and np.all(finite == np.round(finite)) else ".2g"
    if annotate is None:
        annotate = m.size <= 400
    fig, ax = new_figure(figsize=(max(4.0, 0.55 * n_cols + 2.5), max(3.0, 0.45 * n_rows + 1.5)))
    vmin = float(finite.min()) if finite.size else 0.0
    vmax = float(finite.max()) if finite.size else 1.0
    if center is not None:
        reach = max(abs(vmax - float(center)), abs(vmin - float(center)))
        reach = reach if reach > 0 else 1.0
        vmin, vmax = float(center) - reach, float(center) + reach
    if vmax <= vmin:
        vmax = vmin + 1.0
    image = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(np.arange(n_cols))
    ax.set_yticks(np.arange(n_rows))
    ax.set_xticklabels([str(v) for v in (col_labels if col_labels is not None else range(n_cols))])
    ax.set_yticklabels([str(v) for v in (row_labels if row_labels is not None else range(n_rows))])
    if col_labels is not None and max((len(str(c)) for c in col_labels), default=0) > 4:
        for label in ax.get_xticklabels():
            label.set_rotation(45)
            label.set_ha("right")
    if annotate:
        cmap_obj = image.get_cmap()
        for i in range(n_rows):
            for j in range(n_cols):
                value = m[i, j]
                if not np.isfinite(value):
                    continue
                text = format(int(round(value)), fmt) if fmt == "d" else format(value, fmt)
                r, g, b, _ = cmap_obj((value - vmin) / (vmax - vmin))
                color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                ax.text(j, i, text, ha="center", va="center", color=color, fontsize="small")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return fig
