"""Tabular charts: per-probe feature bars (top k by |attribution|, signed colours) and global importance with errors."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_lens.render import feature_bars, importance_chart, top_features
from lightning_lens.render.tabular import _signed_colors


def _count(img: np.ndarray, rgb: tuple[float, float, float]) -> int:
    color = np.round(np.asarray(rgb) * 255).astype(int)
    return int((np.abs(img.astype(int) - color).max(axis=-1) <= 2).sum())


def test_top_features_rank_by_magnitude_with_stable_ties():
    assert top_features([0.1, -3.0, 2.0, -2.0], top_k=3).tolist() == [1, 2, 3]
    assert top_features([1.0, 1.0, 1.0]).tolist() == [0, 1, 2]


def test_positive_bars_are_red_and_negative_bars_blue():
    red, blue = _signed_colors(np.array([1.0, -1.0]))
    only_positive = feature_bars([[2.0, 1.0, 0.5]], ["a", "b", "c"])
    assert _count(only_positive, red) > 200 and _count(only_positive, blue) == 0
    mixed = feature_bars([[2.0, -1.0, 0.5]], ["a", "b", "c"])
    assert _count(mixed, blue) > 100


def test_top_k_limits_the_bars_drawn():
    red = _signed_colors(np.array([1.0]))[0]
    values = [[1.0] * 20]
    few, many = feature_bars(values, top_k=2), feature_bars(values, top_k=20)
    # same height per bar budget: more bars, more red pixels
    assert _count(many, red) > 3 * _count(few, red)


def test_importance_chart_has_error_bars_and_orders_by_mean():
    red = _signed_colors(np.array([1.0]))[0]
    plain = importance_chart([0.3, 0.1], None, ["leak", "age"])
    with_errors = importance_chart([0.3, 0.1], [0.05, 0.05], ["leak", "age"])
    assert plain.shape == with_errors.shape and not np.array_equal(plain, with_errors)  # the error bars are drawn
    dark = lambda img: int((img.max(axis=-1) < 80).sum())  # noqa: E731
    assert dark(with_errors) > dark(plain)
    assert _count(plain, red) > 200


@pytest.mark.parametrize("call, match", [
    (lambda: feature_bars([1.0, 2.0]), "attributions must have 2 dimension"),
    (lambda: feature_bars([[1.0, 2.0]], ["a"]), "feature_names has 1 names for 2 features"),
    (lambda: feature_bars([[1.0, 2.0]], labels=["a", "b"]), "labels has 2 entries for 1 probes"),
    (lambda: importance_chart([1.0, 2.0], [0.1]), "std has 1 values for 2 features"),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()
