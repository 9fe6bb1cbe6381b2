"""Heatmaps and overlays: exact colours at known points, clipping, channel reduction, NaN/zero maps, images."""

import warnings

import numpy as np
import pytest
import torch
from matplotlib import colormaps

from lightning_lens.render import (
    colorize,
    heatmap,
    normalize_attribution,
    overlay,
    reduce_channels,
    to_rgb_uint8,
)


def _rgb(cmap, n, i):
    return np.round(np.asarray(colormaps[cmap].resampled(n)(i))[:3] * 255).astype(np.uint8)


CENTRE = _rgb("RdBu_r", 257, 128)  # exact midpoint of the diverging map
NEG, POS = _rgb("RdBu_r", 257, 0), _rgb("RdBu_r", 257, 256)
SEQ_LOW, SEQ_TOP = _rgb("inferno", 256, 0), _rgb("inferno", 256, 255)


def test_reference_colours_are_what_the_docs_say():
    assert CENTRE.tolist() == [247, 247, 247]  # RdBu_r's neutral centre
    assert POS.tolist() == [103, 0, 31] and NEG.tolist() == [5, 48, 97]  # dark red top, dark blue bottom
    assert SEQ_LOW.tolist() == [0, 0, 4] and SEQ_TOP.tolist() == [252, 255, 164]


def test_signed_map_zero_is_centre_extremes_are_ends():
    a = torch.zeros(1, 4, 4)
    a[0, 0, 0], a[0, 0, 1] = 2.0, -2.0
    img = heatmap(a, signed=True, clip_percentile=100)
    assert img.dtype == np.uint8 and img.shape == (4, 4, 3)
    assert img[0, 0].tolist() == POS.tolist()
    assert img[0, 1].tolist() == NEG.tolist()
    assert (img[1:] == CENTRE).all()
    half = heatmap(torch.tensor([[1.0, 2.0, 0.0]]), signed=True, clip_percentile=100)
    assert half[0, 0].tolist() == _rgb("RdBu_r", 257, 192).tolist()  # 0.5 -> three quarters of the LUT


def test_absolute_map_uses_magnitude_on_sequential_map():
    a = torch.tensor([[0.0, -3.0, 3.0, 1.5]])
    img = heatmap(a, signed=False, clip_percentile=100)
    assert img[0, 0].tolist() == SEQ_LOW.tolist()
    assert img[0, 1].tolist() == img[0, 2].tolist() == SEQ_TOP.tolist()
    assert img[0, 3].tolist() == _rgb("inferno", 256, 128).tolist()  # round(0.5 * 255) = 128


def test_auto_sign_detection():
    assert normalize_attribution(torch.tensor([[1.0, 2.0]]))[1] is False
    assert normalize_attribution(torch.tensor([[1.0, -2.0]]))[1] is True
    assert heatmap(torch.tensor([[0.0, 1.0]]))[0, 0].tolist() == SEQ_LOW.tolist()


def test_percentile_clipping():
    a = np.arange(1.0, 1001.0).reshape(20, 50)
    a.flat[-5:] = 1e6  # a few outliers must not wash out the rest
    norm, signed = normalize_attribution(a, clip_percentile=99.0)
    p99 = np.percentile(np.abs(a), 99.0)
    assert not signed and np.isclose(p99, 990.01)
    assert np.allclose(norm, np.clip(a / p99, 0, 1))
    assert np.isclose(norm.flat[499], 500 / 990.01)  # the median pixel stays mid-scale
    assert (norm == 1.0).sum() == 10  # 991..995 and the outliers saturate
    full, _ = normalize_attribution(a, clip_percentile=100.0)
    assert np.isclose(full.flat[499], 500 / 1e6)
    shared, _ = normalize_attribution(a, vmax=50.0)
    assert np.isclose(shared.flat[0], 1 / 50) and shared.flat[60] == 1.0
    signed_map = np.concatenate([-a, a])
    norm_signed, _ = normalize_attribution(signed_map, signed=True)
    assert norm_signed.min() == -1.0 and norm_signed.max() == 1.0
    assert np.isclose(norm_signed.flat[0], -1 / np.percentile(np.abs(signed_map), 99.0))


