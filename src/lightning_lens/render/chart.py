"""Line charts rasterized straight into a uint8 array: stacked panels over one categorical x axis.

What a callback logs during training must cost little: a matplotlib ``Figure`` of a few panels with a legend spends
~0.1 s laying out and rasterizing its text, most of a monitoring callback's budget on a small model. This module
draws the same picture (lines with markers, interquartile bands, dashed reference lines, grid, rotated category
labels, a legend under the plot) with numpy and the FreeType glyphs of :mod:`lightning_lens.render.grid`, in a few
milliseconds. Geometry is exact and exposed (:class:`LineChart` maps values to pixels), so tests can read a plot back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from lightning_lens.render.grid import _draw_text, _TextMeasurer
from lightning_lens.utils.checks import check_choice, check_int

__all__ = ["ChartPanel", "ChartSeries", "LineChart", "TAB10"]

Color = tuple[int, int, int]

#: matplotlib's default colour cycle ("C0".."C9"), so raster charts and Figures colour methods alike.
TAB10: tuple[Color, ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)
_AXIS = (60, 60, 60)
_GRID = (225, 225, 225)
_GRAY = (102, 102, 102)


@dataclass
class ChartSeries:
    """One line: ``y[i]`` at category ``i`` (NaN leaves a gap), optionally a band ``(low, high)`` drawn at
    ``band_alpha`` and a dashed horizontal reference line at ``reference``."""

    label: str
    y: Sequence[float]
    color: Color
    marker: str = "o"
    width: float = 2.0
    band: Optional[tuple[Sequence[float], Sequence[float]]] = None
    reference: Optional[float] = None
    band_alpha: float = 0.15


@dataclass
class ChartPanel:
    """One panel: its y label, its value range and its series."""

    y_label: str
    y_range: tuple[float, float]
    series: list[ChartSeries] = field(default_factory=list)


class LineChart:
    """Stacked panels sharing the x axis; ``draw()`` returns the uint8 ``(H, W, 3)`` image.

    Args:
        panels: the panels, top to bottom.
        x_labels: one label per category, drawn rotated (reading upwards) under the last panel.
        title: lines above the plot. x_title: a line under the category labels.
        legend: ``(label, color, style)`` entries under the plot in two columns; style is ``"line"`` (with the
            marker of the series of that label, if any), ``"dashed"``, ``"band"`` or ``"marker"``.
        width: image width in pixels. panel_height: plot height of one panel in pixels. fontsize: text size in pixels.

    Example:
        >>> chart = LineChart([ChartPanel("score", (0.0, 1.0), [ChartSeries("a", [0.0, 0.5, 1.0], TAB10[0])])],
        ...                   ["x0", "x1", "x2"])
        >>> image = chart.draw()
        >>> image.dtype, image.shape[2], image[chart.y_pixel(0, 0.5), chart.x_pixel(1)].tolist()
        (dtype('uint8'), 3, [31, 119, 180])
    """

    def __init__(
        self,
        panels: Sequence[ChartPanel],
        x_labels: Sequence[str],
        *,
        title: Sequence[str] = (),
        x_title: Optional[str] = None,
        legend: Sequence[tuple[str, Color, str]] = (),
        width: int = 520,
        panel_height: int = 190,
        fontsize: float = 12.0,
    ) -> None:
        if not panels:
            raise ValueError("panels must hold at least one ChartPanel")
        if not x_labels:
            raise ValueError("x_labels must name at least one category")
        for p, panel in enumerate(panels):
            low, high = panel.y_range
            if not (math.isfinite(low) and math.isfinite(high) and high > low):
                raise ValueError(f"panels[{p}].y_range must be finite with low < high, got {panel.y_range}")
            for series in panel.series:
                check_choice(series.marker, "marker", ("o", "s", "none"))
                if len(series.y) != len(x_labels):
                    raise ValueError(f"series {series.label!r} has {len(series.y)} values for {len(x_labels)} x_labels")
        for _, _, style in legend:
            check_choice(style, "legend style", ("line", "dashed", "band", "marker"))
        self.panels = list(panels)
        self.x_labels = [str(x) for x in x_labels]
        self.title = list(title)
        self.x_title = x_title
        self.legend = list(legend)
        self.width = check_int(width, "width", minimum=120)
        self.panel_height = check_int(panel_height, "panel_height", minimum=40)
        self.text = _TextMeasurer(fontsize)
        self.small = _TextMeasurer(max(8.0, fontsize - 1.5))
        lh = self.text.line_height
        # layout, top to bottom: title, panels (gap between), rotated x labels, x title, legend
        y_label_w = lh + 4
        tick_w = max(self.small.width(self._tick_text(v)) for p in self.panels for v in self._ticks(p))
        self.left = int(math.ceil(y_label_w + tick_w + 10))
        self.right = self.width - 14
        self.top = len(self.title) * lh + (8 if self.title else 6)
        self.gap = 10
        self.panel_top = [self.top + i * (self.panel_height + self.gap) for i in range(len(self.panels))]
        plot_bottom = self.panel_top[-1] + self.panel_height
        self.labels_h = int(math.ceil(max(self.small.width(x) for x in self.x_labels))) + 8
        self.x_title_y = plot_bottom + self.labels_h + 4
        legend_top = self.x_title_y + (lh + 6 if x_title else 2)
        self.legend_top = legend_top
        self.legend_rows = [self._wrap_legend(label) for label, _, _ in self.legend]
        rows = [max(len(self.legend_rows[i]), len(self.legend_rows[i + 1]) if i + 1 < len(self.legend) else 0)
                for i in range(0, len(self.legend), 2)]
        self.legend_row_h = [n * self.small.line_height + 4 for n in rows]
        self.height = legend_top + sum(self.legend_row_h) + 6

    # ------------------------------------------------------------------------------------------------------- geometry
    def x_pixel(self, i: float) -> int:
        """Pixel column of category ``i``."""
        return int(round(self._x(i)))

    def y_pixel(self, panel: int, value: float) -> int:
        """Pixel row of ``value`` in panel ``panel``."""
        return int(round(self._y(panel, value)))

    def _x(self, i: float) -> float:
        n = len(self.x_labels)
        inner = 18.0
        span = self.right - self.left - 2 * inner
        return self.left + inner + (span * i / (n - 1) if n > 1 else span / 2)

    def _y(self, panel: int, value: float) -> float:
        low, high = self.panels[panel].y_range
        top = self.panel_top[panel] + 4.0
        bottom = self.panel_top[panel] + self.panel_height - 4.0
        return bottom - (value - low) / (high - low) * (bottom - top)

    @staticmethod
    def _ticks(panel: ChartPanel) -> list[float]:
        low, high = panel.y_range
        raw = (high - low) / 5
        magnitude = 10 ** math.floor(math.log10(raw))
        step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw), default=raw)
        first = math.ceil(low / step - 1e-9) * step
        return [round(first + k * step, 10) for k in range(int((high - first) / step + 1e-9) + 1)]

    @staticmethod
    def _tick_text(value: float) -> str:
        return f"{value:g}"

    def _wrap_legend(self, label: str) -> list[str]:
        column = (self.width - 2 * 10) / 2 - 34
        return [line for part in label.split("\n") for line in self.small.wrap(part, column, max_lines=3)]

    # -------------------------------------------------------------------------------------------------------- drawing
    def draw(self) -> np.ndarray:
        canvas = np.full((self.height, self.width, 3), 255.0, dtype=np.float32)
        texts: list[tuple[float, float, list[str], str, Optional[Color]]] = []
        small: list[tuple[float, float, list[str], str, Optional[Color]]] = []
        if self.title:
            texts.append((8, 4, self.title, "left", None))
        for p, panel in enumerate(self.panels):
            top, bottom = self.panel_top[p], self.panel_top[p] + self.panel_height
            for value in self._ticks(panel):
                y = self._y(p, value)
                _hline(canvas, y, self.left, self.right, _GRID, 1.0)
                small.append((self.left - 6 - self.small.width(self._tick_text(value)),
                              y - self.small.line_height / 2, [self._tick_text(value)], "left", None))
            for i in range(len(self.x_labels)):
                _vline(canvas, self._x(i), top, bottom, _GRID)
            for series in panel.series:
                self._draw_series(canvas, p, series)
            _frame(canvas, top, self.left, bottom, self.right, _AXIS)
            label = _rotated(self.text, panel.y_label)
            _stamp(canvas, label, (top + bottom) / 2 - label.shape[0] / 2, 4, (0, 0, 0))
        bottom = self.panel_top[-1] + self.panel_height
        for i, name in enumerate(self.x_labels):
            _vline(canvas, self._x(i), bottom, bottom + 4, _AXIS)
            label = _rotated(self.small, name)
            _stamp(canvas, label, bottom + 6, self._x(i) - label.shape[1] / 2, (0, 0, 0))
        if self.x_title:
            texts.append((self.width / 2, self.x_title_y, [self.x_title], "center", None))
        y = float(self.legend_top)
        for row, height in enumerate(self.legend_row_h):
            for col in range(2):
                k = 2 * row + col
                if k >= len(self.legend):
                    break
                label, color, style = self.legend[k]
                x = 10 + col * (self.width - 20) / 2
                self._draw_legend_key(canvas, x, y + self.small.line_height / 2 + 1, color, style, label)
                small.append((x + 30, y, self.legend_rows[k], "left", None))
            y += height
        out = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
        _draw_text(out, texts, self.text)
        _draw_text(out, small, self.small)
        return out

    def _draw_series(self, canvas: np.ndarray, p: int, s: ChartSeries) -> None:
        xs = [self._x(i) for i in range(len(s.y))]
        if s.band is not None:
            low, high = (np.asarray(b, dtype=np.float64) for b in s.band)
            for i in range(len(xs) - 1):
                ends = (low[i], high[i], low[i + 1], high[i + 1])
                if all(math.isfinite(v) for v in ends):
                    _band(canvas, xs[i], xs[i + 1], self._y(p, low[i]), self._y(p, high[i]),
                          self._y(p, low[i + 1]), self._y(p, high[i + 1]), s.color, s.band_alpha)
        if s.reference is not None and math.isfinite(s.reference):
            _hline(canvas, self._y(p, s.reference), self.left + 1, self.right - 1, s.color, 1.0, dash=(5, 3))
        ys = [self._y(p, v) if math.isfinite(v) else math.nan for v in s.y]
        for i in range(len(xs) - 1):
            if math.isfinite(ys[i]) and math.isfinite(ys[i + 1]):
                _segment(canvas, xs[i], ys[i], xs[i + 1], ys[i + 1], s.width, s.color)
        for x, y in zip(xs, ys):
            if math.isfinite(y) and s.marker != "none":
                _marker(canvas, x, y, 3.2, s.color, s.marker)

    def _draw_legend_key(self, canvas: np.ndarray, x: float, y: float, color: Color, style: str, label: str) -> None:
        if style == "band":
            _band(canvas, x, x + 24, y + 5, y - 5, y + 5, y - 5, color, 0.15)
        elif style == "dashed":
            _hline(canvas, y, int(x), int(x + 24), color, 1.0, dash=(5, 3))
        elif style == "marker":
            _marker(canvas, x + 12, y, 3.2, color, "o")
        else:
            marker = next((s.marker for p in self.panels for s in p.series if s.label == label), "none")
            width = next((s.width for p in self.panels for s in p.series if s.label == label), 2.0)
            _segment(canvas, x, y, x + 24, y, width, color)
            if marker != "none":
                _marker(canvas, x + 12, y, 3.2, color, marker)


# ---------------------------------------------------------------------------------------------------- raster helpers
def _blend(canvas: np.ndarray, y0: int, x0: int, coverage: np.ndarray, color: Color, alpha: float = 1.0) -> None:
    """Composite ``color`` over the canvas with per-pixel ``coverage`` (clipped to the canvas)."""
    h, w = coverage.shape
    H, W = canvas.shape[:2]
    ya, xa, yb, xb = max(y0, 0), max(x0, 0), min(y0 + h, H), min(x0 + w, W)
    if yb <= ya or xb <= xa:
        return
    a = (coverage[ya - y0 : yb - y0, xa - x0 : xb - x0] * alpha)[..., None]
    region = canvas[ya:yb, xa:xb]
    region *= 1.0 - a
    region += a * np.asarray(color, dtype=np.float32)


def _segment(canvas: np.ndarray, x0: float, y0: float, x1: float, y1: float, width: float, color: Color) -> None:
    """An antialiased line of ``width`` pixels (coverage from the distance of each pixel centre to the segment)."""
    pad = width / 2 + 1.5
    left, top = int(math.floor(min(x0, x1) - pad)), int(math.floor(min(y0, y1) - pad))
    right, bottom = int(math.ceil(max(x0, x1) + pad)), int(math.ceil(max(y0, y1) + pad))
    ys, xs = np.mgrid[top:bottom, left:right].astype(np.float32)
    dx, dy = x1 - x0, y1 - y0
    length2 = dx * dx + dy * dy
    t = np.zeros_like(xs) if length2 == 0 else np.clip(((xs - x0) * dx + (ys - y0) * dy) / length2, 0.0, 1.0)
    dist = np.hypot(xs - (x0 + t * dx), ys - (y0 + t * dy))
    _blend(canvas, top, left, np.clip(width / 2 + 0.5 - dist, 0.0, 1.0), color)


def _marker(canvas: np.ndarray, x: float, y: float, radius: float, color: Color, shape: str) -> None:
    top, left = int(math.floor(y - radius - 1)), int(math.floor(x - radius - 1))
    size = int(math.ceil(2 * radius + 3))
    ys, xs = np.mgrid[top : top + size, left : left + size].astype(np.float32)
    if shape == "s":
        dist = np.maximum(np.abs(xs - x), np.abs(ys - y))
    else:
        dist = np.hypot(xs - x, ys - y)
    _blend(canvas, top, left, np.clip(radius + 0.5 - dist, 0.0, 1.0), color)


def _hline(canvas: np.ndarray, y: float, x0: int, x1: int, color: Color, width: float,
           dash: Optional[tuple[int, int]] = None) -> None:
    """A horizontal line at fractional row ``y`` (its coverage split over the two rows it straddles)."""
    row = int(math.floor(y))
    frac = y - row
    xs = np.arange(int(x0), int(x1) + 1)
    on = np.ones(len(xs), dtype=np.float32)
    if dash is not None:
        on = (((xs - xs[0]) % sum(dash)) < dash[0]).astype(np.float32)
    coverage = np.stack([on * (1.0 - frac), on * frac]) * width
    _blend(canvas, row, int(x0), np.clip(coverage, 0.0, 1.0), color)


def _vline(canvas: np.ndarray, x: float, y0: float, y1: float, color: Color) -> None:
    col = int(round(x))
    _blend(canvas, int(y0), col, np.ones((max(1, int(y1) - int(y0)), 1), dtype=np.float32), color)


def _frame(canvas: np.ndarray, top: int, left: int, bottom: int, right: int, color: Color) -> None:
    canvas[top, left : right + 1] = color
    canvas[bottom, left : right + 1] = color
    canvas[top : bottom + 1, left] = color
    canvas[top : bottom + 1, right] = color


def _band(canvas: np.ndarray, xa: float, xb: float, lo_a: float, hi_a: float, lo_b: float, hi_b: float,
          color: Color, alpha: float) -> None:
    """Fill between two straight edges from column ``xa`` to ``xb`` (pixel rows, y grows downwards)."""
    c0, c1 = int(math.ceil(xa)), int(math.floor(xb))
    if c1 < c0:
        return
    cols = np.arange(c0, c1 + 1, dtype=np.float32)
    t = (cols - xa) / (xb - xa) if xb > xa else np.zeros_like(cols)
    edge1, edge2 = lo_a + t * (lo_b - lo_a), hi_a + t * (hi_b - hi_a)
    upper, lower = np.minimum(edge1, edge2), np.maximum(edge1, edge2)
    top, bottom = int(math.floor(upper.min())), int(math.ceil(lower.max())) + 1
    rows = np.arange(top, bottom, dtype=np.float32)[:, None] + 0.5
    coverage = np.clip(np.minimum(rows - upper[None, :] + 0.5, lower[None, :] - rows + 0.5), 0.0, 1.0)
    _blend(canvas, top, c0, coverage.astype(np.float32), color, alpha)


def _rotated(measurer: _TextMeasurer, text: str) -> np.ndarray:
    """The coverage of one line of text turned 90 degrees counter-clockwise (it reads upwards)."""
    coverage, _ = measurer.render(text)
    return np.rot90(coverage).astype(np.float32) / 255.0


def _stamp(canvas: np.ndarray, coverage: np.ndarray, y: float, x: float, color: Color) -> None:
    _blend(canvas, int(round(y)), int(round(x)), coverage, color)
