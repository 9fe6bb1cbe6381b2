"""Scalar summaries of saliency maps, as :class:`~lightning_lens.callbacks.SaliencyMapCallback` logs them per method.

* ``mean_abs``: the mean absolute attribution over maps and elements: the maps' overall scale (it moves with the
  logits' scale as training sharpens the model).
* ``top10_mass``: the share of a map's total absolute attribution (summed over channels) held by its 10 % highest
  pixels, averaged over maps: 0.1 for a flat map, 1.0 when everything sits in a tenth of the image; a measure of how
  concentrated the explanation is. Maps that are zero everywhere carry no mass and are left out of the mean.

Non-finite values count as 0 (the callback reports them separately).
"""

from __future__ import annotations

import math

import torch

from lightning_lens.utils.checks import check_fraction, check_tensor

__all__ = ["saliency_summaries", "top_mass"]


def top_mass(maps: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """Per map, the share of its ``|attribution|`` (summed over channels) held by its top ``fraction`` of pixels.

    Args:
        maps: ``(B, C, H, W)`` (or ``(B, C, ...)``) attributions.
        fraction: the share of pixels counted, rounded up to at least one pixel.

    Returns:
        ``(B,)`` float64 shares in ``[fraction, 1]``; NaN for a map that is zero everywhere.

    Example:
        >>> maps = torch.zeros(2, 1, 2, 5)
        >>> maps[0, 0, 0, 0] = 3.0   # all mass in one of 10 pixels
        >>> maps[1] = 1.0            # flat
        >>> top_mass(maps).tolist()
        [1.0, 0.1]
    """
    check_tensor(maps, "maps", min_dim=2)
    fraction = check_fraction(fraction, "fraction")
    a = torch.nan_to_num(maps.detach().to(torch.float64).abs(), nan=0.0, posinf=0.0, neginf=0.0)
    per_pixel = a.sum(dim=1).flatten(1) if a.dim() > 2 else a  # (B, pixels)
    k = max(1, math.ceil(fraction * per_pixel.shape[1] - 1e-9))
    total = per_pixel.sum(dim=1)
    top = per_pixel.topk(k, dim=1).values.sum(dim=1)
    return torch.where(total > 0, top / total.clamp_min(torch.finfo(torch.float64).tiny), torch.nan)


def saliency_summaries(maps: torch.Tensor) -> dict[str, float]:
    """``{"mean_abs": ..., "top10_mass": ...}`` of a batch of maps (see the module docstring).

    ``top10_mass`` is NaN when every map is zero everywhere.

    Example:
        >>> maps = torch.zeros(2, 1, 2, 5)
        >>> maps[0, 0, 0, 0] = 4.0
        >>> maps[1] = 1.0
        >>> saliency_summaries(maps)
        {'mean_abs': 0.7, 'top10_mass': 0.55}
    """
    check_tensor(maps, "maps", min_dim=2)
    a = torch.nan_to_num(maps.detach().to(torch.float64).abs(), nan=0.0, posinf=0.0, neginf=0.0)
    shares = top_mass(maps, 0.1)
    carrying = ~torch.isnan(shares)
    top10 = float(shares[carrying].mean()) if bool(carrying.any()) else float("nan")
    return {"mean_abs": float(a.mean()), "top10_mass": top10}
