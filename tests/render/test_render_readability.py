"""Issue 14's readability of figures: colour scales, marked mistakes, captions under cells, short layer names, controls
marked with their expected verdicts, diverging colours for signed matrices, explained bands. Asserted on pixels and
on the figures' artists, without a Trainer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_lens.render import (
    CONTROL_EXPECTATIONS,
    MISTAKE_COLOR,
    cascade_grid,
    colorbar_strip,
    colorize,
    image_grid,
    plot_curves,
    plot_heatmap_matrix,
    short_layer_names,
    to_rgb_uint8,
    verdict_table,
)
from lightning_lens.sanity import MethodResult, RandomizationReport, Verdict, VerdictRule

GREY = np.full((8, 8, 3), 128, np.uint8)


def test_colorbar_appends_the_heatmaps_own_colours_right_of_the_grid():
    plain = image_grid([[GREY, GREY]], cell_size=32)
    signed = image_grid([[GREY, GREY]], cell_size=32, colorbar="signed")
    absolute = image_grid([[GREY, GREY]], cell_size=32, colorbar="absolute")
    assert signed.shape[0] == plain.shape[0] and signed.shape[1] > plain.shape[1]
    assert np.array_equal(signed[:, : plain.shape[1]], plain)  # the grid itself is unchanged
    # the first column right of the grid's padding is the colour scale: +1 at the top, 0 in the middle, -1 at the
    # bottom of the cell area (pad 4 above and below)
    column = signed[4 : signed.shape[0] - 4, plain.shape[1] + 4]
    assert column[0].tolist() == colorize(np.ones((1, 1)), signed=True)[0, 0].tolist()
    assert column[-1].tolist() == colorize(-np.ones((1, 1)), signed=True)[0, 0].tolist()
    middle = column[len(column) // 2].astype(int)
    assert np.abs(middle - colorize(np.zeros((1, 1)), signed=True)[0, 0].astype(int)).max() <= 8  # near-white
    column = absolute[4 : absolute.shape[0] - 4, plain.shape[1] + 4]
    assert column[0].tolist() == colorize(np.ones((1, 1)), signed=False)[0, 0].tolist()  # pale yellow on top
    assert column[-1].tolist() == colorize(np.zeros((1, 1)), signed=False)[0, 0].tolist()  # black at 0


def test_colorbar_strip_checks_its_labels():
    assert colorbar_strip(40, signed=False, labels=["high", "0"]).shape[0] == 40
    with pytest.raises(ValueError, match="labels must hold 3 entries"):
        colorbar_strip(40, signed=True, labels=["a", "b"])
    with pytest.raises(ValueError, match="colorbar must be one of"):
        image_grid([[GREY]], colorbar="diverging")


def test_a_wrong_prediction_gets_a_red_frame_and_a_red_label():
    grid = image_grid([[GREY], [GREY]], row_labels=["pred=3 WRONG", "pred=5"], cell_size=32,
                      row_label_colors=[MISTAKE_COLOR, None], cell_frames=[[MISTAKE_COLOR], [None]])
    plain = image_grid([[GREY], [GREY]], row_labels=["pred=3 WRONG", "pred=5"], cell_size=32)
    assert grid.shape == plain.shape
    changed = np.argwhere((grid != plain).any(axis=-1))
    # the frame: 3 pixels of MISTAKE_COLOR in the padding around the first cell, none around the second
    left = plain.shape[1] - 32 - 4  # the cell's x (one column: the grid ends with the cell and a pad)
    top = 4
    assert grid[top - 1, left - 1].tolist() == list(MISTAKE_COLOR)
    assert grid[top + 32, left + 10].tolist() == list(MISTAKE_COLOR)
    assert grid[top + 16, left + 16].tolist() == [128, 128, 128]  # the image inside is untouched
    second_top = top + 32 + 4
    assert grid[second_top - 1 + 32 + 1, left - 1].tolist() == [255, 255, 255]
    # the label of the wrong row is red: reddish text pixels left of the first cell, none in the second row's label
    label = grid[top : top + 32, :left - 4].astype(int)
    assert ((label[..., 0] > 150) & (label[..., 1] < 100)).sum() > 10
    other = grid[second_top : second_top + 32, :left - 4].astype(int)
    assert ((other[..., 0] - other[..., 1]) > 60).sum() == 0  # black text only
    assert changed[:, 0].min() < top  # the frame reaches into the padding above the cell


def test_cell_captions_add_room_under_their_row_and_draw_text_there():
    plain = image_grid([[GREY, GREY], [GREY, GREY]], cell_size=32)
    captioned = image_grid([[GREY, GREY], [GREY, GREY]], cell_size=32, cell_captions=[[None, "class 3 (0.91)"]])
    assert captioned.shape[1] == plain.shape[1] and captioned.shape[0] > plain.shape[0]
    band = captioned[4 + 32 : 4 + 32 + (captioned.shape[0] - plain.shape[0])]
    right = band[:, band.shape[1] // 2 :]
    left = band[:, : band.shape[1] // 2]
    assert (right < 128).any(axis=-1).sum() > 10 and not (left < 128).any()  # text under the second cell only
    with pytest.raises(ValueError, match="cell_captions has 3 rows for 2 rows of cells"):
        image_grid([[GREY], [GREY]], cell_captions=[[None], [None], [None]])


def test_short_layer_names_keep_the_last_two_components_and_stay_distinct():
    assert short_layer_names(["model.classifier.3", "model.features.0", "fc"]) == ["classifier.3", "features.0", "fc"]
    assert short_layer_names(["enc.block.0.conv", "dec.block.0.conv"]) == ["enc.block.0.conv", "dec.block.0.conv"]
    assert short_layer_names(["a.x.head.0", "b.y.head.0", "c.body"]) == ["x.head.0", "y.head.0", "c.body"]


def _result(name, outcome, similarity, floor, ceiling, score, reason="r", maps=None):
    verdict = Verdict(name, outcome, "spearman_abs", similarity, floor, ceiling, score, reason, 1)
    sims = {"spearman_abs": torch.full((2, 2), similarity)}
    return MethodResult(name=name, metrics=("spearman_abs",), similarity=sims, floor={"spearman_abs": floor},
                        ceiling={"spearman_abs": ceiling}, stochastic=False, maps=maps, signed_maps=maps,
                        verdict=verdict)


def _report(*results, stages=("model.classifier.3", "model.features.0")):
    report = RandomizationReport(
        mode="cascading", order="top_down", stages=list(stages), stage_parameters=[["w"], ["v"]],
        fallback_parameters=[], skipped_modules=[], batchnorm="keep", target_mode="fixed",
        targets=torch.zeros(3, 2, dtype=torch.long), predictions=torch.zeros(1, 2, dtype=torch.long), seed=0,
        rule=VerdictRule(metric="spearman_abs"),
    )
    for r in results:
        report.results[r.name] = r
    return report


def test_verdict_table_states_the_deciding_metric_and_the_controls_expected_verdicts():
    report = _report(
        _result("gradient", "passes", 0.1, 0.05, 1.0, 0.0526, "normalized similarity 0.053 < 0.25: the maps changed"),
        _result("edge", "fails", 1.0, 0.0, 1.0, 1.0),
        # the random control: ceiling (a re-run with fresh noise) and floor both about 0, the ceiling below the floor
        _result("random", "inconclusive", -0.02, 0.016, -0.024, math.nan,
                "ceiling - floor = -0.040 < 0.1: re-runs of the method differ about as much as maps of different"
                " inputs"),
    )
    columns, rows, legend = verdict_table(report)
    assert columns == ["method", "verdict", "expected", "decided by", "similarity", "floor", "ceiling", "normalized"]
    by_name = {row[0]: dict(zip(columns, row)) for row in rows}
    assert by_name["gradient"]["expected"] == "" and by_name["gradient"]["decided by"] == "spearman_abs"
    assert by_name["edge"]["expected"] == "fails (control)" and by_name["edge"]["verdict"] == "fails"
    assert by_name["random"]["expected"] == "inconclusive (control)"
    assert by_name["random"]["normalized"] is None  # undefined, a blank cell: not "nan"
    # why each verdict: in the legend (a wide "why" column made TensorBoard break the number columns mid-word)
    assert "random: ceiling - floor = -0.040 < 0.1: re-runs of the method differ" in legend
    assert by_name["gradient"]["normalized"] == pytest.approx(0.0526)
    for word in ("similarity:", "floor:", "ceiling:", "normalized =", "spearman_abs", "edge is expected to fail",
                 "random is expected to be inconclusive"):
        assert word in legend
    assert set(CONTROL_EXPECTATIONS) == {"edge", "random"}


def test_cascade_grid_shortens_layer_names_and_marks_controls():
    maps = torch.zeros(3, 2, 4, 4)
    report = _report(_result("gradient", "passes", 0.1, 0.0, 1.0, 0.1, maps=maps),
                     _result("edge", "fails", 1.0, 0.0, 1.0, 1.0, maps=maps))
    inputs = torch.rand(2, 1, 4, 4)
    grid = cascade_grid(report, inputs, num_probes=1, cell_size=16)
    zero = colorize(np.zeros((4, 4)), signed=False)
    expected = image_grid(
        [[to_rgb_uint8(inputs[0]), zero, zero, zero], [to_rgb_uint8(inputs[0]), zero, zero, zero]],
        row_labels=["gradient probe 0 (passes)", "edge (control) probe 0 (fails, expected fails)"],
        col_labels=["input", "original", "classifier.3", "features.0"], cell_size=16,
    )
    assert np.array_equal(grid, expected)


def test_signed_matrix_gets_a_diverging_scale_centred_at_zero():
    fig = plot_heatmap_matrix([[0.1, -0.05], [0.3, 0.0]], cmap="RdBu_r", center=0.0, fmt=".2f")
    (image,) = fig.axes[0].images
    assert image.get_clim() == pytest.approx((-0.3, 0.3)) and image.get_cmap().name == "RdBu_r"
    plain = plot_heatmap_matrix([[0.1, -0.05], [0.3, 0.0]])
    assert plain.axes[0].images[0].get_clim() == pytest.approx((-0.05, 0.3))  # unchanged without center


def test_band_label_explains_the_band_in_a_legend_outside_the_plot():
    fig = plot_curves([0, 1, 2], {"random": [0.7, 0.8, 1.0]}, bands={"random": ([0.6, 0.7, 1.0], [0.8, 0.9, 1.0])},
                      band_label="band: mean ± 1 std over 5 random orders")
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["random", "band: mean ± 1 std over 5 random orders"]
    fig.canvas.draw()
    box = legend.get_window_extent()
    assert box.x0 >= ax.get_window_extent().x1  # right of the axes: it covers no curve


def test_knn_gallery_puts_each_neighbours_class_under_it_and_marks_a_wrong_prediction(monkeypatch):
    from lightning_lens import render
    from lightning_lens.interpretable_models import KNNHead
    from lightning_lens.interpretable_models.knn_evaluation import neighbor_gallery_image

    calls = []
    original = render.image_grid
    monkeypatch.setattr(render, "image_grid", lambda *a, **k: calls.append(k) or original(*a, **k))
    head = KNNHead(4, 2, k=2, memory_size=4)
    head.write(torch.eye(4), torch.tensor([0, 0, 1, 1]), torch.arange(4))
    images = torch.rand(4, 1, 2, 2)
    nb = head.explain(torch.eye(4)[:2])
    neighbor_gallery_image(images[:2], nb, torch.tensor([0, 0]), lambda i: images[i], targets=torch.tensor([0, 1]),
                           title="epoch 3")
    (kwargs,) = calls
    sims = nb.similarities
    assert kwargs["cell_captions"][0] == [None] + [f"class {int(nb.labels[0, j])} ({float(sims[0, j]):.2f})"
                                                   for j in range(2)]
    assert all("nn:" not in label for label in kwargs["row_labels"])  # no longer crammed into the row label
    assert kwargs["row_labels"][1].endswith("WRONG") and kwargs["row_label_colors"] == [None, MISTAKE_COLOR]
    assert kwargs["cell_frames"] == [[None], [MISTAKE_COLOR]] and kwargs["title"] == "epoch 3"


def test_worst_slice_examples_carry_a_title_naming_the_slice():
    from lightning_lens.slices import labelled_image_rows

    plain = labelled_image_rows([GREY] * 3, ["#1", "#2", "#3"], cell_size=16)
    titled = labelled_image_rows([GREY] * 3, ["#1", "#2", "#3"], cell_size=16, title="slice colour=2")
    assert titled.shape[0] > plain.shape[0]
    strip = titled[: titled.shape[0] - plain.shape[0]]
    assert (strip < 128).any(axis=-1).sum() > 20  # the title's text


def test_the_intervention_band_is_explained_in_the_legend():
    from lightning_lens.interpretable_models.concept_bottleneck import ConceptEvaluation, intervention_curve_figure

    curves = {"random": torch.tensor([[0.8, 0.9, 1.0], [0.7, 0.85, 1.0], [0.75, 0.8, 1.0]]),
              "uncertainty": torch.tensor([[0.8, 0.95, 1.0]])}
    fig = intervention_curve_figure(ConceptEvaluation({}, curves, [0, 1, 2], ["a", "b"], {}))
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert texts == ["random", "uncertainty", "band: mean ± 1 std over\n3 random concept orders"]
