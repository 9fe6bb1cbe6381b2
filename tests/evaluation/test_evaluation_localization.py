"""Localization metrics on hand-built maps and masks whose answers are known exactly."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_lens.evaluation import pointing_game, relevance_mass_accuracy, relevance_rank_accuracy

METRICS = [pointing_game, relevance_mass_accuracy, relevance_rank_accuracy]


def _masks() -> torch.Tensor:
    """Three 8x8 masks of areas 4, 12 and 1 pixels (fractions 1/16, 3/16, 1/64)."""
    m = torch.zeros(3, 1, 8, 8)
    m[0, 0, :2, :2] = 1
    m[1, 0, 2:5, 4:8] = 1
    m[2, 0, 7, 0] = 1
    return m


AREAS = torch.tensor([4 / 64, 12 / 64, 1 / 64])


@pytest.mark.parametrize("metric", METRICS)
def test_perfect_map_scores_one(metric):
    masks = _masks()
    # positive relevance only inside the mask, with varying values (not a plateau)
    maps = masks * torch.linspace(1, 2, 64).view(1, 1, 8, 8)
    result = metric(maps, masks)
    assert result.scores.tolist() == [1.0, 1.0, 1.0]
    assert result.value == 1.0
    torch.testing.assert_close(result.chance, AREAS)
    assert result.chance_level == pytest.approx(float(AREAS.mean()))
    assert result.n_empty == 0 and result.n_valid == 3


@pytest.mark.parametrize("metric", METRICS)
def test_uniform_map_scores_exactly_chance(metric):
    masks = _masks()
    result = metric(torch.full((3, 1, 8, 8), 0.3), masks)
    torch.testing.assert_close(result.scores, AREAS)
    assert result.value == pytest.approx(result.chance_level)
    assert result.lift == pytest.approx(1.0)


@pytest.mark.parametrize("metric", METRICS)
def test_map_entirely_outside_scores_zero(metric):
    masks = _masks()
    maps = (1 - masks) * torch.linspace(1, 2, 64).view(1, 1, 8, 8)
    assert metric(maps, masks).scores.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("metric", METRICS)
def test_empty_masks_are_excluded_and_counted_not_hits(metric):
    masks = _masks()
    masks[1] = 0
    maps = torch.full((3, 1, 8, 8), 1.0)  # a constant map: ties everywhere, so an empty mask could look like a hit
    result = metric(maps, masks)
    assert result.n_empty == 1
    assert result.valid.tolist() == [True, False, True]
    assert math.isnan(result.scores[1]) and math.isnan(result.chance[1])
    assert result.value == pytest.approx((4 / 64 + 1 / 64) / 2)
    assert result.chance_level == pytest.approx((4 / 64 + 1 / 64) / 2)


def test_all_masks_empty_gives_nan_with_a_warning():
    with pytest.warns(RuntimeWarning, match="no example could be scored"):
        result = relevance_mass_accuracy(torch.rand(2, 1, 4, 4), torch.zeros(2, 1, 4, 4))
    assert result.n_empty == 2 and result.n_valid == 0 and math.isnan(result.value)


def test_relevance_mass_is_the_share_inside():
    masks = torch.zeros(1, 1, 2, 2)
    masks[0, 0, 0, 0] = 1
    maps = torch.tensor([[[[3.0, 1.0], [0.5, 0.5]]]])
    assert relevance_mass_accuracy(maps, masks).value == pytest.approx(3.0 / 5.0)


def test_relevance_mass_pooling_over_channels():
    masks = torch.zeros(1, 1, 2, 2)
    masks[0, 0, 0, 0] = 1
    maps = torch.tensor([[[[3.0, 1.0], [-2.0, 0.0]], [[-1.0, 1.0], [1.0, 0.0]]]])  # (1, 2, 2, 2)
    # sum over channels: [[2, 2], [-1, 0]] -> positive part: inside 2 of 4
    assert relevance_mass_accuracy(maps, masks).value == pytest.approx(0.5)
    # abs: [[4, 2], [3, 0]] -> 4 / 9
    assert relevance_mass_accuracy(maps, masks, pooling="abs_sum").value == pytest.approx(4 / 9)
    # squares: [[10, 2], [5, 0]] -> 10 / 17
    assert relevance_mass_accuracy(maps, masks, pooling="l2_sq").value == pytest.approx(10 / 17)
    with pytest.raises(ValueError, match="pooling='sum'"):
        relevance_mass_accuracy(maps, masks, pooling="sum")


def test_relevance_mass_excludes_maps_without_relevance():
    masks = torch.ones(2, 1, 3, 3)
    maps = torch.stack([-torch.ones(1, 3, 3), torch.ones(1, 3, 3)])  # the first has no positive relevance: 0 / 0
    result = relevance_mass_accuracy(maps, masks)
    assert result.n_zero_maps == 1 and result.n_empty == 0
    assert result.valid.tolist() == [False, True] and result.value == 1.0


def test_relevance_rank_ties_are_shared_in_expectation():
    masks = torch.zeros(1, 1, 2, 3)
    masks[0, 0, 0, :2] = 1  # K = 2
    # top-2 = {9.0 (outside), 1.0 (inside)}: 1 hit of 2
    maps = torch.tensor([[[[1.0, 0.5, 0.5], [9.0, 0.5, 0.0]]]])
    assert relevance_rank_accuracy(maps, masks).value == pytest.approx(0.5)
    maps = torch.tensor([[[[0.5, 0.2, 0.5], [9.0, 0.5, 0.0]]]])
    # top-2 = {9} + one of three tied 0.5 pixels (one inside): expected hits 1/3 -> score 1/6
    assert relevance_rank_accuracy(maps, masks).value == pytest.approx(1 / 6)


def test_pointing_game_tolerance_and_its_chance_level():
    masks = torch.zeros(2, 1, 9, 9)
    masks[:, 0, 4, 4] = 1  # one pixel at the centre
    maps = torch.zeros(2, 1, 9, 9)
    maps[0, 0, 4, 6] = 1.0  # distance 2
    maps[1, 0, 7, 7] = 1.0  # distance sqrt(18) = 4.24
    assert pointing_game(maps, masks).scores.tolist() == [0.0, 0.0]
    assert pointing_game(maps, masks, tolerance=1).scores.tolist() == [0.0, 0.0]
    r2 = pointing_game(maps, masks, tolerance=2)
    assert r2.scores.tolist() == [1.0, 0.0]
    # the disk of radius 2 holds 13 pixels: the chance of a random point is 13 / 81
    assert r2.chance_level == pytest.approx(13 / 81)
    assert pointing_game(maps, masks, tolerance=4.25).scores.tolist() == [1.0, 1.0]
    assert pointing_game(maps, masks, tolerance=4.2).scores.tolist() == [1.0, 0.0]


def test_pointing_game_splits_ties_between_maxima():
    masks = torch.zeros(1, 1, 4, 4)
    masks[0, 0, 0, 0] = 1
    maps = torch.zeros(1, 1, 4, 4)
    maps[0, 0, 0, 0] = maps[0, 0, 3, 3] = 2.0  # two maxima, one inside
    assert pointing_game(maps, masks).value == 0.5


def test_pointing_game_on_signed_multichannel_maps():
    masks = torch.zeros(1, 1, 3, 3)
    masks[0, 0, 1, 1] = 1
    maps = torch.zeros(1, 3, 3, 3)
    maps[0, :, 1, 1] = 1.0  # channel sum 3 at the centre
    maps[0, 0, 0, 0] = -5.0  # a large negative value is not "pointed at" with the default positive pooling
    assert pointing_game(maps, masks).value == 1.0
    assert pointing_game(maps, masks, pooling="abs_sum").value == 0.0


def test_masks_accept_bool_and_3d_and_threshold_soft_masks():
    maps = torch.rand(2, 1, 4, 4)
    hard = torch.zeros(2, 1, 4, 4)
    hard[:, :, 1:3, 1:3] = 1
    soft = hard * 0.9 + (1 - hard) * 0.4  # below 0.5 counts as outside
    for masks in (hard.bool(), hard[:, 0], soft):
        torch.testing.assert_close(
            relevance_mass_accuracy(maps, masks).scores, relevance_mass_accuracy(maps, hard).scores
        )


def test_non_image_features():
    maps = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.5, 0.0]])
    masks = torch.tensor([[0, 1, 0], [1, 0, 0]])
    assert pointing_game(maps, masks).scores.tolist() == [1.0, 0.5]
    assert relevance_mass_accuracy(maps, masks).scores.tolist() == pytest.approx([0.7, 0.5])
    with pytest.raises(ValueError, match="tolerance needs 2-D maps"):
        pointing_game(maps, masks, tolerance=2)


def test_bad_inputs_raise_clear_errors():
    maps = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match="masks of shape"):
        pointing_game(maps, torch.ones(2, 1, 5, 5))
    with pytest.raises(ValueError, match="masks of shape"):
        pointing_game(maps, torch.ones(3, 1, 4, 4))
    with pytest.raises(TypeError, match="masks must be a tensor"):
        pointing_game(maps, [[1]])
    with pytest.raises(ValueError, match="NaN"):
        relevance_mass_accuracy(torch.full((1, 1, 2, 2), float("nan")), torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match="pooling must be one of"):
        relevance_rank_accuracy(maps, torch.ones(2, 1, 4, 4), pooling="max")
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(maps, torch.ones(2, 1, 4, 4), tolerance=-1)
    with pytest.raises(TypeError, match="attributions must be a torch.Tensor"):
        pointing_game([[0.0]], torch.ones(1, 1))
