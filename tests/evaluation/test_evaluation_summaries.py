"""Saliency summaries (mean_abs, top10_mass) on hand-made maps with known values."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_lens.evaluation import saliency_summaries, top_mass


def test_top_mass_counts_channels_summed_and_the_top_tenth_of_pixels():
    maps = torch.zeros(3, 2, 4, 5)  # 20 pixels: the top 10 % is 2 pixels
    maps[0, 0, 0, 0], maps[0, 1, 0, 0] = 3.0, -1.0  # one pixel holds |3| + |-1| = 4 of 4
    maps[1] = 1.0  # flat: 2 * 2 of 20 * 2
    maps[2, 0] = torch.arange(20.0).reshape(4, 5)  # 0..19: top two pixels 19 + 18 of 190
    assert top_mass(maps).tolist() == [1.0, 0.1, pytest.approx(37 / 190)]
    assert top_mass(maps, fraction=0.5).tolist()[2] == pytest.approx(sum(range(10, 20)) / 190)


def test_top_mass_rounds_the_pixel_count_up_without_float_noise():
    maps = torch.ones(1, 1, 1, 30)  # 10 % of 30 is 3 pixels (0.1 * 30 = 3.0000000000000004 must not give 4)
    assert top_mass(maps).item() == pytest.approx(0.1)
    maps = torch.ones(1, 1, 1, 31)  # 3.1 -> 4 pixels
    assert top_mass(maps).item() == pytest.approx(4 / 31)


def test_saliency_summaries_exact_values_and_empty_maps():
    maps = torch.zeros(3, 1, 2, 5)
    maps[0, 0, 0, 0] = -4.0
    maps[1] = 0.5
    # map 2 is zero everywhere: no mass, left out of top10_mass, counted in mean_abs
    out = saliency_summaries(maps)
    assert out["mean_abs"] == pytest.approx((4.0 + 10 * 0.5) / 30)
    assert out["top10_mass"] == pytest.approx((1.0 + 0.1) / 2)
    assert math.isnan(saliency_summaries(torch.zeros(2, 1, 3, 3))["top10_mass"])


def test_non_finite_values_count_as_zero_and_flat_features_work():
    maps = torch.tensor([[float("nan"), 2.0, float("inf"), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0]])
    out = saliency_summaries(maps)  # (B, features): each feature is a "pixel"
    assert out == {"mean_abs": pytest.approx(0.4), "top10_mass": pytest.approx(0.5)}


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match="maps must be a torch.Tensor"):
        saliency_summaries([[1.0]])
    with pytest.raises(ValueError, match="fraction must be <= 1.0"):
        top_mass(torch.ones(1, 4), fraction=2.0)
