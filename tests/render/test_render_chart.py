"""The raster line chart: every value drawn where its geometry says, bands and dashed references blended, clear
errors; and the sanity check's similarity chart drawn from the report's numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_lens.render import ChartPanel, ChartSeries, LineChart, similarity_chart
from lightning_lens.render.chart import TAB10
from lightning_lens.sanity import cascading_randomization
from lightning_lens.testing import SmallCNN

RED, BLUE = (214, 39, 40), (31, 119, 180)


def _pixel(image, chart, panel, i, value):
    return tuple(int(v) for v in image[chart.y_pixel(panel, value), chart.x_pixel(i)])


def test_lines_markers_bands_and_references_are_drawn_at_their_values():
    series = ChartSeries("a", [0.9, 0.1, math.nan, 0.4], RED, band=([0.8, 0.0, 0.3, 0.3], [1.0, 0.3, 0.5, 0.5]),
                         reference=0.7)
    chart = LineChart([ChartPanel("m", (0.0, 1.0), [series])], ["s0", "s1", "s2", "s3"])
    image = chart.draw()
    assert image.shape == (chart.height, chart.width, 3) and image.dtype == np.uint8
    for i, value in [(0, 0.9), (1, 0.1), (3, 0.4)]:
        assert _pixel(image, chart, 0, i, value) == RED  # the marker's centre
    # NaN leaves a gap: right of s2 (off its grid line) only the band is drawn, 15 % red over white
    x = chart.x_pixel(2) + 4
    band = image[chart.y_pixel(0, 0.45), x].astype(float)  # off the grid lines (ticks every 0.2)
    np.testing.assert_allclose(band, 255 * 0.85 + np.array(RED) * 0.15, atol=1.5)
    assert image[chart.y_pixel(0, 0.9), x].tolist() == [255, 255, 255]  # above the band: nothing
    assert image[chart.y_pixel(0, 0.05), x].tolist() == [255, 255, 255]  # below it: nothing
    # the dashed reference: red pixels on its row between the categories, with gaps
    row = image[chart.y_pixel(0, 0.7), chart.x_pixel(1) + 6 : chart.x_pixel(2) - 6]
    reddish = (row[:, 0] > 200) & (row[:, 1] < 170)
    assert reddish.any() and not reddish.all()


def test_panels_share_the_x_axis_and_keep_their_own_ranges():
    top = ChartPanel("a", (-1.0, 1.0), [ChartSeries("x", [-1.0, 1.0], BLUE)])
    bottom = ChartPanel("b", (0.0, 10.0), [ChartSeries("y", [5.0, 5.0], RED, marker="s")])
    chart = LineChart([top, bottom], ["first", "second"], legend=[("x", BLUE, "line"), ("y", RED, "line")])
    image = chart.draw()
    assert chart.y_pixel(1, 5.0) > chart.y_pixel(0, -1.0)  # the second panel is below the first
    assert _pixel(image, chart, 0, 0, -1.0) == BLUE and _pixel(image, chart, 0, 1, 1.0) == BLUE
    assert _pixel(image, chart, 1, 0, 5.0) == RED and _pixel(image, chart, 1, 1, 5.0) == RED
    # the straight line between the two red markers
    middle = (chart.x_pixel(0) + chart.x_pixel(1)) // 2
    assert tuple(int(v) for v in image[chart.y_pixel(1, 5.0), middle]) == RED


def test_bad_charts_are_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="panels must hold at least one"):
        LineChart([], ["a"])
    with pytest.raises(ValueError, match=r"panels\[0\].y_range must be finite with low < high"):
        LineChart([ChartPanel("m", (1.0, 1.0))], ["a"])
    with pytest.raises(ValueError, match="series 'a' has 1 values for 2 x_labels"):
        LineChart([ChartPanel("m", (0.0, 1.0), [ChartSeries("a", [0.0], RED)])], ["a", "b"])
    with pytest.raises(ValueError, match="marker"):
        LineChart([ChartPanel("m", (0.0, 1.0), [ChartSeries("a", [0.0], RED, marker="x")])], ["a"])


def test_similarity_chart_draws_each_methods_median_curve_from_the_report():
    torch.manual_seed(0)
    report = cascading_randomization(SmallCNN(width=2), torch.rand(4, 1, 32, 32), torch.tensor([0, 1, 2, 3]),
                                     ["gradient", "edge"], controls=False)
    from lightning_lens.render.sanity import _similarity_line_chart, _similarity_lines

    chart = _similarity_line_chart(report, ["spearman_abs"])
    image = similarity_chart(report, ["spearman_abs"])
    assert np.array_equal(image, chart.draw())
    gradient, edge = _similarity_lines(report, "spearman_abs")
    assert (gradient.label, edge.label) == ("gradient", "edge (control)")
    for i in range(report.num_stages + 1):  # edge is drawn last: its square markers sit on top, at its medians
        assert image[chart.y_pixel(0, float(edge.median[i])), chart.x_pixel(i)].tolist() == list(TAB10[edge.index])
        if abs(gradient.median[i] - edge.median[i]) > 0.1:  # far enough apart not to be covered
            drawn = image[chart.y_pixel(0, float(gradient.median[i])), chart.x_pixel(i)]
            assert drawn.tolist() == list(TAB10[gradient.index])
    with pytest.raises(ValueError, match="no similarity metric to plot"):
        similarity_chart(report, ["psnr"])