def test_sparse_map_falls_back_to_the_maximum():
    a = torch.zeros(32, 32)
    a[3, 4] = 0.7  # 1 of 1024 pixels: the 99th percentile is 0
    img = heatmap(a)
    assert img[3, 4].tolist() == SEQ_TOP.tolist()
    assert (img.reshape(-1, 3) == SEQ_LOW).all(axis=1).sum() == 1023


def test_zero_nan_and_inf_maps_render_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zero = heatmap(torch.zeros(3, 8, 8))
        signed_zero = heatmap(torch.zeros(3, 8, 8), signed=True)
        nan = heatmap(torch.full((3, 8, 8), float("nan")))
        mixed = torch.ones(8, 8)
        mixed[0, 0], mixed[0, 1], mixed[0, 2] = float("nan"), float("inf"), -float("inf")
        mixed_img = heatmap(mixed, signed=True, clip_percentile=100)
        over = overlay(torch.rand(3, 8, 8), torch.full((8, 8), float("nan")))
    assert (zero == SEQ_LOW).all() and (nan == SEQ_LOW).all()
    assert (signed_zero == CENTRE).all()
    assert mixed_img[0, :3].tolist() == [CENTRE.tolist()] * 3  # non-finite values are drawn as zero
    assert (mixed_img[1:] == POS).all()
    assert over.dtype == np.uint8


def test_channel_reductions():
    a = torch.tensor([[[1.0, 2.0]], [[-3.0, 1.0]], [[0.5, -4.0]]])  # (3, 1, 2)
    assert reduce_channels(a, "sum").tolist() == [[-1.5, -1.0]]
    assert np.allclose(reduce_channels(a, "mean"), [[-0.5, -1 / 3]])
    assert reduce_channels(a, "max_abs").tolist() == [[-3.0, -4.0]]
    # the sign is dropped after the channel sum: opposite channels cancel
    assert heatmap(torch.tensor([[[1.0]], [[-1.0]]]), signed=False)[0, 0].tolist() == SEQ_LOW.tolist()
    assert reduce_channels(torch.ones(1, 2, 5, 6)).shape == (5, 6)  # a batch of one is accepted


