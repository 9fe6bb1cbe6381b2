"""Labelled image grids as uint8 arrays (rows and columns named), text rasterized by matplotlib's FreeType fonts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import torch
from matplotlib.font_manager import FontProperties, findfont, get_font

from lightning_lens.render.heatmap import DIVERGING_CMAP, SEQUENTIAL_CMAP, colorize, to_rgb_uint8
from lightning_lens.utils.checks import check_choice, check_int, check_optional, check_positive_number

__all__ = ["MISTAKE_COLOR", "colorbar_strip", "image_grid"]

Cell = Union[np.ndarray, torch.Tensor, None]
Color = tuple[int, int, int]

#: Colour of what marks a wrong prediction (label text, cell frame): a saturated red.
MISTAKE_COLOR: Color = (200, 0, 0)
_COLORBAR_WIDTH = 14

_DEFAULT_CELL = 96
_PAD = 4
_BACKGROUND = 255
_TEXT_COLOR = (0, 0, 0)


def _as_cell(cell: Cell, where: str) -> Optional[np.ndarray]:
    if cell is None:
        return None
    if isinstance(cell, np.ndarray) and cell.dtype == np.uint8:
        arr = cell
        if arr.ndim == 3 and arr.shape[-1] == 4:
            arr = arr[..., :3]
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"cells{where} must be uint8 (H, W), (H, W, 3|4) or a float (C, H, W), got {arr.shape}")
        return arr
    if isinstance(cell, np.ndarray) and cell.ndim == 3 and cell.shape[-1] in (3, 4) and cell.shape[0] not in (1, 3):
        cell = np.ascontiguousarray(cell[..., :3].transpose(2, 0, 1))  # float HWC -> CHW
    try:
        return to_rgb_uint8(cell, scale="clip")  # type: ignore[arg-type]
    except ValueError as err:
        raise ValueError(f"cells{where}: {err}") from err


def _resize_nearest(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize: keeps tiny images' pixels crisp when upscaled by integer-ish factors."""
    h, w = img.shape[:2]
    if (h, w) == (height, width):
        return img
    rows = np.minimum((np.arange(height) + 0.5) * h / height, h - 1).astype(np.int64)
    cols = np.minimum((np.arange(width) + 0.5) * w / width, w - 1).astype(np.int64)
    return img[rows[:, None], cols[None, :]]


#: rasterized lines of text by (font file, size, text), oldest dropped first beyond _RENDERED_MAX entries
_RENDERED: dict[tuple[str, float, str], tuple[np.ndarray, int]] = {}
_RENDERED_MAX = 4096


class _TextMeasurer:
    """Measures, wraps and rasterizes strings with matplotlib's FreeType font objects (72 dpi: 1 point = 1 pixel).

    This is the glyph path the Agg backend itself uses, without building and drawing a ``Figure`` per grid.
    """

    def __init__(self, fontsize: float) -> None:
        self.prop = FontProperties(size=fontsize)
        self.fontsize = float(fontsize)
        self.font = get_font(findfont(self.prop))
        self.font.set_size(self.fontsize, 72)
        self.ascent = int(np.ceil(self.fontsize * self.font.ascender / self.font.units_per_EM))
        self.line_height = int(np.ceil(self.fontsize * 1.25))
        self._advance: dict[str, float] = {}

    def width(self, text: str) -> float:
        """Sum of glyph advances (kerning ignored: at most a pixel or two wider than drawn)."""
        total = 0.0
        for ch in text:
            if ch not in self._advance:
                try:
                    self._advance[ch] = self.font.load_char(ord(ch)).linearHoriAdvance / 65536.0
                except (RuntimeError, ValueError):
                    self._advance[ch] = 0.6 * self.fontsize
            total += self._advance[ch]
        return total

    def render(self, text: str) -> tuple[np.ndarray, int]:
        """(coverage uint8 (h, w), descent in pixels) of one line (read-only: shared by a cache, since the same
        labels come back every epoch and FreeType's layout is most of a grid's drawing time)."""
        key = (self.font.fname, self.fontsize, text)
        cached = _RENDERED.get(key)
        if cached is None:
            self.font.set_size(self.fontsize, 72)
            self.font.set_text(text, 0.0)
            self.font.draw_glyphs_to_bitmap(antialiased=True)
            coverage = np.array(self.font.get_image())
            coverage.setflags(write=False)
            cached = (coverage, int(round(self.font.get_descent() / 64.0)))
            if len(_RENDERED) >= _RENDERED_MAX:
                _RENDERED.pop(next(iter(_RENDERED)))  # the oldest entry
            _RENDERED[key] = cached
        return cached

    def wrap(self, text: str, max_width: float, max_lines: int = 3) -> list[str]:
        """Split ``text`` into lines no wider than ``max_width``: at spaces, ``_``, ``/``, ``.``, ``-``, or anywhere."""
        lines: list[str] = []
        for paragraph in str(text).split("\n"):
            current = ""
            for token in _tokens(paragraph):
                candidate = current + token
                if self.width(candidate.rstrip()) <= max_width or not current:
                    current = candidate
                else:
                    lines.append(current.rstrip())
                    current = token.lstrip()
                while self.width(current) > max_width and len(current) > 1:  # hard break a long token
                    cut = len(current) - 1
                    while cut > 1 and self.width(current[:cut]) > max_width:
                        cut -= 1
                    lines.append(current[:cut])
                    current = current[cut:]
            lines.append(current.rstrip())
        if len(lines) > max_lines:
            lines = lines[:max_lines]
            last = lines[-1]
            while last and self.width(last + "…") > max_width:
                last = last[:-1]
            lines[-1] = last + "…"
        return lines


