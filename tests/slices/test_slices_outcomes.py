"""Per-sample outcomes with data problems flagged, and the report helpers (table rows, console summary, grid)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_lens.slices import (
    EXCLUSION_REASONS,
    TABLE_COLUMNS,
    classification_outcomes,
    exclusion_counts,
    find_slices,
    labelled_image_rows,
    slice_table_rows,
    summarize_slices,
)

NAN, INF = float("nan"), float("inf")


def reason(status):
    return [EXCLUSION_REASONS[s - 1] if s else "ok" for s in status]


def test_multiclass_outcomes_equal_torch_on_usable_rows():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, generator=g)
    targets = torch.randint(0, 5, (8,), generator=g)
    out = classification_outcomes(logits, targets)
    np.testing.assert_allclose(out["loss"], F.cross_entropy(logits, targets, reduction="none").double().numpy(),
                               rtol=1e-6)
    prob = logits.softmax(1)
    assert out["pred"].tolist() == prob.argmax(1).tolist()
    np.testing.assert_allclose(out["confidence"], prob.max(1).values.double().numpy(), rtol=1e-6)
    assert out["correct"].tolist() == (prob.argmax(1) == targets).tolist()
    assert out["label"].tolist() == targets.tolist() and not out["status"].any()


def test_binary_logits_of_shape_b_and_b1_agree():
    z = torch.tensor([2.0, -1.0, 0.5, -3.0])
    y = torch.tensor([1.0, 1.0, 0.0, 0.0])
    flat, column = classification_outcomes(z, y), classification_outcomes(z[:, None], y)
    for key in ("loss", "pred", "correct", "confidence"):
        np.testing.assert_array_equal(flat[key], column[key])
    np.testing.assert_allclose(flat["loss"], F.binary_cross_entropy_with_logits(z, y, reduction="none").numpy(),
                               rtol=1e-6)
    assert flat["pred"].tolist() == [1, 0, 1, 0] and flat["correct"].tolist() == [True, False, False, True]
    np.testing.assert_allclose(flat["confidence"], torch.sigmoid(z.abs()).double().numpy(), rtol=1e-6)


def test_nan_and_inf_samples_are_flagged_with_their_reason_never_raised():
    logits = torch.tensor([[1.0, 0.0], [NAN, 0.0], [INF, 0.0], [0.0, 1.0], [0.0, 1.0], [3e38, -3e38]])
    targets = torch.tensor([0, 0, 0, 2, -1, 1])
    inputs = torch.zeros(6, 3)
    inputs[3, 1] = NAN  # the first reason that applies is reported
    out = classification_outcomes(logits, targets, inputs)
    assert reason(out["status"]) == ["ok", "non-finite logits", "non-finite logits", "non-finite inputs",
                                     "label outside the classes", "non-finite loss"]
    assert np.isfinite(out["loss"][0]) and np.isnan(out["loss"][1:]).all()
    assert out["correct"].tolist() == [True, False, False, False, False, False]
    assert exclusion_counts(out["status"]) == {"non-finite inputs": 1, "non-finite logits": 2,
                                               "label outside the classes": 1, "non-finite loss": 1}


def test_fractional_and_binary_out_of_range_labels_are_flagged():
    out = classification_outcomes(torch.zeros(3, 4), torch.tensor([1.5, 3.0, 4.0]))
    assert reason(out["status"]) == ["label outside the classes", "ok", "label outside the classes"]
    out = classification_outcomes(torch.zeros(2), torch.tensor([2.0, 1.0]))
    assert reason(out["status"]) == ["label outside the classes", "ok"]


def test_unusable_shapes_raise():
    with pytest.raises(ValueError, match=r"logits must be \(B, C\) or \(B,\), got shape \(2, 3, 4\)"):
        classification_outcomes(torch.zeros(2, 3, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="one class index per sample"):
        classification_outcomes(torch.zeros(2, 3), torch.zeros(2, 3))


# ----------------------------------------------------------------------------------------------------------- report
def _slices():
    rng = np.random.default_rng(0)
    meta = {"site": rng.choice(["a", "b"], 2000), "age": rng.integers(0, 3, 2000)}
    errors = rng.random(2000) < np.where((meta["site"] == "b") & (meta["age"] == 2), 0.5, 0.1)
    return find_slices(errors, meta), errors


def test_table_rows_hold_the_slices_statistics_and_the_exclusions():
    slices, errors = _slices()
    names = ["first", "second"][: len(slices)]
    rows = slice_table_rows(slices, names=names, first_seen={"first": 2}, epoch=5, n_samples=2000,
                            accuracy=1 - errors.mean(), alpha=0.05, min_gap=0.05, max_rows=1, excluded=3)
    assert len(rows) == 2 and all(len(r) == len(TABLE_COLUMNS) for r in rows)
    top = slices[0]
    assert rows[0][:6] == [1, top.name, "metadata", top.size, round(top.fraction, 4), round(top.accuracy, 4)]
    # numbers stay numbers (W&B sorts them): the error and its interval as three columns, q unrounded
    by_column = dict(zip(TABLE_COLUMNS, rows[0]))
    assert (by_column["error"], by_column["CI low"], by_column["CI high"]) == (
        round(top.error_rate, 4), round(top.ci_low, 4), round(top.ci_high, 4))
    assert by_column["q"] == top.q_value and isinstance(by_column["share"], float)
    assert rows[0][-1] == 2  # first seen from the tracker
    assert rows[1][2:5] == ["excluded", 3, round(3 / 2003, 4)]
    none = slice_table_rows([], n_samples=10, accuracy=0.5, alpha=0.01, min_gap=0.1)
    assert none == [[None, "no slice with q <= 0.01 and gap >= 0.1", "", 10, 1.0, 0.5] + [None] * 8]


def test_summary_names_the_top_slices_with_size_and_accuracy():
    slices, _ = _slices()
    top = slices[0]
    one = summarize_slices(slices[:1], n_samples=2000, accuracy=0.85, excluded=2)
    assert one == (f"2000 samples, accuracy 0.850 (2 excluded: NaN/inf or invalid label); 1 slice: {top.name} "
                   f"(n={top.size}, accuracy {top.accuracy:.3f})")
    three = summarize_slices([top, top, top], n_samples=2000, accuracy=0.85, max_items=2)
    item = f"{top.name} (n={top.size}, accuracy {top.accuracy:.3f})"
    assert three == f"2000 samples, accuracy 0.850; 3 slices: {item}; {item}, +1 more"


def test_labelled_image_rows_wraps_rows_and_keeps_pixels():
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    grid = labelled_image_rows([red] * 5, [f"#{i}" for i in range(5)], per_row=2, cell_size=16)
    one_row = labelled_image_rows([red] * 2, ["#0", "#1"], per_row=2, cell_size=16)
    assert grid.shape[1] == one_row.shape[1] and grid.shape[0] == 3 * one_row.shape[0]
    def red_pixels(image):
        return int(((image[..., 0] == 255) & (image[..., 1] == 0)).sum())

    assert red_pixels(grid) * 2 == red_pixels(one_row) * 5
    with pytest.raises(ValueError, match="one label per image"):
        labelled_image_rows([red], ["a", "b"])