def test_bad_input_errors_name_the_argument():
    with pytest.raises(ValueError, match="one map"):
        heatmap(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="reduce"):
        heatmap(torch.zeros(3, 4, 4), reduce="median")
    with pytest.raises(ValueError, match="clip_percentile"):
        heatmap(torch.zeros(4, 4), clip_percentile=0)
    with pytest.raises(ValueError, match="cmap"):
        heatmap(torch.zeros(4, 4), cmap="not-a-map")
    with pytest.raises(ValueError, match="vmax"):
        heatmap(torch.zeros(4, 4), vmax=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        overlay(torch.zeros(1, 4, 4), torch.zeros(4, 4), alpha=2)


def test_custom_colormap_and_requires_grad_tensor():
    a = torch.tensor([[-1.0, 0.0, 1.0]], requires_grad=True)
    img = heatmap(a, cmap="bwr")
    assert img[0].tolist() == [[0, 0, 255], [255, 255, 255], [255, 0, 0]]  # bwr's midpoint is pure white
    assert colorize(np.array([[0.0]]), signed=False, cmap="gray")[0, 0].tolist() == [0, 0, 0]


def test_to_rgb_uint8():
    gray = torch.tensor([[[0.0, 0.5], [1.0, 0.25]]])
    rgb = to_rgb_uint8(gray)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[:, :, 0].tolist() == [[0, 128], [255, 64]] and (rgb[..., 0] == rgb[..., 2]).all()
    normalized = (torch.rand(3, 4, 4) - 0.5) / 0.25
    undone = to_rgb_uint8(normalized, denormalize=([0.5] * 3, [0.25] * 3))
    expected = np.round(np.clip(normalized * 0.25 + 0.5, 0, 1).permute(1, 2, 0).numpy() * 255)
    assert np.abs(undone.astype(int) - expected).max() <= 1
    assert np.array_equal(to_rgb_uint8(normalized, denormalize=lambda t: t * 0.25 + 0.5), undone)
    # a still-normalized image (outside [0, 1]) is min-max scaled instead of clipped flat
    auto = to_rgb_uint8(torch.tensor([[[-2.0, 0.0, 2.0]]]))
    assert auto[0, :, 0].tolist() == [0, 128, 255]
    assert to_rgb_uint8(torch.tensor([[[-2.0, 0.0, 2.0]]]), scale="clip")[0, :, 0].tolist() == [0, 0, 255]
    arr = np.zeros((3, 3, 3), np.uint8)
    assert to_rgb_uint8(arr) is arr or np.array_equal(to_rgb_uint8(arr), arr)
    with pytest.raises(ValueError, match="image must be"):
        to_rgb_uint8(torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="denormalize"):
        to_rgb_uint8(torch.zeros(3, 4, 4), denormalize=lambda t: t[0])


def test_denormalize_count_message_reads_right_for_one_channel():
    # issue 11: a grey image with RGB statistics was told it "needs 1 or 1 values"
    with pytest.raises(ValueError, match=r"needs 1 value each for a 1-channel image, got 3 and 3"):
        to_rgb_uint8(torch.zeros(1, 4, 4), denormalize=([0.5, 0.5, 0.5], [0.2, 0.2, 0.2]))
    with pytest.raises(ValueError, match=r"needs 1 or 3 values each for a 3-channel image, got 2 and 1"):
        to_rgb_uint8(torch.zeros(3, 4, 4), denormalize=([0.5, 0.5], [0.2]))


def test_wrong_types_raise_type_errors_naming_the_argument():
    with pytest.raises(TypeError, match="clip_percentile must be a number, got str"):
        heatmap(torch.zeros(4, 4), clip_percentile="99")
    with pytest.raises(TypeError, match="vmax must be a number"):
        heatmap(torch.zeros(4, 4), vmax="1")
    with pytest.raises(TypeError, match="cmap must be a str or Colormap"):
        heatmap(torch.zeros(4, 4), cmap=3)
    with pytest.raises(TypeError, match="alpha must be a number"):
        overlay(torch.zeros(1, 4, 4), torch.zeros(4, 4), alpha="half")
    with pytest.raises(ValueError, match="scale must be one of"):
        to_rgb_uint8(torch.zeros(1, 4, 4), scale="log")


def test_overlay():
    image = torch.rand(3, 16, 16)
    base = to_rgb_uint8(image)
    # zero attribution leaves the image untouched; alpha 0 too
    assert np.array_equal(overlay(image, torch.zeros(16, 16)), base)
    assert np.array_equal(overlay(image, torch.randn(16, 16), alpha=0.0), base)
    attr = torch.zeros(16, 16)
    attr[2, 3] = 5.0
    out = overlay(image, attr, alpha=1.0)
    assert out[2, 3].tolist() == SEQ_TOP.tolist()  # full opacity where the map is maximal
    assert np.array_equal(np.delete(out.reshape(-1, 3), 2 * 16 + 3, 0), np.delete(base.reshape(-1, 3), 2 * 16 + 3, 0))
    uniform = overlay(image, torch.zeros(16, 16), alpha=0.5, scale_alpha=False)
    assert np.abs(uniform.astype(int) - np.round(0.5 * base + 0.5 * SEQ_LOW)).max() <= 1
    # a map at layer resolution is resized to the image
    small = torch.zeros(1, 1, 4, 4)
    small[..., 0, 0] = 1.0
    resized = overlay(image, small, alpha=1.0)
    assert resized.shape == (16, 16, 3)
    assert resized[0, 0].tolist() == SEQ_TOP.tolist() and np.array_equal(resized[15, 15], base[15, 15])
    signed = overlay(torch.zeros(1, 4, 4), torch.tensor([[-1.0, 0, 0, 1.0]] * 4), alpha=1.0)
    assert signed[0, 0].tolist() == NEG.tolist() and signed[0, 3].tolist() == POS.tolist()
    with pytest.raises(TypeError, match="unexpected"):
        overlay(image, attr, colormap="jet")
