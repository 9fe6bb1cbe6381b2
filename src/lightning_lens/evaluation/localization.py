"""Localization of attributions against ground-truth masks, each score reported beside its chance level.

* Pointing game (Zhang et al. 2016/2018, "Top-down neural attention by excitation backprop"): a hit when the map's
  maximum lies inside the mask, or within ``tolerance`` pixels of it, as in TorchRay's benchmark (15 px there).
* Relevance mass accuracy (Arras et al. 2022, "CLEVR-XAI"): the share of the map's total relevance inside the mask.
* Relevance rank accuracy (Arras et al. 2022): of the ``K`` highest-ranked pixels, where ``K`` is the mask's size,
  the share that lie inside the mask.

The chance level of all three is the mask's area fraction (for the pointing game with tolerance, the area of the
mask grown by ``tolerance``): what a uniformly random point, a uniform map and a random ranking score in expectation.
Ties are split rather than broken by position, so a constant map scores exactly the chance level. Examples whose
mask is empty have no defined score: they are excluded from the mean and counted (``n_empty``), never scored as hits.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
import torch
import torch.nn.functional as F

from lightning_lens.evaluation._common import POOLINGS, binary_masks, feature_map
from lightning_lens.utils.checks import check_choice, check_finite

__all__ = [
    "LocalizationResult",
    "pointing_game",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
]

DEFAULT_POOLING = "sum_pos"


@dataclass(frozen=True)
class LocalizationResult:
    """Per-example localization scores with their chance levels.

    Attributes:
        metric: ``"pointing_game"``, ``"relevance_mass"`` or ``"relevance_rank"``.
        scores: ``(B,)`` per-example score in [0, 1]; NaN where the example is excluded.
        chance: ``(B,)`` per-example chance level (the mask's area fraction); NaN where excluded.
        valid: ``(B,)`` bool, the examples that were scored.
        n_empty: examples excluded because their mask is empty.
        n_zero_maps: examples excluded because the map has no relevance at all (relevance mass only: 0 / 0).
    """

    metric: str
    scores: torch.Tensor
    chance: torch.Tensor
    valid: torch.Tensor
    n_empty: int
    n_zero_maps: int = 0

    @property
    def n_valid(self) -> int:
        """How many examples were scored."""
        return int(self.valid.sum())

    @property
    def value(self) -> float:
        """Mean score over the scored examples (NaN when none was scored)."""
        return float(self.scores[self.valid].mean()) if self.n_valid else math.nan

    @property
    def chance_level(self) -> float:
        """Mean chance level over the same examples: compare :attr:`value` with it."""
        return float(self.chance[self.valid].mean()) if self.n_valid else math.nan

    @property
    def lift(self) -> float:
        """``value / chance_level``: 1 is chance, ``1 / chance_level`` is perfect."""
        chance = self.chance_level
        return self.value / chance if chance > 0 else math.nan

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def _prepare(
    attributions: torch.Tensor, masks: torch.Tensor, pooling: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    """Flat maps ``(B, N)`` (float64), flat bool masks ``(B, N)`` and the spatial feature shape."""
    check_choice(pooling, "pooling", POOLINGS)
    shape = attributions.shape if isinstance(attributions, torch.Tensor) else None
    # image maps (B, C, H, W) / (B, 1, H, W) / (B, H, W) pool to (B, H, W); anything else is per element
    inputs_shape = None
    if shape is not None and len(shape) == 4:
        inputs_shape = torch.Size((shape[0], shape[1], shape[2], shape[3]))
    values = feature_map(attributions, inputs_shape, pooling)
    check_finite(values, "attributions")
    m = binary_masks(masks, values.shape[1:], values.shape[0]).to(values.device)
    b = values.shape[0]
    return values.reshape(b, -1).double(), m.reshape(b, -1), values.shape[1:]


def _result(metric: str, scores: torch.Tensor, chance: torch.Tensor, valid: torch.Tensor, n_empty: int,
            n_zero: int = 0) -> LocalizationResult:
    nan = torch.tensor(math.nan, dtype=scores.dtype, device=scores.device)
    result = LocalizationResult(
        metric=metric,
        scores=torch.where(valid, scores, nan).float().cpu(),
        chance=torch.where(valid, chance, nan).float().cpu(),
        valid=valid.cpu(),
        n_empty=n_empty,
        n_zero_maps=n_zero,
    )
    if result.n_valid == 0:
        warnings.warn(
            f"{metric}: no example could be scored ({n_empty} empty masks, {n_zero} all-zero maps); the value is NaN",
            RuntimeWarning,
            stacklevel=3,
        )
    return result


def _dilate(masks: torch.Tensor, shape: torch.Size, tolerance: float) -> torch.Tensor:
    """Grow ``(B, N)`` masks of spatial ``shape`` by every pixel within Euclidean distance ``tolerance``."""
    r = int(math.floor(tolerance))
    if r == 0:
        return masks
    grid = torch.arange(-r, r + 1, device=masks.device, dtype=torch.float32)
    disk = ((grid.view(-1, 1) ** 2 + grid.view(1, -1) ** 2) <= float(tolerance) ** 2).float()
    m = masks.view(-1, 1, *shape).float()
    grown = F.conv2d(m, disk.view(1, 1, 2 * r + 1, 2 * r + 1), padding=r) > 0.5
    return grown.view(masks.shape)


def pointing_game(
    attributions: torch.Tensor,
    masks: torch.Tensor,
    *,
    tolerance: float = 0,
    pooling: str = DEFAULT_POOLING,
) -> LocalizationResult:
    """Pointing game: is the map's maximum inside the mask (or within ``tolerance`` pixels of it)?

    When the maximum is attained at several pixels, the score is the share of them that hit (the expected hit of a
    random choice among them), so a constant map scores the chance level instead of an arbitrary 0 or 1.

    Args:
        attributions: ``(B, C, H, W)``, ``(B, 1, H, W)`` or ``(B, H, W)`` maps (any ``(B, ...)`` without tolerance).
        masks: ``(B, H, W)`` or ``(B, 1, H, W)``; bool, or numeric with > 0.5 meaning inside.
        tolerance: a hit also counts when a mask pixel lies within this Euclidean distance in pixels of the maximum
            (TorchRay uses 15 for 224 x 224 images). The chance level then is the grown mask's area fraction.
        pooling: how channels pool into one pixel score (see :data:`POOLINGS`); default ``"sum_pos"``.

    Example:
        >>> maps = torch.zeros(2, 1, 4, 4); maps[0, 0, 1, 1] = 1.0; maps[1, 0, 3, 3] = 1.0
        >>> masks = torch.zeros(2, 1, 4, 4); masks[:, :, :2, :2] = 1
        >>> r = pointing_game(maps, masks)
        >>> r.scores.tolist(), r.chance_level
        ([1.0, 0.0], 0.25)
        >>> pointing_game(maps, masks, tolerance=3).scores.tolist()  # (3, 3) is 2.83 px from (1, 1)
        [1.0, 1.0]
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0:
        raise ValueError(f"tolerance must be a number of pixels >= 0, got {tolerance!r}")
    values, m, shape = _prepare(attributions, masks, pooling)
    if tolerance >= 1 and len(shape) != 2:
        raise ValueError(f"tolerance needs 2-D maps (B, [C,] H, W), got maps of shape {tuple(shape)}")
    n = values.shape[1]
    region = _dilate(m, shape, tolerance) if tolerance >= 1 else m
    valid = m.any(dim=1)
    is_max = values == values.max(dim=1, keepdim=True).values
    hits = (is_max & region).sum(1).double() / is_max.sum(1).double()
    chance = region.sum(1).double() / n
    return _result("pointing_game", hits, chance, valid, int((~valid).sum()))


def relevance_mass_accuracy(
    attributions: torch.Tensor,
    masks: torch.Tensor,
    *,
    pooling: str = DEFAULT_POOLING,
) -> LocalizationResult:
    """Relevance mass accuracy (Arras et al. 2022): relevance inside the mask / total relevance.

    The pooled map must be non-negative, so ``pooling`` is ``"sum_pos"`` (default, Arras et al.'s: positive evidence
    only), ``"abs_sum"`` or ``"l2_sq"``. Maps with no relevance at all (0 / 0) are excluded and counted in
    ``n_zero_maps``; empty masks in ``n_empty``.

    Example:
        >>> masks = torch.zeros(1, 1, 4, 4); masks[..., :2, :2] = 1
        >>> perfect, uniform = masks * 3.0, torch.ones(1, 1, 4, 4)
        >>> relevance_mass_accuracy(perfect, masks).value, relevance_mass_accuracy(uniform, masks).value
        (1.0, 0.25)
    """
    if pooling == "sum":
        raise ValueError(
            "pooling='sum' keeps negative values, for which a share of mass is undefined; use 'sum_pos' (positive"
            " evidence, Arras et al.), 'abs_sum' or 'l2_sq'"
        )
    values, m, _ = _prepare(attributions, masks, pooling)
    n = values.shape[1]
    total = values.sum(1)
    inside = (values * m).sum(1)
    has_mask = m.any(dim=1)
    has_mass = total > 0
    score = inside / total.clamp_min(torch.finfo(values.dtype).tiny)
    chance = m.sum(1).double() / n
    n_zero = int((has_mask & ~has_mass).sum())
    return _result("relevance_mass", score, chance, has_mask & has_mass, int((~has_mask).sum()), n_zero)


def relevance_rank_accuracy(
    attributions: torch.Tensor,
    masks: torch.Tensor,
    *,
    pooling: str = DEFAULT_POOLING,
) -> LocalizationResult:
    """Relevance rank accuracy (Arras et al. 2022): the share of the ``K`` top-ranked pixels inside the mask, where
    ``K`` is the mask's size.

    Pixels tied with the ``K``-th value share the remaining places in proportion (the expectation over random
    tie-breaking), so a constant map scores exactly the chance level ``K / N``.

    Example:
        >>> masks = torch.zeros(1, 1, 4, 4); masks[..., :2, :2] = 1
        >>> relevance_rank_accuracy(masks + 0.1, masks).value, relevance_rank_accuracy(torch.ones(1, 4, 4), masks).value
        (1.0, 0.25)
    """
    values, m, _ = _prepare(attributions, masks, pooling)
    n = values.shape[1]
    k = m.sum(1)
    valid = k > 0
    kth = values.sort(dim=1, descending=True).values.gather(1, (k - 1).clamp_min(0).view(-1, 1))
    above = values > kth
    tied = values == kth
    n_above = above.sum(1).double()
    need = k.double() - n_above  # places the tied pixels share
    tied_inside = (tied & m).sum(1).double() / tied.sum(1).double()
    hits = (above & m).sum(1).double() + need * tied_inside
    score = hits / k.double().clamp_min(1)
    chance = k.double() / n
    return _result("relevance_rank", score, chance, valid, int((~valid).sum()))
