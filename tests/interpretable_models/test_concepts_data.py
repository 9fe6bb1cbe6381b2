"""SevenSegmentDigits and the torch_explain-style synthetic generators: definitions, splits, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_lens.datasets import SevenSegmentDigits, make_dot, make_trigonometry, make_xor
from lightning_lens.datasets.seven_segment import SEVEN_SEGMENT_TABLE


def lit(digit):
    return "".join(s for s, on in zip("abcdefg", SEVEN_SEGMENT_TABLE[digit]) if on)


def test_seven_segment_table_is_the_standard_display():
    assert [lit(d) for d in range(10)] == [
        "abcdef", "bc", "abdeg", "abcdg", "bcfg", "acdfg", "acdefg", "abc", "abcdefg", "abcdfg"]
    assert len({tuple(r) for r in SEVEN_SEGMENT_TABLE.tolist()}) == 10  # the label is a function of the concepts


def test_items_and_attributes(seven_segment_digits):
    ds = seven_segment_digits["train"]
    item = ds[5]
    assert set(item) == {"image", "label", "concepts", "index"}
    assert item["image"].shape == (1, 8, 8) and item["image"].dtype == torch.float32
    assert 0.0 <= float(ds.images.min()) and float(ds.images.max()) <= 1.0 and float(ds.images.max()) == 1.0
    assert isinstance(item["label"], int) and item["index"] == 5
    assert torch.equal(item["concepts"], torch.from_numpy(SEVEN_SEGMENT_TABLE[item["label"]]))
    assert ds.concept_names == list("abcdefg") and ds.concept_descriptions[6] == "middle bar"
    assert torch.equal(ds[-1]["image"], ds[len(ds) - 1]["image"])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_images_are_the_sklearn_digits_scaled_to_unit_range(seven_segment_digits):
    from sklearn.datasets import load_digits

    raw = load_digits()
    ds = seven_segment_digits["val"]
    for i in (0, 100, len(ds) - 1):
        src = ds.source_indices[i]
        assert np.array_equal(ds[i]["image"][0].numpy(), (raw.images[src] / 16.0).astype(np.float32))
        assert ds[i]["label"] == raw.target[src]


def test_splits_are_disjoint_stratified_complete_and_seeded(seven_segment_digits):
    parts = [set(seven_segment_digits[s].source_indices.tolist()) for s in ("train", "val", "test")]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert len(parts[0] | parts[1] | parts[2]) == 1797
    assert [len(p) for p in parts] == [1078, 360, 359]
    for split, frac in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        counts = np.bincount(seven_segment_digits[split].labels.numpy(), minlength=10)
        totals = np.array([178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
        assert np.all(np.abs(counts - frac * totals) <= 1)
    again = SevenSegmentDigits("val", seed=0)
    other = SevenSegmentDigits("val", seed=1)
    assert np.array_equal(again.source_indices, seven_segment_digits["val"].source_indices)
    assert not np.array_equal(other.source_indices, seven_segment_digits["val"].source_indices)


def test_upscaled_images_keep_range_and_mean():
    big = SevenSegmentDigits("test", image_size=32)
    small = SevenSegmentDigits("test")
    assert big[0]["image"].shape == (1, 32, 32)
    assert 0.0 <= float(big.images.min()) and float(big.images.max()) <= 1.0
    # bilinear upsampling by an integer factor keeps the mean ink within edge effects
    assert abs(float(big.images.mean()) - float(small.images.mean())) < 0.02


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        SevenSegmentDigits("training")
    with pytest.raises(ValueError, match="fractions"):
        SevenSegmentDigits(fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="image_size"):
        SevenSegmentDigits(image_size=0)


# -------------------------------------------------------------------------------------------------- synthetic
def _invert_x_plus_sin(v: torch.Tensor) -> torch.Tensor:
    """Solve a + sin(a) = v by bisection (the map is monotone)."""
    lo, hi = v.double() - 1.5, v.double() + 1.5
    for _ in range(60):
        mid = (lo + hi) / 2
        too_big = mid + torch.sin(mid) > v.double()
        hi, lo = torch.where(too_big, mid, hi), torch.where(too_big, lo, mid)
    return (lo + hi) / 2


def test_xor_definition():
    x, c, y = make_xor(500, seed=3)
    assert x.shape == (500, 2) and c.shape == (500, 2) and y.shape == (500, 1)
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    assert torch.equal(c, (x > 0.5).float())
    assert torch.equal(y[:, 0], (c[:, 0] != c[:, 1]).float())
    assert 0.4 < float(y.mean()) < 0.6


def test_trigonometry_definition():
    x, c, y = make_trigonometry(2000, seed=0)
    assert x.shape == (2000, 7) and c.shape == (2000, 3) and y.shape == (2000, 1)
    # a + sin(a) is monotone with value 0 at 0, so the concept a > 0 is readable from the first feature directly
    for i in range(3):
        assert torch.equal(c[:, i], (x[:, 2 * i] > 0).float())
    latents = torch.stack([_invert_x_plus_sin(x[:, 2 * i]) for i in range(3)], 1)
    stable = ((1 + torch.cos(latents)) > 1e-2).all(1)  # the inversion is ill-conditioned where cos(a) = -1
    assert int(stable.sum()) > 1700
    lat = latents[stable]
    for i in range(3):  # the paired cosine feature agrees with the recovered latent
        assert torch.allclose(torch.cos(lat[:, i]) + lat[:, i], x[stable, 2 * i + 1].double(), atol=1e-3)
    assert torch.allclose((lat**2).sum(1), x[stable, 6].double(), rtol=1e-3, atol=1e-3)
    s = lat.sum(1)
    clear = (s - 1).abs() > 1e-3
    assert torch.equal(y[stable][clear, 0], (s[clear] > 1).float())
    assert abs(float(latents.std()) - 2.0) < 0.1  # N(0, 2^2)


def test_dot_definition():
    x, c, y = make_dot(1000, seed=0)
    assert x.shape == (1000, 4) and c.shape == (1000, 2) and y.shape == (1000, 1)
    v1, v3 = (x[:, :2] + x[:, 2:]) / 2, (x[:, :2] - x[:, 2:]) / 2
    # float32 features: compare away from the decision boundaries
    for got, score in ((c[:, 0], v1.sum(1)), (c[:, 1], -v3.sum(1)), (y[:, 0], (v1 * v3).sum(1))):
        clear = score.abs() > 1e-4
        assert torch.equal(got[clear], (score[clear] > 0).float())
    assert abs(float(v1.std()) - 2.0) < 0.15 and abs(float(v3.std()) - 2.0) < 0.15
    assert abs(float(torch.corrcoef(torch.stack([v1[:, 0], v3[:, 0]]))[0, 1])) < 0.1  # independent draws


@pytest.mark.parametrize("make", [make_xor, make_trigonometry, make_dot])
def test_generators_are_seeded_and_leave_global_rngs_alone(make):
    np_state, torch_state = np.random.get_state()[1].copy(), torch.random.get_rng_state().clone()
    a, b, other = make(50, seed=7), make(50, seed=7), make(50, seed=8)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], other[0])
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    with pytest.raises(ValueError, match="n must be >= 1"):
        make(0)
