"""Attribution maps to colour images: channel aggregation, percentile clipping, colormaps, overlays.

Rendering is for display only: raw attributions (for similarity metrics, sanity checks) are never normalized here.
"""

from __future__ import annotations

import functools

from collections.abc import Callable, Sequence
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.colors import Colormap

from lightning_lens.utils.checks import (
    check_choice,
    check_float,
    check_fraction,
    check_instance,
    check_optional,
    check_positive_number,
)

__all__ = [
    "DIVERGING_CMAP",
    "SEQUENTIAL_CMAP",
    "colorize",
    "heatmap",
    "normalize_attribution",
    "overlay",
    "reduce_channels",
    "to_rgb_uint8",
]

ArrayLike = Union[torch.Tensor, np.ndarray]
Denormalize = Union[Callable[[torch.Tensor], torch.Tensor], tuple[Sequence[float], Sequence[float]], None]

#: Default colormap of absolute maps (perceptually uniform, black at 0, pale yellow at the top).
SEQUENTIAL_CMAP = "inferno"
#: Default colormap of signed maps (blue negative, near-white 0, red positive; colour-blind safe).
DIVERGING_CMAP = "RdBu_r"

_REDUCTIONS = ("sum", "mean", "max_abs")
# An odd LUT size puts an entry exactly at the colormap's midpoint, so 0 maps to the true centre colour.
_SEQUENTIAL_LUT = 256
_DIVERGING_LUT = 257


