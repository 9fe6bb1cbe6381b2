"""Figures through matplotlib's object API: sizes, curves, matrices, and no pyplot anywhere in the package."""

import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.figure import Figure

import lightning_lens.render as render
from lightning_lens.render import figure_to_array, new_figure, plot_curves, plot_heatmap_matrix


def test_new_figure_and_figure_to_array():
    fig, ax = new_figure(figsize=(3, 2), dpi=40)
    assert isinstance(fig, Figure)
    ax.axvspan(-10, 10, color=(1.0, 0.0, 0.0))
    ax.set_xlim(0, 1)
    arr = figure_to_array(fig)
    assert arr.shape == (80, 120, 3) and arr.dtype == np.uint8
    assert ((arr == [255, 0, 0]).all(axis=-1)).mean() > 0.3  # the red axes area was rendered
    assert figure_to_array(fig).shape == arr.shape  # rendering twice is fine: the figure stays usable
    _, axes = new_figure(2, 3)
    assert axes.shape == (2, 3)
    plain = Figure()  # a figure without a canvas still renders
    plain.add_subplot().plot([0, 1])
    assert figure_to_array(plain).ndim == 3
    with pytest.raises(ValueError, match="nrows"):
        new_figure(0, 1)
    with pytest.raises(TypeError, match="fig"):
        figure_to_array(arr)


def test_plot_curves():
    labels = ["logits", "classifier.1", "features.7", "features.5"]
    fig = plot_curves(
        [0, 1, 2, 3],
        {"ssim": [1.0, 0.7, 0.4, float("nan")], "spearman": np.array([1.0, 0.8, 0.3, 0.1])},
        title="cascading randomization",
        xlabel="randomized up to",
        ylabel="similarity",
        xticklabels=labels,
        bands={"ssim": ([0.9, 0.6, 0.3, 0.0], [1.0, 0.8, 0.5, 0.2])},
        ylim=(0, 1.05),
    )
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["ssim", "spearman"]
    assert np.allclose(ax.get_lines()[1].get_ydata(), [1.0, 0.8, 0.3, 0.1])
    assert [t.get_text() for t in ax.get_xticklabels()] == labels
    assert ax.get_title() == "cascading randomization" and ax.get_ylim() == (0, 1.05)
    assert len(ax.collections) == 1  # the band
    assert figure_to_array(fig).dtype == np.uint8
    with pytest.raises(ValueError, match="ys\\['a'\\]"):
        plot_curves([0, 1], {"a": [1, 2, 3]})
    with pytest.raises(ValueError, match="xticklabels"):
        plot_curves([0, 1], {"a": [1, 2]}, xticklabels=["x"])
    with pytest.raises(ValueError, match="bands"):
        plot_curves([0, 1], {"a": [1, 2]}, bands={"b": ([0, 0], [1, 1])})


def test_plot_heatmap_matrix():
    counts = np.array([[3, 0, 7], [1, 5, 2]])
    fig = plot_heatmap_matrix(counts, ["expert 0", "expert 1"], ["zero", "one", "two"], title="routing")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["3", "0", "7", "1", "5", "2"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["expert 0", "expert 1"]
    assert len(fig.axes) == 2  # with a colorbar
    floats = plot_heatmap_matrix([[0.25, float("nan")], [1.0, 0.5]])
    assert [t.get_text() for t in floats.axes[0].texts] == ["0.25", "1", "0.5"]  # NaN left blank
    assert figure_to_array(floats).ndim == 3
    constant = plot_heatmap_matrix(np.zeros((2, 2)))  # a flat matrix still renders
    assert figure_to_array(constant).ndim == 3
    with pytest.raises(ValueError, match="row_labels"):
        plot_heatmap_matrix(counts, row_labels=["a"])
    with pytest.raises(ValueError, match="2-D"):
        plot_heatmap_matrix(np.zeros(3))


def test_no_pyplot_in_the_package():
    root = pathlib.Path(render.__file__).resolve().parents[1]
    mine = list((root / "render").glob("*.py")) + list((root / "testing").glob("*.py"))
    mine.append(root / "datasets" / "spurious_digits.py")
    importing = re.compile(
        r"^\s*(import matplotlib\.pyplot|from matplotlib import .*pyplot|from matplotlib\.pyplot)", re.M
    )
    assert not [p.name for p in mine if importing.search(p.read_text())]
    code = (
        "import sys, numpy as np, torch\n"
        "from lightning_lens import render as r\n"
        "g = r.image_grid([[r.heatmap(torch.randn(8, 8)), r.overlay(torch.rand(1, 8, 8), torch.rand(8, 8))]],"
        " row_labels=['a'], col_labels=['b', 'c'])\n"
        "r.figure_to_array(r.plot_curves([0, 1], {'a': [0, 1]}))\n"
        "r.figure_to_array(r.plot_heatmap_matrix([[1, 2]]))\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