def _tokens(text: str) -> list[str]:
    out, current = [], ""
    for ch in text:
        current += ch
        if ch in " _/.-":
            out.append(current)
            current = ""
    if current:
        out.append(current)
    return out


def _check_rows_of_images(value: object, argument: str, expected: str) -> None:
    # a lone array or tensor is a Sequence too, but never a list of rows or of images
    if isinstance(value, (np.ndarray, torch.Tensor, str)) or not isinstance(value, Sequence):
        raise TypeError(f"{argument} must be {expected}, got {type(value).__name__}")


def image_grid(
    cells: Sequence[Sequence[Cell]],
    row_labels: Optional[Sequence[str]] = None,
    col_labels: Optional[Sequence[str]] = None,
    cell_size: Optional[int] = None,
    title: Optional[str] = None,
    fontsize: Optional[float] = None,
    pad: int = _PAD,
    cell_captions: Optional[Sequence[Sequence[Optional[str]]]] = None,
    row_label_colors: Optional[Sequence[Optional[Color]]] = None,
    col_label_colors: Optional[Sequence[Optional[Color]]] = None,
    cell_frames: Optional[Sequence[Sequence[Optional[Color]]]] = None,
    colorbar: Optional[str] = None,
    colorbar_labels: Optional[Sequence[str]] = None,
) -> np.ndarray:
    """Assemble images into one labelled uint8 (H, W, 3) grid (white background, black text).

    Every cell is resized (nearest neighbour, aspect ratio kept) to ``cell_size`` pixels high, so 32x32 inputs and
    8x8 CAMs line up and stay crisp. Rows may have different lengths and cells may be None (left blank). Labels
    longer than a cell are wrapped (at most 3 lines, then an ellipsis).

    Args:
        cells: rows of images: uint8 (H, W, 3) / (H, W) arrays, or float (C, H, W) tensors in [0, 1].
        row_labels: one label per row, drawn left of the row.
        col_labels: one label per column, drawn above the column.
        cell_size: cell height in pixels; default: 96, or the tallest cell if taller.
        title: optional line of text above everything.
        fontsize: label size in pixels; default scales with ``cell_size`` (about 14 px at 96).
        pad: pixels between cells.
        cell_captions: text under individual cells (rows like ``cells``, possibly fewer; None: no caption), e.g. a
            neighbour's class under the neighbour, or "map is zero" under an empty map (at most 3 lines each).
        row_label_colors, col_label_colors: an RGB colour per label (None: black), e.g. :data:`MISTAKE_COLOR` for
            a wrong prediction.
        cell_frames: an RGB frame colour per cell (rows like ``cells``, possibly fewer; None: no frame), drawn in the
            padding around the cell (3 px, or inside the cell when ``pad`` is 0).
        colorbar: ``"signed"`` or ``"absolute"`` appends the colour scale of :func:`~lightning_lens.render.heatmap`'s
            diverging or sequential colormap right of the grid (see :func:`colorbar_strip`).
        colorbar_labels: the scale's tick labels, top to bottom (default ``+max, 0, -max`` or ``max, 0``).

    Example:
        >>> grid = image_grid([[np.zeros((32, 32, 3), np.uint8)] * 2], row_labels=["probe 0"], col_labels=["a", "b"])
        >>> grid.dtype, grid.shape[2]
        (dtype('uint8'), 3)
    """
    _check_rows_of_images(cells, "cells", "a list of rows (lists of images)")
    if not cells:
        raise ValueError("cells must be a non-empty list of rows (lists of images)")
    rows: list[list[Optional[np.ndarray]]] = []
    for r, row in enumerate(cells):
        _check_rows_of_images(row, f"cells[{r}]", "a list of images (cells is a list of rows)")
        rows.append([_as_cell(cell, f"[{r}][{c}]") for c, cell in enumerate(row)])
    n_rows = len(rows)
    n_cols = max((len(row) for row in rows), default=0)
    if n_cols == 0:
        raise ValueError("cells has no images: every row is empty")
    if row_labels is not None and len(row_labels) != n_rows:
        raise ValueError(f"row_labels has {len(row_labels)} entries for {n_rows} rows")
    if col_labels is not None and len(col_labels) != n_cols:
        raise ValueError(f"col_labels has {len(col_labels)} entries for {n_cols} columns")
    _check_cell_shaped(cell_captions, rows, "cell_captions")
    _check_cell_shaped(cell_frames, rows, "cell_frames")
    if row_label_colors is not None and len(row_label_colors) != n_rows:
        raise ValueError(f"row_label_colors has {len(row_label_colors)} entries for {n_rows} rows")
    if col_label_colors is not None and len(col_label_colors) != n_cols:
        raise ValueError(f"col_label_colors has {len(col_label_colors)} entries for {n_cols} columns")
    check_optional(lambda v, a: check_choice(v, a, ("signed", "absolute")), colorbar, "colorbar")
    present = [cell for row in rows for cell in row if cell is not None]
    if cell_size is None:
        cell_size = max([_DEFAULT_CELL] + [cell.shape[0] for cell in present])
    check_int(cell_size, "cell_size", minimum=4)
    check_int(pad, "pad", minimum=0)
    check_optional(check_positive_number, fontsize, "fontsize")

    def fit(cell: Optional[np.ndarray]) -> Optional[np.ndarray]:
        if cell is None:
            return None
        return _resize_nearest(cell, cell_size, max(1, round(cell.shape[1] * cell_size / cell.shape[0])))

    resized = [[fit(cell) for cell in row] for row in rows]
    col_widths = [cell_size] * n_cols
    for row in resized:
        for c, cell in enumerate(row):
            if cell is not None:
                col_widths[c] = max(col_widths[c], cell.shape[1])

    # large enough to stay legible when TensorBoard shrinks the grid into a card (about 350 px wide)
    fontsize = float(fontsize) if fontsize is not None else max(9.0, cell_size / 7.0)
    text = _TextMeasurer(fontsize)
    col_lines = [text.wrap(str(lbl), col_widths[c]) for c, lbl in enumerate(col_labels)] if col_labels else []
    row_width_cap = max(2 * cell_size, 120)
    row_lines = [text.wrap(str(lbl), row_width_cap) for lbl in row_labels] if row_labels else []
    title_lines = text.wrap(title, 10**9) if title else []
    caption_lines = [
        [text.wrap(str(cap), col_widths[c] + pad, max_lines=3) if cap else [] for c, cap in enumerate(row)]
        for row in (cell_captions or [])
    ]
    # the height under each row taken by its cells' captions
    under = [max((len(lines) for lines in row), default=0) * text.line_height for row in caption_lines]
    under += [0] * (n_rows - len(under))

    left = int(np.ceil(max((text.width(line) for lines in row_lines for line in lines), default=0.0)))
    left = left + 2 * pad if row_lines else 0
    header = (max(len(lines) for lines in col_lines) * text.line_height + pad) if col_lines else 0
    title_h = len(title_lines) * text.line_height + pad if title_lines else 0
    grid_w = sum(col_widths) + pad * (n_cols + 1)
    width = left + grid_w
    if title_lines:
        width = max(width, int(np.ceil(max(text.width(line) for line in title_lines))) + 2 * pad)
    height = title_h + header + n_rows * cell_size + pad * (n_rows + 1) + sum(under)

    out = np.full((height, width, 3), _BACKGROUND, dtype=np.uint8)
    col_x = [left + pad + sum(col_widths[:c]) + pad * c for c in range(n_cols)]
    row_y = [title_h + header + pad + r * (cell_size + pad) + sum(under[:r]) for r in range(n_rows)]
    frame = min(3, pad)
    for r, row in enumerate(resized):
        for c, cell in enumerate(row):
            if cell is None:
                continue
            x0 = col_x[c] + (col_widths[c] - cell.shape[1]) // 2
            out[row_y[r] : row_y[r] + cell.shape[0], x0 : x0 + cell.shape[1]] = cell
            framed = cell_frames is not None and r < len(cell_frames) and c < len(cell_frames[r])
            color = cell_frames[r][c] if framed else None  # type: ignore[index]
            if color is not None:
                _draw_frame(out, row_y[r], x0, cell.shape[0], cell.shape[1], frame, color)

    # (x, y_top, lines, horizontal alignment, colour) in pixel coordinates from the top-left corner
    texts: list[tuple[float, float, list[str], str, Optional[Color]]] = []
    if title_lines:
        texts.append((width / 2.0, pad / 2.0, title_lines, "center", None))
    for c, lines in enumerate(col_lines):
        block = len(lines) * text.line_height
        color = col_label_colors[c] if col_label_colors is not None else None
        texts.append((col_x[c] + col_widths[c] / 2.0, title_h + header - pad - block, lines, "center", color))
    for r, lines in enumerate(row_lines):
        block = len(lines) * text.line_height
        color = row_label_colors[r] if row_label_colors is not None else None
        texts.append((pad, row_y[r] + (cell_size - block) / 2.0, lines, "left", color))
    for r, row_captions in enumerate(caption_lines):
        for c, lines in enumerate(row_captions):
            if lines:
                texts.append((col_x[c] + col_widths[c] / 2.0, row_y[r] + cell_size + pad / 2.0, lines, "center", None))
    if texts:
        _draw_text(out, texts, text)
    if colorbar is not None:
        top = title_h + header + pad
        strip = colorbar_strip(height - top - pad, signed=colorbar == "signed", labels=colorbar_labels,
                               fontsize=text.fontsize)
        extra = np.full((height, strip.shape[1] + 2 * pad, 3), _BACKGROUND, dtype=np.uint8)
        extra[top : top + strip.shape[0], pad : pad + strip.shape[1]] = strip
        out = np.concatenate([out, extra], axis=1)
    return out