def _as_numpy(x: ArrayLike, argument: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    elif not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{argument} must be a tensor or an array, got {type(x).__name__}") from err
    return np.asarray(x, dtype=np.float64)


def reduce_channels(attribution: ArrayLike, reduce: str = "sum") -> np.ndarray:
    """Aggregate a (C, H, W) map (or (1, C, H, W), or (H, W)) to (H, W) float64; non-finite values become 0.

    Args:
        attribution: the map.
        reduce: ``"sum"`` over channels (Captum's choice: keeps sign, colour contributions add),
            ``"mean"`` over channels, or ``"max_abs"``: per pixel the channel value of largest magnitude, sign kept.

    Example:
        >>> reduce_channels(torch.tensor([[[1.0]], [[-3.0]]]), "max_abs").tolist()
        [[-3.0]]
    """
    check_choice(reduce, "reduce", _REDUCTIONS)
    a = _as_numpy(attribution, "attribution")
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(
            f"attribution must be one map of shape (H, W), (C, H, W) or (1, C, H, W), got shape {a.shape}; "
            "render a batch one example at a time"
        )
    if a.shape[1] == 0 or a.shape[2] == 0 or a.shape[0] == 0:
        raise ValueError(f"attribution has an empty dimension: shape {a.shape}")
    a = np.where(np.isfinite(a), a, 0.0)  # NaN/inf render as zero: documented, no warnings
    if reduce == "sum":
        return a.sum(axis=0)
    if reduce == "mean":
        return a.mean(axis=0)
    idx = np.abs(a).argmax(axis=0)
    return np.take_along_axis(a, idx[None], axis=0)[0]


def normalize_attribution(
    attribution: ArrayLike,
    signed: Optional[bool] = None,
    clip_percentile: float = 99.0,
    reduce: str = "sum",
    vmax: Optional[float] = None,
) -> tuple[np.ndarray, bool]:
    """The (H, W) map scaled for display: ``[-1, 1]`` if signed, else ``[0, 1]``; returns ``(map, signed)``.

    The scale is the ``clip_percentile``-th percentile of ``|a|`` (PAIR saliency's rule; 100 means the maximum), or
    ``vmax`` if given (to put several maps on one scale). Values beyond it saturate. When the percentile is 0 but the
    map is not (a sparse map, under 1% non-zero), the maximum of ``|a|`` is used so the few non-zero pixels show. An
    all-zero (or all-NaN) map normalizes to zeros.

    Args:
        attribution: (H, W), (C, H, W) or (1, C, H, W) tensor or array.
        signed: keep the sign (diverging display) or take ``|a|`` (sequential display). None: signed iff the
            reduced map has a negative value.
        clip_percentile: percentile in (0, 100] of ``|a|`` that maps to full colour.
        reduce: channel aggregation, see :func:`reduce_channels`.
        vmax: explicit positive scale; overrides ``clip_percentile``.
    """
    check_float(clip_percentile, "clip_percentile", minimum=0.0, maximum=100.0, open_min=True)
    check_optional(check_positive_number, vmax, "vmax")
    a = reduce_channels(attribution, reduce)
    if signed is None:
        signed = bool((a < 0).any())
    if not signed:
        a = np.abs(a)
    magnitude = np.abs(a)
    if vmax is not None:
        scale = float(vmax)
    else:
        scale = float(np.percentile(magnitude, clip_percentile))
        if scale <= 0.0:
            scale = float(magnitude.max())
    if scale <= 0.0:
        return np.zeros_like(a), signed
    return np.clip(a / scale, -1.0 if signed else 0.0, 1.0), signed


def _lut(cmap: Union[str, Colormap], n: int) -> np.ndarray:
    check_instance(cmap, "cmap", (str, Colormap), hint="a matplotlib colormap name or object")
    if isinstance(cmap, str):
        return _named_lut(cmap, n)  # resampling a colormap costs more than colouring a small map: build it once
    return _resampled_lut(cmap, n)


@functools.lru_cache(maxsize=32)
def _named_lut(name: str, n: int) -> np.ndarray:
    try:
        cmap = colormaps[name]
    except KeyError as err:
        raise ValueError(f"cmap={name!r} is not a matplotlib colormap name") from err
    lut = _resampled_lut(cmap, n)
    lut.flags.writeable = False  # shared by every call
    return lut


def _resampled_lut(cmap: Colormap, n: int) -> np.ndarray:
    rgba = cmap.resampled(n)(np.arange(n))
    return np.round(np.asarray(rgba)[:, :3] * 255.0).astype(np.uint8)


def colorize(normalized: np.ndarray, signed: bool, cmap: Union[str, Colormap, None] = None) -> np.ndarray:
    """Map a normalized (H, W) map (``[-1, 1]`` if signed, else ``[0, 1]``) to uint8 (H, W, 3) colours.

    Signed maps use a 257-entry LUT of ``cmap`` (default :data:`DIVERGING_CMAP`): -1 -> first colour, 0 -> the exact
    midpoint colour, +1 -> last colour. Unsigned maps use a 256-entry LUT (default :data:`SEQUENTIAL_CMAP`).
    """
    if signed:
        lut = _lut(cmap if cmap is not None else DIVERGING_CMAP, _DIVERGING_LUT)
        index = np.round((np.clip(normalized, -1.0, 1.0) + 1.0) * 0.5 * (_DIVERGING_LUT - 1))
    else:
        lut = _lut(cmap if cmap is not None else SEQUENTIAL_CMAP, _SEQUENTIAL_LUT)
        index = np.round(np.clip(normalized, 0.0, 1.0) * (_SEQUENTIAL_LUT - 1))
    return lut[index.astype(np.int64)]


def heatmap(
    attribution: ArrayLike,
    signed: Optional[bool] = None,
    clip_percentile: float = 99.0,
    reduce: str = "sum",
    cmap: Union[str, Colormap, None] = None,
    vmax: Optional[float] = None,
) -> np.ndarray:
    """Render one attribution map as a uint8 (H, W, 3) colour image.

    Signed maps go on a diverging colormap centred at 0 (default ``RdBu_r``: blue negative, red positive); absolute
    maps (``signed=False``, which renders ``|a|``) on a sequential one (default ``inferno``). Channels are aggregated
    by ``reduce`` *before* the sign is dropped, and the scale is the ``clip_percentile``-th percentile of ``|a|``
    (see :func:`normalize_attribution`). NaN and infinite values are drawn as 0; all-zero maps render as the zero
    colour. No warnings.

    Args:
        attribution: (H, W), (C, H, W) or (1, C, H, W) tensor or array.
        signed: diverging (True) or sequential on ``|a|`` (False); None: diverging iff the map has negative values.
        clip_percentile: percentile of ``|a|`` in (0, 100] that reaches full colour.
        reduce: ``"sum"``, ``"mean"`` or ``"max_abs"`` over channels.
        cmap: a matplotlib colormap (name or object) to use instead of the default.
        vmax: explicit scale instead of the percentile (to compare maps).

    Example:
        >>> img = heatmap(torch.randn(3, 32, 32))
        >>> img.shape, img.dtype
        ((32, 32, 3), dtype('uint8'))
    """
    normalized, is_signed = normalize_attribution(attribution, signed, clip_percentile, reduce, vmax)
    return colorize(normalized, is_signed, cmap)


def _denormalize(image: torch.Tensor, denormalize: Denormalize) -> torch.Tensor:
    if denormalize is None:
        return image
    if callable(denormalize):
        out = denormalize(image)
        if not isinstance(out, torch.Tensor) or out.shape != image.shape:
            raise ValueError(
                "denormalize must return a tensor of the image's shape "
                f"{tuple(image.shape)}, got {getattr(out, 'shape', type(out).__name__)}"
            )
        return out
    if isinstance(denormalize, (tuple, list)) and len(denormalize) == 2:
        mean = torch.as_tensor(denormalize[0], dtype=image.dtype).reshape(-1, 1, 1)
        std = torch.as_tensor(denormalize[1], dtype=image.dtype).reshape(-1, 1, 1)
        channels = image.shape[0]
        if mean.shape[0] not in (1, channels) or std.shape[0] not in (1, channels):
            needs = "1 value" if channels == 1 else f"1 or {channels} values"
            raise ValueError(
                f"denormalize=(mean, std) needs {needs} each for a {channels}-channel image, got "
                f"{mean.shape[0]} and {std.shape[0]}; pass the mean and std used to normalize these inputs"
            )
        return image * std + mean
    raise TypeError("denormalize must be a callable, a (mean, std) pair or None")


def to_rgb_uint8(image: ArrayLike, denormalize: Denormalize = None, scale: str = "auto") -> np.ndarray:
    """A displayable uint8 (H, W, 3) image from a float (C, H, W) tensor (C = 1 or 3; 4 drops alpha) or (H, W).

    Args:
        image: float tensor/array in channel-first layout, or a uint8 (H, W, 3) array (returned as is).
        denormalize: a callable undoing the input normalization, or a ``(mean, std)`` pair (per channel).
        scale: ``"clip"`` clips to [0, 1]; ``"minmax"`` rescales min..max to 0..1; ``"auto"`` clips when the
            values lie in [0, 1] (up to 1e-3) and min-max rescales otherwise (e.g. a still-normalized image), so
            negative pixels are not silently flattened.

    Example:
        >>> to_rgb_uint8(torch.ones(1, 2, 2)).tolist()[0][0]
        [255, 255, 255]
    """
    check_choice(scale, "scale", ("auto", "clip", "minmax"))
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        if image.ndim == 3 and image.shape[-1] == 3:
            return np.ascontiguousarray(image)
        if image.ndim == 2:
            return np.repeat(image[..., None], 3, axis=-1)
        raise ValueError(f"a uint8 image must be (H, W) or (H, W, 3), got shape {image.shape}")
    t = image.detach().to("cpu", torch.float32) if isinstance(image, torch.Tensor) else torch.as_tensor(
        np.asarray(image, dtype=np.float32)
    )
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3 or t.shape[0] not in (1, 3, 4):
        raise ValueError(f"image must be (C, H, W) with C in 1/3/4 or (H, W), got shape {tuple(t.shape)}")
    t = t[:3]
    t = _denormalize(t, denormalize)
    a = t.numpy().astype(np.float64)
    a = np.where(np.isfinite(a), a, 0.0)
    lo, hi = float(a.min()), float(a.max())
    if scale == "minmax" or (scale == "auto" and (lo < -1e-3 or hi > 1.0 + 1e-3)):
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    a = np.clip(a, 0.0, 1.0)
    if a.shape[0] == 1:
        a = np.repeat(a, 3, axis=0)
    return np.round(a.transpose(1, 2, 0) * 255.0).astype(np.uint8)


def overlay(
    image: ArrayLike,
    attribution: ArrayLike,
    alpha: float = 0.5,
    denormalize: Denormalize = None,
    scale_alpha: bool = True,
    **heatmap_kwargs: object,
) -> np.ndarray:
    """The heatmap of ``attribution`` blended over ``image``: uint8 (H, W, 3).

    A map smaller than the image (e.g. Grad-CAM at layer resolution) is resized bilinearly first. With
    ``scale_alpha=True`` (default) each pixel's opacity is ``alpha * |normalized attribution|``, so zero attribution
    leaves the image untouched and only relevant regions are tinted; ``scale_alpha=False`` blends uniformly
    (``(1 - alpha) * image + alpha * heatmap``, as pytorch-grad-cam does).

    Args:
        image: (C, H, W) float tensor (see :func:`to_rgb_uint8`).
        attribution: map for this image, (H', W'), (C', H', W') or (1, C', H', W').
        alpha: maximum heatmap opacity in [0, 1].
        denormalize: passed to :func:`to_rgb_uint8`.
        scale_alpha: opacity proportional to the attribution's magnitude.
        heatmap_kwargs: ``signed``, ``clip_percentile``, ``reduce``, ``cmap``, ``vmax`` of :func:`heatmap`.

    Example:
        >>> overlay(torch.rand(1, 32, 32), torch.randn(1, 8, 8)).shape
        (32, 32, 3)
    """
    check_fraction(alpha, "alpha", allow_zero=True)
    unknown = set(heatmap_kwargs) - {"signed", "clip_percentile", "reduce", "cmap", "vmax"}
    if unknown:
        raise TypeError(f"overlay got unexpected keyword arguments {sorted(unknown)}")
    rgb = to_rgb_uint8(image, denormalize).astype(np.float64)
    h, w = rgb.shape[:2]
    attr = torch.as_tensor(_as_numpy(attribution, "attribution"))
    if attr.dim() == 4 and attr.shape[0] == 1:
        attr = attr[0]
    if attr.dim() == 2:
        attr = attr[None]
    if attr.dim() != 3:
        raise ValueError(f"attribution must be (H, W), (C, H, W) or (1, C, H, W), got shape {tuple(attr.shape)}")
    if tuple(attr.shape[1:]) != (h, w):
        attr = torch.nan_to_num(attr, nan=0.0, posinf=0.0, neginf=0.0)
        attr = F.interpolate(attr[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    normalized, signed = normalize_attribution(
        attr,
        heatmap_kwargs.get("signed"),  # type: ignore[arg-type]
        heatmap_kwargs.get("clip_percentile", 99.0),  # type: ignore[arg-type]
        heatmap_kwargs.get("reduce", "sum"),  # type: ignore[arg-type]
        heatmap_kwargs.get("vmax"),  # type: ignore[arg-type]
    )
    heat = colorize(normalized, signed, heatmap_kwargs.get("cmap")).astype(np.float64)  # type: ignore[arg-type]
    weight = alpha * (np.abs(normalized) if scale_alpha else np.ones_like(normalized))
    out = rgb * (1.0 - weight[..., None]) + heat * weight[..., None]
    return np.round(out).clip(0, 255).astype(np.uint8)
