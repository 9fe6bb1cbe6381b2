"""Labelled image grids: exact geometry, crisp upscaling, legible labels, ragged rows, errors."""

import numpy as np
import pytest
import torch

from lightning_lens.render import image_grid

PAD = 4


def _solid(color, h=32, w=32):
    return np.full((h, w, 3), color, dtype=np.uint8)


def _bbox(grid, color):
    ys, xs = np.nonzero((grid == np.array(color, np.uint8)).all(axis=-1))
    return ys.min(), ys.max() + 1, xs.min(), xs.max() + 1


COLORS = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(255, 255, 0), (0, 255, 255), (255, 0, 255)]]


def test_unlabelled_geometry_is_exact():
    cells = [[_solid(c) for c in row] for row in COLORS]
    grid = image_grid(cells, cell_size=64)
    assert grid.dtype == np.uint8
    assert grid.shape == (2 * 64 + 3 * PAD, 3 * 64 + 4 * PAD, 3)
    for r, row in enumerate(COLORS):
        for c, color in enumerate(row):
            assert _bbox(grid, color) == (PAD + r * (64 + PAD), PAD + r * (64 + PAD) + 64,
                                          PAD + c * (64 + PAD), PAD + c * (64 + PAD) + 64)


def test_default_cell_size_upscales_small_cells_crisply():
    checker = np.zeros((32, 32, 3), np.uint8)
    checker[::2, ::2] = checker[1::2, 1::2] = 255
    grid = image_grid([[checker]], pad=0)
    assert grid.shape == (96, 96, 3)  # 32 -> 96 by default: exactly 3x3 blocks per pixel
    assert np.array_equal(grid, np.repeat(np.repeat(checker, 3, axis=0), 3, axis=1))
    big = image_grid([[_solid((1, 2, 3), 128, 128)]], pad=0)
    assert big.shape == (128, 128, 3)  # never downscaled by default


def test_labels_are_drawn_legibly_beside_each_row_and_above_each_column():
    cells = [[_solid(c) for c in row] for row in COLORS]
    grid = image_grid(cells, row_labels=["probe 0", "probe 1"], col_labels=["input", "gradient", "smoothgrad"],
                      cell_size=64, title="epoch 3")
    red, magenta = _bbox(grid, COLORS[0][0]), _bbox(grid, COLORS[1][2])
    assert red[1] - red[0] == 64 and red[3] - red[2] == 64
    top, left = red[0], red[2]
    assert top > 20 and left > 30  # room for the title + header and the row labels
    assert grid.shape[0] == magenta[1] + PAD and grid.shape[1] == magenta[3] + PAD
    ink = grid.min(axis=-1) < 128  # dark text pixels on the white background
    for r in range(2):
        y0 = top + r * (64 + PAD)
        assert ink[y0 : y0 + 64, :left].sum() > 20, f"row label {r} missing"
    for c in range(3):
        x0 = left + c * (64 + PAD)
        header = ink[:top, x0 : x0 + 64]
        rows_with_ink = np.flatnonzero(header.any(axis=1))
        assert header.sum() > 20, f"column label {c} missing"
        assert rows_with_ink.max() - rows_with_ink.min() >= 7  # glyphs at least 8 px tall: legible
    other = image_grid(cells, row_labels=["probe 0", "probe 9"], col_labels=["input", "gradient", "smoothgrad"],
                       cell_size=64, title="epoch 3")
    assert other.shape == grid.shape and not np.array_equal(other, grid)  # the text is really drawn


def test_long_labels_wrap_inside_the_column():
    cells = [[_solid((255, 0, 0)), _solid((0, 0, 255))]]
    grid = image_grid(cells, col_labels=["integrated_gradients_with_a_long_suffix", "b"], cell_size=48)
    blue = _bbox(grid, (0, 0, 255))
    ink = grid.min(axis=-1) < 128
    red = _bbox(grid, (255, 0, 0))
    # the wrapped label stays within its column: no ink above the blue column's left gap
    assert not ink[: red[0], red[3] + 1 : blue[2] - 1].any()
    assert grid.shape[1] == 2 * 48 + 3 * PAD


def test_ragged_rows_none_cells_and_mixed_inputs():
    float_cell = torch.ones(1, 8, 8) * 0.5  # float (C, H, W) in [0, 1]
    grid = image_grid([[_solid((255, 0, 0)), None, float_cell], [_solid((0, 0, 255), 16, 32)]], cell_size=32)
    assert grid.shape == (2 * 32 + 3 * PAD, 3 * 32 + 4 * PAD + 32, 3)  # column 0 widened by the 2:1 cell
    y0, y1, x0, x1 = _bbox(grid, (0, 0, 255))
    assert (y1 - y0, x1 - x0) == (32, 64)
    assert (grid[PAD : PAD + 32, 2 * PAD + 64 : 2 * PAD + 64 + 32] == 255).all()  # the None cell is blank
    assert (grid == 128).all(axis=-1).sum() == 32 * 32  # the float cell, upscaled


def test_errors_name_the_argument():
    cells = [[_solid((0, 0, 0))]]
    with pytest.raises(ValueError, match="row_labels"):
        image_grid(cells, row_labels=["a", "b"])
    with pytest.raises(ValueError, match="col_labels"):
        image_grid(cells, col_labels=["a", "b"])
    with pytest.raises(TypeError, match="list of rows"):
        image_grid([_solid((0, 0, 0))])
    with pytest.raises(TypeError, match="cells must be a list of rows"):
        image_grid(_solid((0, 0, 0)))
    with pytest.raises(ValueError, match="cell_size"):
        image_grid(cells, cell_size=0)
    with pytest.raises(ValueError, match=r"cells\[0\]\[1\]"):
        image_grid([[_solid((0, 0, 0)), np.zeros((4, 4, 5), np.uint8)]])
    with pytest.raises(ValueError, match="no images"):
        image_grid([[]])