def colorbar_strip(
    height: int,
    signed: bool,
    cmap: Optional[str] = None,
    labels: Optional[Sequence[str]] = None,
    fontsize: float = 12.0,
) -> np.ndarray:
    """A vertical colour scale as a uint8 ``(height, W, 3)`` image: the colormap (top: the largest value) and its
    tick labels at the top, middle (signed only) and bottom.

    The colours are exactly those :func:`~lightning_lens.render.heatmap` draws: a map's ``+1`` (its scale, the
    99th percentile of ``|a|`` by default) at the top, ``0`` at the bottom (absolute) or in the middle (signed).

    Args:
        height: pixels (at least 16).
        signed: the diverging scale ``[-1, 1]`` or the sequential ``[0, 1]``.
        cmap: the colormap name (default: the heatmap's default for ``signed``).
        labels: tick labels top to bottom (3 when signed, else 2); default ``+max, 0, -max`` / ``max, 0``.
        fontsize: label size in pixels.

    Example:
        >>> strip = colorbar_strip(64, signed=True)
        >>> strip.shape[0], strip[0, 0].tolist() == colorize(np.ones((1, 1)), True)[0, 0].tolist()
        (64, True)
    """
    check_int(height, "height", minimum=16)
    if labels is None:
        labels = ["+max", "0", "-max"] if signed else ["max", "0"]
    expected = 3 if signed else 2
    if len(labels) != expected:
        kind = "signed" if signed else "absolute"
        raise ValueError(
            f"labels must hold {expected} entries (top to bottom) for a {kind} colorbar, got {len(labels)}"
        )
    values = np.linspace(1.0, -1.0 if signed else 0.0, height)[:, None]
    bar = colorize(np.repeat(values, _COLORBAR_WIDTH, axis=1), signed,
                   cmap or (DIVERGING_CMAP if signed else SEQUENTIAL_CMAP))
    text = _TextMeasurer(fontsize)
    label_w = int(np.ceil(max(text.width(str(lbl)) for lbl in labels))) + 4
    out = np.full((height, _COLORBAR_WIDTH + label_w, 3), _BACKGROUND, dtype=np.uint8)
    out[:, :_COLORBAR_WIDTH] = bar
    out[:, _COLORBAR_WIDTH - 1] = 0  # a thin edge so a pale end of the scale stays visible on white
    positions = [0.0, (height - text.line_height) / 2.0, height - text.line_height][:: 1 if signed else 2]
    texts = [(_COLORBAR_WIDTH + 3.0, y, [str(lbl)], "left", None) for y, lbl in zip(positions, labels)]
    _draw_text(out, texts, text)
    return out


