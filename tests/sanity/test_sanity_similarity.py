"""Similarity metrics: hand-computed values, scipy's spearmanr, scikit-image's SSIM and HOG, batching."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from lightning_lens.sanity import similarity
from lightning_lens.sanity.similarity import (
    _abs_percentile_of_sorted,
    _percentile,
    _sort_rows,
    _sort_signed_by_magnitude,
)

skimage_metrics = pytest.importorskip("skimage.metrics")
skimage_feature = pytest.importorskip("skimage.feature")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ rank correlations
def test_spearman_hand_computed():
    # ranks (1,2,3,4) vs (1,3,2,4): d = (0,1,1,0), rho = 1 - 6 * 2 / (4 * 15) = 0.8
    rho = similarity.spearman(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[10.0, 30.0, 20.0, 40.0]]))
    assert rho.item() == \
        pytest.approx(0.8, abs=1e-12)
    # a monotone transform leaves it at 1; reversal gives -1
    x = torch.tensor([[0.1, 5.0, 2.0, 3.0, -1.0]])
    assert similarity.spearman(x, x.exp()).item() == pytest.approx(1.0)
    assert similarity.spearman(x, -x).item() == pytest.approx(-1.0)


def test_spearman_ties_match_scipy():
    g = _gen(1)
    a = torch.randint(0, 5, (6, 40), generator=g).double()  # many ties
    b = a + torch.randint(0, 3, (6, 40), generator=g).double()
    ours = similarity.spearman(a, b)
    ref = [stats.spearmanr(a[i].numpy(), b[i].numpy()).statistic for i in range(6)]
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-12)


def test_spearman_random_maps_match_scipy_and_batch_equals_loop():
    g = _gen(2)
    a = torch.randn(5, 3, 12, 12, generator=g)
    b = a + torch.randn(5, 3, 12, 12, generator=g)
    ours = similarity.spearman(a, b)
    ref = [stats.spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy()).statistic for i in range(5)]
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-6)
    loop = torch.cat([similarity.spearman(a[i : i + 1], b[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(ours, loop)


def test_constant_and_nonfinite_rows_give_nan():
    a = torch.tensor([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0], [1.0, float("nan"), 3.0]])
    b = torch.tensor([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    r = similarity.spearman(a, b)
    assert r[0].item() == pytest.approx(-0.5)
    assert math.isnan(r[1].item()) and math.isnan(r[2].item())
    assert math.isnan(similarity.pearson(a[1:2], b[1:2]).item())


def test_pearson_hand_computed():
    # x = (1,2,3), y = (2,4,7): cov = 2.5, var_x = 1, var_y = 6.333..; r = 2.5 / sqrt(1 * 6.333 * ...)
    x, y = np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 7.0])
    xc, yc = x - x.mean(), y - y.mean()
    expected = (xc * yc).sum() / math.sqrt((xc**2).sum() * (yc**2).sum())
    r = similarity.pearson(torch.from_numpy(x[None]), torch.from_numpy(y[None]))
    assert r.item() == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------------------------------- normalization
def test_channel_aggregation():
    maps = torch.tensor([[[[1.0, -2.0]], [[-3.0, 5.0]]]])  # (1, 2, 1, 2)
    assert similarity.aggregate_channels(maps, signed=False).tolist() == [[[4.0, 7.0]]]
    assert similarity.aggregate_channels(maps, signed=True).tolist() == [[[-2.0, 3.0]]]


def test_normalize_absolute_clips_at_the_percentile():
    # 101 values 0..100: the 99th percentile is 99 -> (v - 0) / 99, clipped at 1
    maps = torch.arange(101.0).view(1, 101)
    out = similarity.normalize_absolute(maps, clip_percentile=99.0)
    assert out[0, 50].item() == pytest.approx(50 / 99)
    assert out[0, 99].item() == 1.0 and out[0, 100].item() == 1.0
    assert similarity.normalize_absolute(torch.full((1, 5), 3.0)).abs().sum().item() == 0.0  # constant map -> zeros


def test_normalize_signed_scales_by_the_percentile_of_magnitudes():
    values = torch.tensor([[-4.0, -1.0, 0.0, 1.0, 2.0]])
    # percentile 50 of |v| = (0,1,1,2,4) is 1 -> v / 1 clipped to [-1, 1]
    assert similarity.normalize_signed(values, clip_percentile=50.0).tolist() == [[-1.0, -1.0, 0.0, 1.0, 1.0]]
    assert similarity.normalize_signed(values, clip_percentile=None).tolist() == [[-1.0, -0.25, 0.0, 0.25, 0.5]]


@pytest.mark.parametrize("n", [5, 37, 100, 1024, 3000])
def test_percentiles_match_numpy(n):
    x = torch.randn(4, n, generator=_gen(n), dtype=torch.float64)
    np.testing.assert_allclose(_percentile(x, 99.0).squeeze(1).numpy(), np.percentile(x.numpy(), 99, axis=1))
    sorted_x = _sort_rows(x)[0]
    np.testing.assert_allclose(_abs_percentile_of_sorted(sorted_x, 99.0).squeeze(1).numpy(),
                               np.percentile(np.abs(x.numpy()), 99, axis=1))
    np.testing.assert_allclose(_abs_percentile_of_sorted(sorted_x, 30.0).squeeze(1).numpy(),
                               np.percentile(np.abs(x.numpy()), 30, axis=1))


# --------------------------------------------------------------------------------------------------------------- ssim
def test_ssim_constant_images_hand_computed():
    # constant images a and b: variances 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) with C1 = (0.01 * 1)^2
    a, b = 0.2, 0.6
    c1 = 1e-4
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    value = similarity.ssim(torch.full((1, 16, 16), a, dtype=torch.float64),
                            torch.full((1, 16, 16), b, dtype=torch.float64))
    assert value.item() == pytest.approx(expected, abs=1e-12)
    x = torch.rand(2, 20, 20, generator=_gen(3), dtype=torch.float64)
    torch.testing.assert_close(similarity.ssim(x, x), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("sample_covariance", [False, True])
def test_ssim_matches_scikit_image(sample_covariance):
    g = _gen(4)
    x = torch.rand(3, 32, 28, generator=g, dtype=torch.float64)
    y = (x + 0.3 * torch.rand(3, 32, 28, generator=g, dtype=torch.float64)).clamp(0, 1)
    ours = similarity.ssim(x, y, sample_covariance=sample_covariance)
    ref = [skimage_metrics.structural_similarity(x[i].numpy(), y[i].numpy(), data_range=1.0, gaussian_weights=True,
                                                 sigma=1.5, use_sample_covariance=sample_covariance)
           for i in range(3)]
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-10)


def test_ssim_rejects_small_maps():
    with pytest.raises(ValueError, match="at least 11x11"):
        similarity.ssim(torch.rand(1, 8, 8), torch.rand(1, 8, 8))


# ---------------------------------------------------------------------------------------------------------------- hog
def test_hog_vertical_step_hand_computed():
    # a vertical step between columns 11 and 12 of a 24x24 image: horizontal gradient 1 on columns 11 and 12 (the
    # central difference), orientation 0 (bin 0). 3x3 cells of 8 px; the middle column of cells holds 8 rows x 2
    # columns of magnitude 1 -> 16 / 64 = 0.25 in bin 0. One block: three equal entries -> L2-Hys gives 1/sqrt(3).
    img = torch.zeros(1, 24, 24, dtype=torch.float64)
    img[:, :, 12:] = 1.0
    feats = similarity.hog_features(img, orientations=9, pixels_per_cell=8, cells_per_block=3).view(3, 3, 9)
    expected = torch.zeros(3, 3, 9, dtype=torch.float64)
    expected[:, 1, 0] = 1 / math.sqrt(3)
    torch.testing.assert_close(feats, expected, atol=1e-6, rtol=0)
    ref = skimage_feature.hog(img[0].numpy(), orientations=9, pixels_per_cell=(8, 8), cells_per_block=(3, 3),
                              block_norm="L2-Hys")
    np.testing.assert_allclose(feats.flatten().numpy(), ref, atol=1e-6)


@pytest.mark.parametrize(("shape", "orientations", "cell", "block"), [
    ((32, 32), 9, 8, 3), ((48, 40), 6, 4, 2), ((33, 35), 9, 8, 2), ((64, 64), 12, 16, 3),
])
def test_hog_matches_scikit_image(shape, orientations, cell, block):
    x = torch.rand(3, *shape, generator=_gen(5), dtype=torch.float64)
    ours = similarity.hog_features(x, orientations, cell, block)
    ref = np.stack([skimage_feature.hog(x[i].numpy(), orientations=orientations, pixels_per_cell=(cell, cell),
                                        cells_per_block=(block, block), block_norm="L2-Hys") for i in range(3)])
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-6)  # scikit-image accumulates cells in float32


def test_hog_rejects_small_maps():
    with pytest.raises(ValueError, match="hog needs at least 24x24"):
        similarity.hog_features(torch.rand(1, 16, 16))


# -------------------------------------------------------------------------------------------------------------- top-k
def test_topk_intersection_hand_computed():
    a = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    b = torch.tensor([[4.0, 1.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    assert similarity.topk_intersection(a, b, k=2).tolist() == [0.5, 1.0]
    assert similarity.topk_intersection(a, b, k=0.25).tolist() == [1.0, 1.0]  # fraction: round(0.25 * 4) = 1 position
    assert math.isnan(similarity.topk_intersection(torch.ones(1, 4), b[:1], k=2).item())  # constant map: undefined


# ------------------------------------------------------------------------------------------------------ MapSimilarity
@pytest.mark.parametrize("channels", [3, 1])  # one channel: the signed sort is derived from the magnitude sort
def test_map_similarity_equals_the_metric_functions(channels):
    g = _gen(6)
    a = torch.randn(6, channels, 32, 32, generator=g)
    b = a + 2 * torch.randn(6, channels, 32, 32, generator=g)
    a[:, :, :4] = 0  # ties
    sim = similarity.MapSimilarity()
    scores = sim(a, b)
    na, nb = similarity.normalize_absolute(a), similarity.normalize_absolute(b)
    expected = {
        "spearman_abs": similarity.spearman(na, nb),
        "spearman_signed": similarity.spearman(similarity.normalize_signed(a), similarity.normalize_signed(b)),
        "ssim": similarity.ssim(na, nb),
        "hog": similarity.pearson(similarity.hog_features(na), similarity.hog_features(nb)),
        "topk": similarity.topk_intersection(similarity.aggregate_channels(a, False),
                                             similarity.aggregate_channels(b, False), 0.1),
    }
    assert list(scores) == list(expected)
    for name, value in expected.items():
        torch.testing.assert_close(scores[name], value.to(scores[name].dtype), atol=2e-6, rtol=0, msg=name)
    # identical maps score 1 on every metric
    for name, value in sim(a, a).items():
        torch.testing.assert_close(value, torch.ones_like(value), atol=1e-6, rtol=0, msg=name)


def test_map_similarity_batch_equals_per_example_and_prepared_roll():
    g = _gen(7)
    a = torch.randn(4, 1, 32, 32, generator=g)
    b = torch.randn(4, 1, 32, 32, generator=g)
    sim = similarity.MapSimilarity()
    batched = sim(a, b)
    for i in range(4):
        single = sim(a[i : i + 1], b[i : i + 1])
        for name in batched:
            assert batched[name][i].item() == pytest.approx(single[name].item(), abs=1e-6)
    pa = sim.prepare(a)
    rolled = sim.compare(pa, pa.roll(1))
    direct = sim(a, a.roll(1, dims=0))
    for name in rolled:
        torch.testing.assert_close(rolled[name], direct[name])


def test_stacked_comparison_equals_per_stage_comparison():
    # a randomization test prepares all its stages in one call and compares them with the reference at once
    g = _gen(8)
    sim = similarity.MapSimilarity()
    reference = torch.randn(4, 1, 24, 24, generator=g)
    stages = [reference + scale * torch.randn(4, 1, 24, 24, generator=g) for scale in (0.1, 1.0, 10.0)]
    stages[1][:, :, :6] = 0  # ties
    stages[2][1, 0, 0, 0] = math.nan  # a non-finite map
    prepared = sim.prepare(reference)
    stacked = sim.compare_stacked(prepared, sim.prepare(torch.cat(stages)))
    assert sorted(stacked) == sorted(similarity.ALL_METRICS)
    for s, maps in enumerate(stages):
        for name, value in sim.compare(prepared, sim.prepare(maps)).items():
            assert stacked[name].shape == (3, 4)
            torch.testing.assert_close(stacked[name][s], value, atol=0, rtol=0, equal_nan=True, msg=name)
    assert torch.isnan(stacked["ssim"][2, 1]) and not torch.isnan(stacked["ssim"][2, 0])
    with pytest.raises(ValueError, match="whole batches"):
        sim.compare_stacked(prepared, sim.prepare(torch.randn(6, 1, 24, 24, generator=g)))


@pytest.mark.parametrize("shape", [(5, 1, 9, 9), (5, 40)])
def test_signed_sort_from_the_magnitude_sort(shape):
    values = torch.randint(-4, 5, shape, generator=_gen(9)).double().reshape(shape[0], -1)
    values[0, :3] = -0.0
    magnitude_order = _sort_rows(values.abs())[1]
    sorted_values, order = _sort_signed_by_magnitude(values, magnitude_order)
    assert torch.equal(sorted_values, values.sort(dim=1).values)
    assert torch.equal(values.gather(1, order), sorted_values)
    assert torch.equal(order.sort(dim=1).values, torch.arange(values.shape[1]).expand_as(order))  # a permutation


def test_map_similarity_applicability_and_errors():
    sim = similarity.MapSimilarity()
    assert sim.applicable((2, 1, 8, 8)) == ("spearman_abs", "spearman_signed", "topk")
    assert sim.applicable((2, 10)) == ("spearman_abs", "spearman_signed", "topk")
    assert sim.applicable((2, 3, 32, 32)) == ("spearman_abs", "spearman_signed", "ssim", "hog", "topk")
    with pytest.raises(ValueError, match="remove them from metrics"):
        similarity.MapSimilarity(metrics=["ssim"]).applicable((2, 1, 8, 8))
    with pytest.raises(ValueError, match="unknown"):
        similarity.MapSimilarity(metrics=["pearsonish"])
    with pytest.raises(ValueError, match="same shape"):
        sim(torch.zeros(2, 5), torch.zeros(3, 5))
    scores = sim(torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8))  # small maps: the spatial metrics are skipped
    assert sorted(scores) == ["spearman_abs", "spearman_signed", "topk"]
    nan_maps = torch.randn(2, 1, 32, 32)
    nan_maps[1, 0, 0, 0] = float("inf")
    out = sim(nan_maps, torch.randn(2, 1, 32, 32))
    assert all(math.isnan(v[1].item()) and not math.isnan(v[0].item()) for v in out.values())


@pytest.mark.parametrize("shape", [(4, 1, 16, 16), (4, 3, 16, 16), (4, 40)])
@pytest.mark.parametrize("metrics", [("spearman_abs",), ("spearman_abs", "topk"), ("spearman_signed",), None])
@pytest.mark.parametrize("clip", [99.0, None])
def test_prepared_maps_are_the_normalized_maps_whatever_the_metrics(shape, metrics, clip):
    # prepare() takes shortcuts by the metrics requested (the signed scale from the magnitude sort, one finiteness
    # reduction); the normalized maps and the finite flags must not depend on them
    g = _gen(10)
    maps = torch.randn(shape, generator=g)
    maps[0] = 0.0  # a constant map
    maps.view(4, -1)[1, :5] = 0.0  # ties
    maps.view(4, -1)[2, 0] = math.nan  # a non-finite map
    maps.view(4, -1)[3, :2] = 3e38  # finite entries whose sum overflows
    sim = similarity.MapSimilarity(metrics=metrics, clip_percentile=clip)
    prepared = sim.prepare(maps)
    assert prepared.finite.tolist() == [True, True, False, True]
    clean = torch.nan_to_num(maps, nan=0.0)
    spatial = prepared.absolute.shape
    torch.testing.assert_close(prepared.absolute, similarity.normalize_absolute(clean, clip).view(spatial),
                               atol=0, rtol=0)
    torch.testing.assert_close(prepared.signed, similarity.normalize_signed(clean, clip).view(spatial), atol=0, rtol=0)
    overflowing = torch.full(shape, 3e38)  # every entry finite, their sum is not
    assert sim.prepare(overflowing).finite.tolist() == [True] * 4
