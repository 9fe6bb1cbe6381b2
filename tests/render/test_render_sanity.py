"""The sanity-check pictures, without a Trainer: the cascade grid, the similarity figure and the verdict lines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_lens.render import cascade_grid, colorize, image_grid, similarity_figure, to_rgb_uint8, verdict_lines
from lightning_lens.sanity import MethodResult, RandomizationReport, Verdict, VerdictRule, cascading_randomization
from lightning_lens.testing import SmallCNN

STAGES = ["head", "body"]


def _result(name: str, maps: torch.Tensor, outcome: str = "passes", metric_values: tuple = (0.9, 0.2)) -> MethodResult:
    """A method's result with hand-made maps ``(S + 1, B, ...)`` and one metric, ``spearman_abs``, whose per-example
    similarity at stage ``s`` is ``metric_values[s - 1]`` (the median, too)."""
    batch = maps.shape[1]
    similarity = {"spearman_abs": torch.tensor(metric_values).unsqueeze(1).repeat(1, batch)}
    verdict = Verdict(name, outcome, "spearman_abs", 0.55, 0.1, 1.0, 0.5, "hand-made", 1)
    return MethodResult(name=name, metrics=("spearman_abs",), similarity=similarity, floor={"spearman_abs": 0.1},
                        ceiling={"spearman_abs": 1.0}, stochastic=False, maps=maps, signed_maps=maps, verdict=verdict)


def _report(*results: MethodResult) -> RandomizationReport:
    batch = results[0].maps.shape[1]
    report = RandomizationReport(
        mode="cascading", order="top_down", stages=list(STAGES), stage_parameters=[["w"], ["v"]],
        fallback_parameters=[], skipped_modules=[], batchnorm="keep", target_mode="fixed",
        targets=torch.zeros(3, batch, dtype=torch.long), predictions=torch.zeros(1, batch, dtype=torch.long), seed=0,
        rule=VerdictRule(metric="spearman_abs"),
    )
    for r in results:
        report.results[r.name] = r
    return report


def _constant_maps(values: list[list[float]], size: int = 4) -> torch.Tensor:
    """``(S + 1, B, size, size)`` maps, constant ``values[s][b]`` each."""
    return torch.tensor(values).view(len(values), len(values[0]), 1, 1).repeat(1, 1, size, size)


def _cell(value: float, size: int = 4) -> np.ndarray:
    return colorize(np.full((size, size), value), signed=False)


def test_cascade_grid_rows_are_methods_per_probe_columns_the_stages_on_one_scale():
    # constant maps: drawn on the fixed scale vmax=1 a map of 0.5 is mid-colour (a per-map scale would make it full)
    grad = _constant_maps([[1.0, 0.75], [0.5, 0.375], [0.0, 0.125]])
    guided = _constant_maps([[1.0, 1.0], [1.0, 0.875], [0.875, 0.875]])
    report = _report(_result("gradient", grad), _result("guided_backprop", guided, outcome="fails"))
    inputs = torch.stack([torch.full((1, 4, 4), 0.25), torch.full((1, 4, 4), 0.75)])

    grid = cascade_grid(report, inputs, num_probes=2, probe_labels=["#3", "#7"], cell_size=16)

    def probe(i):
        return to_rgb_uint8(inputs[i])

    expected = image_grid(
        [
            [probe(0), _cell(1.0), _cell(0.5), _cell(0.0)],
            [probe(0), _cell(1.0), _cell(1.0), _cell(0.875)],
            [probe(1), _cell(0.75), _cell(0.375), _cell(0.125)],
            [probe(1), _cell(1.0), _cell(0.875), _cell(0.875)],
        ],
        row_labels=["gradient #3 (passes)", "guided_backprop #3 (fails)", "gradient #7 (passes)",
                    "guided_backprop #7 (fails)"],
        col_labels=["input", "original", "head", "body"],
        cell_size=16,
    )
    assert grid.dtype == np.uint8 and np.array_equal(grid, expected)
    assert not np.array_equal(_cell(0.5), _cell(1.0))  # the scale is what the test checks


def test_cascade_grid_shows_at_most_the_examples_there_are_and_defaults_labels():
    report = _report(_result("gradient", _constant_maps([[1.0, 0.5], [0.5, 0.5], [0.0, 0.0]])))
    inputs = torch.rand(2, 1, 4, 4)
    grid = cascade_grid(report, inputs, num_probes=5, cell_size=16)
    expected = image_grid(
        [[to_rgb_uint8(inputs[0]), _cell(1.0), _cell(0.5), _cell(0.0)],
         [to_rgb_uint8(inputs[1]), _cell(0.5), _cell(0.5), _cell(0.0)]],
        row_labels=["gradient probe 0 (passes)", "gradient probe 1 (passes)"],
        col_labels=["input", "original", *STAGES], cell_size=16,
    )
    assert np.array_equal(grid, expected)


def test_cascade_grid_shows_other_channel_counts_as_their_mean():
    report = _report(_result("gradient", _constant_maps([[1.0, 1.0], [0.5, 0.5], [0.0, 0.0]])))
    inputs = torch.rand(2, 2, 4, 4)  # two channels: neither grey nor RGB
    grid = cascade_grid(report, inputs, num_probes=1, cell_size=16)
    expected = image_grid([[to_rgb_uint8(inputs[0].mean(0, keepdim=True)), _cell(1.0), _cell(0.5), _cell(0.0)]],
                          row_labels=["gradient probe 0 (passes)"], col_labels=["input", "original", *STAGES],
                          cell_size=16)
    assert np.array_equal(grid, expected)


def test_cascade_grid_leaves_out_methods_without_image_maps():
    image = _result("gradient", _constant_maps([[1.0, 1.0], [0.5, 0.5], [0.0, 0.0]]))
    flat = _result("tabular", torch.ones(3, 2, 16))  # (S + 1, B, features): maps of 1-D inputs
    no_maps = _result("not_kept", _constant_maps([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]))
    no_maps.maps = None
    inputs = torch.rand(2, 1, 4, 4)
    with_others = cascade_grid(_report(image, flat, no_maps), inputs, num_probes=2, cell_size=16)
    assert np.array_equal(with_others, cascade_grid(_report(image), inputs, num_probes=2, cell_size=16))
    assert cascade_grid(_report(flat, no_maps), inputs) is None


def test_cascade_grid_rejects_inputs_that_do_not_match_the_report():
    report = _report(_result("gradient", _constant_maps([[1.0, 1.0], [0.5, 0.5], [0.0, 0.0]])))
    with pytest.raises(ValueError, match="inputs holds 3 examples but the report explains 2"):
        cascade_grid(report, torch.rand(3, 1, 4, 4))
    with pytest.raises(ValueError, match="probe_labels has 1 entries for 2 shown probes"):
        cascade_grid(report, torch.rand(2, 1, 4, 4), probe_labels=["#1"])
    with pytest.raises(ValueError, match="num_probes must be >= 1"):
        cascade_grid(report, torch.rand(2, 1, 4, 4), num_probes=0)
    with pytest.raises(TypeError, match="inputs must be a torch.Tensor"):
        cascade_grid(report, np.zeros((2, 1, 4, 4)))


def test_similarity_figure_plots_each_methods_median_curve_band_and_floor():
    torch.manual_seed(0)
    report = cascading_randomization(SmallCNN(width=2), torch.rand(4, 1, 32, 32), torch.tensor([0, 1, 2, 3]),
                                     ["gradient", "edge"], controls=False)
    fig = similarity_figure(report)
    axes = fig.axes
    assert [ax.get_ylabel() for ax in axes] == report.metrics
    for ax, metric in zip(axes, report.metrics):
        lines = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
        floors = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert [line.get_label() for line in lines] == ["gradient", "edge (control)"]
        for line, name in zip(lines, ["gradient", "edge"]):
            np.testing.assert_allclose(line.get_ydata(), report.curve(name, metric).numpy(), rtol=0, atol=1e-6)
            np.testing.assert_array_equal(line.get_xdata(), np.arange(report.num_stages + 1))
        expected_floors = [report.results[n].floor[metric] for n in ("gradient", "edge")]
        assert [line.get_ydata()[0] for line in floors] == pytest.approx([f for f in expected_floors
                                                                         if math.isfinite(f)])
    # one shared x axis: the stage names once, under the last panel
    assert [t.get_text() for t in axes[-1].get_xticklabels()] == ["original", *report.stages]
    assert all(not label.get_visible() for ax in axes[:-1] for label in ax.get_xticklabels())
    # the legend sits under the panels (never over the curves) and explains the dashed lines and the bands;
    # "edge" is a control and says so
    (legend,) = fig.legends
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts[:2] == ["gradient", "edge (control)"]
    assert any(t.startswith("dashed: floor") for t in texts) and any(t.startswith("band: interquartile") for t in texts)
    fig.canvas.draw()
    box = legend.get_window_extent().transformed(fig.transFigure.inverted())
    labels = axes[-1].get_xaxis().get_tightbbox().transformed(fig.transFigure.inverted())
    assert box.y1 <= labels.y0  # under the stage names of the last panel


def test_similarity_figure_band_is_the_interquartile_range_and_missing_metrics_are_left_out():
    result = _result("gradient", _constant_maps([[1.0, 1.0], [0.5, 0.5], [0.0, 0.0]]))
    result.similarity["spearman_abs"] = torch.tensor([[0.0, 0.2, 0.4, 0.6, 0.8], [0.1, 0.1, 0.1, 0.1, 0.1]])
    other = _result("hog_only", _constant_maps([[1.0, 1.0], [0.5, 0.5], [0.0, 0.0]]))
    other.metrics = ("hog",)
    other.similarity = {"hog": torch.tensor([[0.5], [0.25]])}
    other.floor, other.ceiling = {"hog": math.nan}, {"hog": 1.0}
    fig = similarity_figure(_report(result, other))
    spearman, hog = fig.axes
    assert spearman.get_ylabel() == "spearman_abs" and hog.get_ylabel() == "hog"
    # the legend names every method, also the one the first panel does not show
    assert [t.get_text() for t in fig.legends[0].get_texts()][:2] == ["gradient", "hog_only"]
    assert [line.get_label() for line in spearman.get_lines() if line.get_linestyle() == "-"] == ["gradient"]
    assert [line.get_label() for line in hog.get_lines() if line.get_linestyle() == "-"] == ["hog_only"]
    assert not [line for line in hog.get_lines() if line.get_linestyle() == "--"]  # no finite floor: no line
    (band,) = spearman.collections
    ys = band.get_paths()[0].vertices[:, 1]
    # the band's outline visits low = [ceiling, q25 per stage] and high = [ceiling, q75 per stage]
    assert set(np.round(ys, 6)) == {1.0, 0.2, 0.1, 0.6}


def test_similarity_figure_shows_the_chosen_metrics_in_the_reports_order():
    torch.manual_seed(0)
    report = cascading_randomization(SmallCNN(width=2), torch.rand(4, 1, 32, 32), None, "gradient", controls=False)
    fig = similarity_figure(report, metrics=["ssim", "spearman_abs", "psnr"])  # psnr was not computed: left out
    assert [ax.get_ylabel() for ax in fig.axes] == ["spearman_abs", "ssim"]
    with pytest.raises(TypeError, match="metrics must be a list of strings"):
        similarity_figure(report, metrics="ssim")


def test_similarity_figure_needs_a_metric():
    result = _result("gradient", _constant_maps([[1.0, 1.0], [0.5, 0.5], [0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"no similarity metric to plot: the report computed \['spearman_abs'\]"):
        similarity_figure(_report(result), metrics=["hog"])
    result.metrics, result.similarity = (), {}
    with pytest.raises(ValueError, match="no similarity metric"):
        similarity_figure(_report(result))


def test_verdict_lines_name_the_verdict_and_the_deciding_numbers():
    report = _report(_result("gradient", _constant_maps([[1.0, 1.0], [0.5, 0.5], [0.0, 0.0]])))
    nan_verdict = Verdict("random", "inconclusive", "spearman_abs", 0.1, 0.1, math.nan, math.nan, "no gap", 1)
    random = _result("random", _constant_maps([[1.0, 1.0], [0.5, 0.5], [0.0, 0.0]]))
    random.verdict = nan_verdict
    report.results["random"] = random
    assert verdict_lines(report) == [
        "gradient: passes (spearman_abs 0.550, floor 0.100, ceiling 1.000, normalized 0.500)",
        "random (control, expected: inconclusive): inconclusive (spearman_abs 0.100, floor 0.100, ceiling nan,"
        " normalized nan)",
    ]