def _check_cell_shaped(value: Optional[Sequence[Sequence[object]]], rows: list[list[object]], argument: str) -> None:
    if value is None:
        return
    _check_rows_of_images(value, argument, "a list of rows (lists, one entry per cell)")
    if len(value) > len(rows):
        raise ValueError(f"{argument} has {len(value)} rows for {len(rows)} rows of cells (fewer are fine: the rest get"
                         " none)")


def _draw_frame(out: np.ndarray, y0: int, x0: int, h: int, w: int, thickness: int, color: Color) -> None:
    """A rectangle of ``thickness`` pixels around the cell at ``(y0, x0)`` (inside it when ``thickness`` is 0)."""
    if thickness == 0:
        y0, x0, h, w, thickness = y0 + 2, x0 + 2, h - 4, w - 4, 2
    rgb = np.asarray(color, dtype=np.uint8)
    top, bottom = max(y0 - thickness, 0), min(y0 + h + thickness, out.shape[0])
    left, right = max(x0 - thickness, 0), min(x0 + w + thickness, out.shape[1])
    out[top:y0, left:right] = rgb
    out[y0 + h : bottom, left:right] = rgb
    out[top:bottom, left:x0] = rgb
    out[top:bottom, x0 + w : right] = rgb


def _draw_text(out: np.ndarray, texts: list[tuple[float, float, list[str], str, Optional[Color]]],
               measurer: _TextMeasurer) -> None:
    """Rasterize every line and alpha-composite it (black unless given a colour) at its place, clipped."""
    height, width = out.shape[:2]
    for x, y_top, lines, ha, rgb in texts:
        color = np.array(rgb if rgb is not None else _TEXT_COLOR, dtype=np.float64)
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            coverage, descent = measurer.render(line)
            h, w = coverage.shape
            baseline = int(round(y_top + i * measurer.line_height)) + measurer.ascent
            top = baseline + descent - h + 1
            left = int(round(x - w / 2.0)) if ha == "center" else int(round(x))
            y0, x0 = max(top, 0), max(left, 0)
            y1, x1 = min(top + h, height), min(left + w, width)
            if y1 <= y0 or x1 <= x0:
                continue
            alpha = coverage[y0 - top : y1 - top, x0 - left : x1 - left, None].astype(np.float64) / 255.0
            region = out[y0:y1, x0:x1].astype(np.float64)
            out[y0:y1, x0:x1] = np.round(region * (1.0 - alpha) + color * alpha).astype(np.uint8)
