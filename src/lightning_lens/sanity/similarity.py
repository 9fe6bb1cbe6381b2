"""Similarity of attribution maps, batched in torch: one score per example.

Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018, compare the maps of a model with the maps of its
randomized copies with four metrics; this module implements them (plus a top-k intersection) for whole batches at
once, on the device of the maps.

**Normalization** (what :class:`MapSimilarity` does before comparing, following the paper's notebooks):

* *Channel aggregation*: maps of shape ``(B, C, *spatial)`` with ``C`` channels and at least two spatial dimensions
  are summed over ``dim=1``: ``sum_c |a_c|`` for the absolute map, ``sum_c a_c`` for the signed map. ``(B, H, W)``
  maps are taken as single-channel images and ``(B, D)`` maps as flat feature vectors (only the rank metrics and
  top-k apply to those).
* *Absolute map* (PAIR's ``VisualizeImageGrayscale``): clipped at its own ``clip_percentile``-th percentile (99 by
  default, linear interpolation as ``numpy.percentile``), then min-max scaled to ``[0, 1]``.
* *Signed map*: divided by the ``clip_percentile``-th percentile of its absolute values and clipped to ``[-1, 1]``
  (PAIR's ``VisualizeImageDiverging`` takes the percentile of the signed values, which for a mostly negative map
  clips nearly everything; the percentile of ``|a|`` keeps the scale symmetric).
* A map whose normalizer is zero (a constant map) becomes all zeros; rank correlations with it are ``nan``.

**Metrics** (each ``(B,)``, higher means more similar):

=====================  ===============================================================================================
``spearman_abs``       Spearman rank correlation of the normalized absolute maps (ties get average ranks, as
                       ``scipy.stats.spearmanr``; clipping ties the top 1 %)
``spearman_signed``    Spearman rank correlation of the normalized signed maps
``ssim``               structural similarity of the normalized absolute maps: Gaussian window (sigma 1.5, truncated
                       at 3.5 sigma: 11x11), ``K1 = 0.01``, ``K2 = 0.03``, data range 1, population covariances, mean
                       over the window positions that fit inside the map; equals scikit-image's
                       ``structural_similarity(a, b, data_range=1, gaussian_weights=True,
                       use_sample_covariance=False)``. Needs maps of at least 11x11.
``hog``                Pearson correlation of the HOG features of the normalized absolute maps. The features equal
                       scikit-image's ``hog(map, orientations=9, pixels_per_cell=(8, 8), cells_per_block=(3, 3),
                       block_norm="L2-Hys")`` (hard orientation binning, no smoothing). Adebayo et al.'s notebook
                       compares HOG vectors with Spearman; pass ``hog_correlation="spearman"`` for that.
``topk``               share of the ``top_k`` (default 10 %) highest-``|a|`` positions of one aggregated map that are
                       also among the top of the other; computed before clipping, which would tie the top 1 %;
                       ``nan`` for a constant map
=====================  ===============================================================================================

Rows with non-finite values get ``nan`` for every metric.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

__all__ = [
    "ALL_METRICS",
    "MapSimilarity",
    "PreparedMaps",
    "aggregate_channels",
    "hog_features",
    "normalize_absolute",
    "normalize_signed",
    "pearson",
    "spearman",
    "ssim",
    "topk_intersection",
]

#: every metric :class:`MapSimilarity` knows, in display order.
ALL_METRICS = ("spearman_abs", "spearman_signed", "ssim", "hog", "topk")


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    # float64 keeps ranks and sums of squares exact for large maps; MPS has no float64
    return torch.float32 if t.device.type == "mps" else torch.float64


def aggregate_channels(maps: torch.Tensor, signed: bool) -> torch.Tensor:
    """Sum ``(B, C, *spatial)`` maps over channels (``|a|`` first unless ``signed``); ``(B, H, W)``/``(B, D)`` as is.

    Example:
        >>> aggregate_channels(torch.tensor([[[[1.0]], [[-3.0]]]]), signed=False).tolist()
        [[[4.0]]]
    """
    if maps.dim() < 2:
        raise ValueError(f"maps must have a leading batch dimension, got shape {tuple(maps.shape)}")
    if maps.dim() >= 4:
        return maps.sum(dim=1) if signed else maps.abs().sum(dim=1)
    return maps if signed else maps.abs()


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).to(_work_dtype(x))


def _sort_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.sort(dim=1)`` (values, indices). On CPU numpy's introsort is used: torch's CPU sort of rows of a few
    thousand elements is several times slower, and the sort dominates the cost of the rank metrics."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        import numpy as np

        order = torch.from_numpy(np.argsort(x.detach().contiguous().numpy(), axis=1))
        return x.gather(1, order), order  # torch's gather is several times faster than np.take_along_axis
    return x.sort(dim=1)


def _sort_signed_by_magnitude(signed: torch.Tensor, magnitude_order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``signed.sort(dim=1)`` (values, indices) from the ascending order of ``|signed|``, without a second sort.

    In that order the negative entries come with descending values and the others with ascending values, so the
    sorted row is the negatives reversed followed by the others: a stable partition (one cumulative count and two
    scatters instead of an ``O(n log n)`` sort).
    """
    n = signed.shape[1]
    by_magnitude = signed.gather(1, magnitude_order)
    negative = by_magnitude < 0
    negatives_so_far = negative.cumsum(dim=1)
    num_negative = negatives_so_far[:, -1:]
    position = torch.arange(n, device=signed.device)
    # the j-th negative (1-based) goes to num_negative - j; the entry at position p with j negatives before it
    # goes to num_negative + p - j (the others keep their order after all the negatives)
    destination = (~negative * position).add_(num_negative).sub_(negatives_so_far)
    values = torch.empty_like(by_magnitude).scatter_(1, destination, by_magnitude)
    return values, torch.empty_like(magnitude_order).scatter_(1, destination, magnitude_order)


def _percentile_position(n: int, q: float) -> tuple[int, int, float]:
    pos = (q / 100.0) * (n - 1)
    return math.floor(pos), math.ceil(pos), pos - math.floor(pos)


def _percentile(flat: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row ``q``-th percentile, linear interpolation (``numpy.percentile``'s default), shape ``(B, 1)``.

    Two selections (``kthvalue``) instead of a sort; ``torch.quantile`` would sort and refuses inputs above 2**24.
    """
    lo, hi, frac = _percentile_position(flat.shape[1], q)
    v_lo = flat.kthvalue(lo + 1, dim=1, keepdim=True).values
    if hi == lo:
        return v_lo
    return v_lo + (flat.kthvalue(hi + 1, dim=1, keepdim=True).values - v_lo) * frac


def _percentile_of_sorted(values: torch.Tensor, q: float) -> torch.Tensor:
    lo, hi, frac = _percentile_position(values.shape[1], q)
    return (values[:, lo] + (values[:, hi] - values[:, lo]) * frac).unsqueeze(1)


def _abs_percentile_of_sorted(values: torch.Tensor, q: float) -> torch.Tensor:
    """Percentile of ``|x|`` per row from the row-sorted ``x``: the largest magnitudes sit at the two ends."""
    n = values.shape[1]
    lo, _, _ = _percentile_position(n, q)
    tail = n - lo  # the order statistics needed are among the ``tail`` largest magnitudes
    if 2 * tail >= n:
        return _percentile_of_sorted(values.abs().sort(dim=1).values, q)
    ends = torch.cat([-values[:, :tail], values[:, n - tail:]], dim=1).sort(dim=1).values  # 2 * tail magnitudes
    # in ascending |x| order the candidates occupy ranks n - 2 * tail ... n - 1 (the rest are smaller)
    return _percentile_of_sorted(torch.cat([ends.new_zeros(ends.shape[0], n - 2 * tail), ends], dim=1), q)


def _scale(x: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``x / den`` per row; a zero ``den`` (the percentile equals the minimum) sends every ``x > 0`` to +inf, which
    the callers clip to 1: a map that is constant on 99 % of its pixels keeps its few outliers, a constant map is 0."""
    return x / den.clamp_min(torch.finfo(den.dtype).tiny)


def _absolute_scaler(magnitude: torch.Tensor, clip_percentile: Optional[float],
                     sorted_magnitude: Optional[torch.Tensor] = None):
    """The monotone map ``|a| -> clip((|a| - min) / (p - min), 0, 1)`` of each row (``p``: the percentile)."""
    if sorted_magnitude is not None:
        vmin = sorted_magnitude[:, :1]
        vmax = sorted_magnitude[:, -1:] if clip_percentile is None else _percentile_of_sorted(sorted_magnitude,
                                                                                              clip_percentile)
    else:
        vmin = magnitude.amin(dim=1, keepdim=True)
        vmax = magnitude.amax(dim=1, keepdim=True) if clip_percentile is None else _percentile(magnitude,
                                                                                                clip_percentile)
    return lambda t: _scale(t - vmin, vmax - vmin).clamp_(0, 1)


def _signed_scaler(signed: torch.Tensor, clip_percentile: Optional[float],
                   sorted_signed: Optional[torch.Tensor] = None):
    if clip_percentile is None:
        span = signed.abs().amax(dim=1, keepdim=True)
    elif sorted_signed is not None:
        span = _abs_percentile_of_sorted(sorted_signed, clip_percentile)
    else:
        span = _percentile(signed.abs(), clip_percentile)
    return lambda t: _scale(t, span).clamp_(-1, 1)


def normalize_absolute(maps: torch.Tensor, clip_percentile: Optional[float] = 99.0) -> torch.Tensor:
    """Channel-aggregated ``|a|``, clipped at its ``clip_percentile``-th percentile and min-max scaled to ``[0, 1]``.

    Args:
        maps: ``(B, C, *spatial)``, ``(B, H, W)`` or ``(B, D)`` attributions.
        clip_percentile: percentile in ``(0, 100]`` to clip at, or ``None`` for plain min-max scaling.

    Example:
        >>> normalize_absolute(torch.tensor([[1.0, -2.0, 3.0, 5.0]]), clip_percentile=None).tolist()
        [[0.0, 0.25, 0.5, 1.0]]
    """
    agg = aggregate_channels(maps, signed=False)
    flat = _rows(agg)
    return _absolute_scaler(flat, clip_percentile)(flat).view(agg.shape)


def normalize_signed(maps: torch.Tensor, clip_percentile: Optional[float] = 99.0) -> torch.Tensor:
    """Channel-summed ``a`` divided by the ``clip_percentile``-th percentile of ``|a|`` and clipped to ``[-1, 1]``.

    Example:
        >>> normalize_signed(torch.tensor([[1.0, -2.0, 4.0]]), clip_percentile=None).tolist()
        [[0.25, -0.5, 1.0]]
    """
    agg = aggregate_channels(maps, signed=True)
    flat = _rows(agg)
    return _signed_scaler(flat, clip_percentile)(flat).view(agg.shape)


# ----------------------------------------------------------------------------------------------------- correlations
def _standardize(x: torch.Tensor) -> torch.Tensor:
    """Rows centered and scaled to unit norm (so a Pearson correlation is a dot product); ``nan`` rows if constant
    (0 / 0)."""
    xc = x - x.mean(dim=1, keepdim=True)
    return xc.div_(xc.square().sum(dim=1, keepdim=True).sqrt())


def _correlate(za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
    return (za * zb).sum(dim=-1).clamp(-1, 1)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row Pearson correlation of two ``(B, ...)`` tensors (flattened per row); ``nan`` for a constant row.

    Example:
        >>> pearson(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[2.0, 4.0, 7.0]])).round(decimals=4).tolist()
        [0.9934]
    """
    x, y = _rows(a), _rows(b)
    if x.shape != y.shape:
        raise ValueError(f"cannot correlate maps of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return _correlate(_standardize(x), _standardize(y))


def _ranks_from_sorted(values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Average ranks (1..N, ties share their mean rank) of the rows whose sorted values and sort order are given.

    Every entry first gets its sorted position + 1; only the entries in runs of equal values (usually few: zeros,
    the clipped top percent) are then set to their run's mean rank ``(first + last) / 2 + 1``, so the cost is one
    scatter plus work proportional to the number of ties.
    """
    batch, n = values.shape
    order = order.to(values.device)
    position = torch.arange(1, n + 1, dtype=values.dtype, device=values.device)
    ranks = torch.empty_like(values).scatter_(1, order, position.expand(batch, n))
    equal = values[:, 1:] == values[:, :-1]  # sorted positions j and j + 1 hold the same value
    tied = torch.zeros_like(values, dtype=torch.bool)
    tied[:, 1:] = equal
    tied[:, :-1] |= equal
    rows, cols = tied.nonzero(as_tuple=True)  # row-major, so each run is a stretch of consecutive entries
    if rows.numel():
        continues = torch.zeros_like(rows, dtype=torch.bool)  # same run as the previous tied entry
        continues[1:] = (rows[1:] == rows[:-1]) & (cols[1:] == cols[:-1] + 1)
        continues[1:] &= equal[rows[1:], (cols[1:] - 1).clamp_min(0)]
        starts = ~continues
        ends = torch.ones_like(starts)
        ends[:-1] = starts[1:]
        run = starts.cumsum(0) - 1
        mean_rank = (cols[starts] + cols[ends]).to(values.dtype) / 2 + 1
        ranks[rows, order[rows, cols]] = mean_rank[run]
    return ranks


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Per-row ranks of a ``(B, N)`` tensor, tied values sharing their average rank (scipy's ``rankdata``)."""
    values, order = _sort_rows(x)
    return _ranks_from_sorted(values, order)


def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(x).all(dim=1)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row Spearman rank correlation (Pearson of average ranks), as ``scipy.stats.spearmanr`` row by row.

    Example:
        >>> spearman(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[1.0, 3.0, 2.0, 4.0]])).tolist()
        [0.8]
    """
    x, y = _rows(a), _rows(b)
    if x.shape != y.shape:
        raise ValueError(f"cannot correlate maps of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    r = pearson(_average_ranks(x), _average_ranks(y))
    return r.masked_fill(~(_finite_rows(x) & _finite_rows(y)), math.nan)


# --------------------------------------------------------------------------------------------------------------- ssim
def _gaussian_kernel(sigma: float, truncate: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)  # scipy.ndimage.gaussian_filter's radius
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _valid_filter(x: torch.Tensor, kernel: torch.Tensor, dim: int) -> torch.Tensor:
    """Correlate ``x`` with a 1-D ``kernel`` along ``dim``, keeping only positions where it fits ("valid").

    A sum of shifted slices accumulated in place: for SSIM's small window this is several times faster than
    ``conv2d`` on CPU.
    """
    n = x.shape[dim] - kernel.numel() + 1
    weights = kernel.tolist()
    out = x.narrow(dim, 0, n) * weights[0]
    for j in range(1, len(weights)):
        out.add_(x.narrow(dim, j, n), alpha=weights[j])
    return out


class _SSIMWindow:
    """SSIM's Gaussian window; per-image local statistics are computed once and combined pairwise."""

    def __init__(self, sigma: float = 1.5, truncate: float = 3.5) -> None:
        self.sigma = sigma
        self.truncate = truncate
        self.size = 2 * int(truncate * sigma + 0.5) + 1

    def check(self, shape: Sequence[int]) -> None:
        if len(shape) != 3 or min(shape[1:]) < self.size:
            raise ValueError(
                f"ssim needs (B, H, W) maps of at least {self.size}x{self.size} pixels (Gaussian window, sigma="
                f"{self.sigma}), got shape {tuple(shape)}; drop 'ssim' from metrics for smaller maps"
            )

    def filter(self, x: torch.Tensor) -> torch.Tensor:
        k = _gaussian_kernel(self.sigma, self.truncate, x.dtype, x.device)
        return _valid_filter(_valid_filter(x, k, dim=-2), k, dim=-1)

    def stats(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Local means and local means of squares, ``(B, H', W')`` each."""
        x = images if images.is_floating_point() else images.float()
        both = self.filter(torch.stack([x, x * x]))
        return both[0], both[1]

    def combine(self, a: torch.Tensor, b: torch.Tensor, stats_a: tuple, stats_b: tuple, data_range: float,
                k1: float, k2: float, sample_covariance: bool) -> torch.Tensor:
        ux, uxx = stats_a
        uy, uyy = stats_b
        uxy = self.filter(a.to(ux.dtype) * b.to(ux.dtype))
        n = self.size * self.size
        cov_norm = n / (n - 1.0) if sample_covariance else 1.0
        vx = cov_norm * (uxx - ux * ux)
        vy = cov_norm * (uyy - uy * uy)
        vxy = cov_norm * (uxy - ux * uy)
        c1 = (k1 * data_range) ** 2
        c2 = (k2 * data_range) ** 2
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
        return s.mean(dim=(-2, -1))


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 1.0,
    sigma: float = 1.5,
    truncate: float = 3.5,
    k1: float = 0.01,
    k2: float = 0.03,
    sample_covariance: bool = False,
) -> torch.Tensor:
    """Mean structural similarity of ``(B, H, W)`` images with a Gaussian window (Wang et al., 2004), per row.

    Equal to ``skimage.metrics.structural_similarity(a[i], b[i], data_range=data_range, gaussian_weights=True,
    sigma=sigma, use_sample_covariance=sample_covariance)``: the local statistics are averaged over the window
    positions that fit entirely inside the image (scikit-image crops the filter radius from each border).

    Example:
        >>> x = torch.rand(2, 16, 16)
        >>> ssim(x, x).tolist()
        [1.0, 1.0]
    """
    if a.shape != b.shape:
        raise ValueError(f"ssim needs two tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    window = _SSIMWindow(sigma, truncate)
    window.check(a.shape)
    dtype = torch.promote_types(a.dtype, b.dtype) if a.is_floating_point() else torch.float32
    a, b = a.to(dtype), b.to(dtype)
    return window.combine(a, b, window.stats(a), window.stats(b), data_range, k1, k2, sample_covariance)


# ---------------------------------------------------------------------------------------------------------------- hog
def hog_features(
    images: torch.Tensor,
    orientations: int = 9,
    pixels_per_cell: int = 8,
    cells_per_block: int = 3,
    eps: float = 1e-5,
) -> torch.Tensor:
    """HOG descriptors (Dalal and Triggs, 2005) of ``(B, H, W)`` images, as scikit-image's ``hog`` computes them.

    Central-difference gradients (zero on the border rows/columns), unsigned orientations in ``[0, 180)`` binned
    hard into ``orientations`` bins, per-cell histograms of gradient magnitude divided by the cell area, and L2-Hys
    normalization (L2, clip at 0.2, L2 again) over overlapping blocks. Returns ``(B, n_features)`` in scikit-image's
    ``feature_vector=True`` order. Equal to ``skimage.feature.hog(img, orientations, (p, p), (c, c), "L2-Hys")`` for
    even ``pixels_per_cell``.

    Example:
        >>> hog_features(torch.rand(2, 32, 32)).shape   # 4x4 cells -> 2x2 blocks of 3x3 cells x 9 bins
        torch.Size([2, 324])
    """
    if images.dim() != 3:
        raise ValueError(f"hog_features needs (B, H, W) images, got shape {tuple(images.shape)}")
    batch, height, width = images.shape
    p, c = pixels_per_cell, cells_per_block
    rows, cols = height // p, width // p
    if rows < c or cols < c:
        raise ValueError(
            f"hog needs at least {c * p}x{c * p} pixels ({c}x{c} cells of {p}x{p}), got {height}x{width}; drop 'hog'"
            " from metrics or lower hog_pixels_per_cell"
        )
    img = images if images.is_floating_point() else images.float()
    g_row = torch.zeros_like(img)
    g_col = torch.zeros_like(img)
    g_row[:, 1:-1, :] = img[:, 2:, :] - img[:, :-2, :]
    g_col[:, :, 1:-1] = img[:, :, 2:] - img[:, :, :-2]
    magnitude = torch.hypot(g_col, g_row)[:, : rows * p, : cols * p]
    # unsigned orientation in [0, 180) (``remainder`` is exact here: x + 180 for x < 0, as numpy's ``%``), binned;
    # in place, since each of these full-size passes costs more in fresh memory than in arithmetic
    orientation = torch.atan2(g_row, g_col)[:, : rows * p, : cols * p].rad2deg_().remainder_(180.0)
    bins = orientation.div_(180.0 / orientations).floor_().clamp_(0, orientations - 1).long()
    # every pixel adds its magnitude to (its cell, its bin): one scatter-add into the small (B, cells x bins) array
    cell_row = torch.arange(rows * p, device=img.device) // p
    cell_col = torch.arange(cols * p, device=img.device) // p
    cell = (cell_row.view(-1, 1) * cols + cell_col.view(1, -1)).view(1, rows * p, cols * p)
    index = (cell * orientations + bins).reshape(batch, -1)
    cells = torch.zeros(batch, rows * cols * orientations, dtype=img.dtype, device=img.device)
    cells.scatter_add_(1, index, magnitude.reshape(batch, -1))
    cells = cells.view(batch, rows, cols, orientations) / (p * p)
    blocks = cells.unfold(1, c, 1).unfold(2, c, 1)  # (B, nbr, nbc, O, c, c)
    blocks = blocks.permute(0, 1, 2, 4, 5, 3)  # (B, nbr, nbc, c, c, O): scikit-image's order
    flat = blocks.reshape(batch, blocks.shape[1], blocks.shape[2], -1)
    out = flat / (flat.square().sum(dim=-1, keepdim=True) + eps**2).sqrt()
    out = out.clamp(max=0.2)
    out = out / (out.square().sum(dim=-1, keepdim=True) + eps**2).sqrt()
    return out.reshape(batch, -1)


# -------------------------------------------------------------------------------------------------------------- top-k
def _topk_count(k: float | int, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, float)) or k <= 0:
        raise ValueError(f"top_k must be a fraction in (0, 1) or a positive count, got {k!r}")
    count = max(1, int(round(k * n))) if isinstance(k, float) and k < 1 else int(k)
    return min(count, n)


def _topk_mask(x: torch.Tensor, count: int) -> torch.Tensor:
    return torch.zeros_like(x, dtype=torch.bool).scatter_(1, x.topk(count, dim=1).indices, True)


def _intersection(mask_a: torch.Tensor, mask_b: torch.Tensor, count: int) -> torch.Tensor:
    return (mask_a & mask_b).sum(dim=-1).to(torch.float64 if mask_a.device.type != "mps" else torch.float32) / count


def topk_intersection(a: torch.Tensor, b: torch.Tensor, k: float | int = 0.1) -> torch.Tensor:
    """Share of the ``k`` largest entries of each row of ``a`` that are also among the ``k`` largest of ``b``.

    ``nan`` for a constant row (its top-k is arbitrary). Ties at the k-th value are broken arbitrarily.

    Args:
        a, b: ``(B, ...)`` scores (compare absolute maps to compare magnitudes).
        k: a fraction in ``(0, 1)`` of the entries per row (rounded, at least 1) or a count.

    Example:
        >>> topk_intersection(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), torch.tensor([[4.0, 1.0, 3.0, 2.0]]), k=2).tolist()
        [0.5]
    """
    x, y = _rows(a), _rows(b)
    if x.shape != y.shape:
        raise ValueError(f"cannot compare maps of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    count = _topk_count(k, x.shape[1])
    out = _intersection(_topk_mask(x, count), _topk_mask(y, count), count)
    undefined = ~(_finite_rows(x) & _finite_rows(y)) | _constant_rows(x) | _constant_rows(y)
    return out.masked_fill(undefined, math.nan)


def _constant_rows(x: torch.Tensor) -> torch.Tensor:
    return x.amax(dim=1) == x.amin(dim=1)


# ----------------------------------------------------------------------------------------------------- MapSimilarity
@dataclass
class PreparedMaps:
    """One batch of maps, normalized, with the per-map statistics every metric needs computed once.

    The original maps of a randomization test are compared with every stage's maps: preparing them once leaves
    each comparison a few dot products and one filtered product (SSIM).

    Attributes:
        absolute: ``(B, *spatial)`` normalized absolute maps in ``[0, 1]``.
        signed: ``(B, *spatial)`` normalized signed maps in ``[-1, 1]`` (``None`` if prepared with ``signed=False``).
        finite: ``(B,)`` rows without ``nan``/``inf`` in the raw maps.
        stats: per-metric statistics (standardized ranks, HOG features, SSIM local moments, top-k masks).
    """

    absolute: torch.Tensor
    signed: Optional[torch.Tensor]
    finite: torch.Tensor
    stats: dict[str, Any]

    def _apply(self, fn: Any) -> "PreparedMaps":
        def r(v: Any) -> Any:
            if isinstance(v, tuple):
                return tuple(r(t) for t in v)
            if v is None:  # signed maps not prepared
                return None
            return fn(v) if v.dim() else v  # 0-dim entries (the top-k count) are per batch, not per example

        return PreparedMaps(r(self.absolute), r(self.signed), r(self.finite), {k: r(v) for k, v in self.stats.items()})

    def roll(self, shifts: int = 1) -> "PreparedMaps":
        """The same maps with the batch rotated by ``shifts`` (example ``i`` paired with ``i - shifts``)."""
        return self._apply(lambda t: t.roll(shifts, dims=0))

    def take(self, indices: torch.Tensor) -> "PreparedMaps":
        """The examples ``indices`` (along the batch), e.g. a pairing of every example with another one."""
        return self._apply(lambda t: t.index_select(0, indices.to(t.device)))

    def __len__(self) -> int:
        return int(self.absolute.shape[0])


class MapSimilarity:
    """Compare two batches of attribution maps example by example with the metrics of Adebayo et al. (2018).

    See the module docstring for the normalization and the metrics. Maps are compared on their own device.

    Args:
        metrics: names from :data:`ALL_METRICS`, or ``None`` for every metric that applies to the maps' shape
            (``ssim`` needs 2-D maps of at least 11x11 pixels, ``hog`` at least ``cells_per_block * pixels_per_cell``).
        clip_percentile: percentile to clip normalized maps at (``None``: no clipping).
        top_k: fraction (or count) of positions for ``topk``.
        ssim_sigma: standard deviation of SSIM's Gaussian window.
        hog_orientations, hog_pixels_per_cell, hog_cells_per_block: HOG parameters (scikit-image's defaults).
        hog_correlation: ``"pearson"`` (default) or ``"spearman"`` correlation of HOG vectors.

    Example:
        >>> sim = MapSimilarity()
        >>> a = torch.randn(4, 3, 32, 32)
        >>> scores = sim(a, a)
        >>> sorted(scores), [round(float(v), 6) for v in scores["spearman_abs"]]
        (['hog', 'spearman_abs', 'spearman_signed', 'ssim', 'topk'], [1.0, 1.0, 1.0, 1.0])
    """

    def __init__(
        self,
        metrics: Optional[Sequence[str]] = None,
        clip_percentile: Optional[float] = 99.0,
        top_k: float | int = 0.1,
        ssim_sigma: float = 1.5,
        hog_orientations: int = 9,
        hog_pixels_per_cell: int = 8,
        hog_cells_per_block: int = 3,
        hog_correlation: str = "pearson",
    ) -> None:
        if metrics is not None:
            if isinstance(metrics, str):
                metrics = [metrics]
            unknown = [m for m in metrics if m not in ALL_METRICS]
            if unknown or not metrics:
                raise ValueError(f"metrics: unknown {unknown or 'empty list'}; choose from {list(ALL_METRICS)}")
            metrics = [m for m in ALL_METRICS if m in metrics]
        self.metrics = None if metrics is None else tuple(metrics)
        if clip_percentile is not None and not 0 < float(clip_percentile) <= 100:
            raise ValueError(f"clip_percentile must lie in (0, 100] or be None, got {clip_percentile!r}")
        self.clip_percentile = None if clip_percentile is None else float(clip_percentile)
        _topk_count(top_k, 10**6)  # validates
        self.top_k = top_k
        if not ssim_sigma > 0:
            raise ValueError(f"ssim_sigma must be > 0, got {ssim_sigma!r}")
        self.ssim_sigma = float(ssim_sigma)
        self._ssim = _SSIMWindow(self.ssim_sigma)
        for name, v in (("hog_orientations", hog_orientations), ("hog_pixels_per_cell", hog_pixels_per_cell),
                        ("hog_cells_per_block", hog_cells_per_block)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.hog_orientations = hog_orientations
        self.hog_pixels_per_cell = hog_pixels_per_cell
        self.hog_cells_per_block = hog_cells_per_block
        if hog_correlation not in ("pearson", "spearman"):
            raise ValueError(f"hog_correlation must be 'pearson' or 'spearman', got {hog_correlation!r}")
        self.hog_correlation = hog_correlation

    def __repr__(self) -> str:
        return f"MapSimilarity(metrics={self.metrics}, clip_percentile={self.clip_percentile}, top_k={self.top_k})"

    # ------------------------------------------------------------------------------------------------ applicability
    @staticmethod
    def _spatial_shape(shape: Sequence[int]) -> Optional[tuple[int, int]]:
        """(H, W) of 2-D maps (``(B, C, H, W)`` or ``(B, H, W)``), else None."""
        if len(shape) == 4:
            return int(shape[2]), int(shape[3])
        if len(shape) == 3:
            return int(shape[1]), int(shape[2])
        return None

    def applicable(self, shape: Sequence[int]) -> tuple[str, ...]:
        """The requested metrics that apply to maps of ``shape`` (raises for a requested one that does not)."""
        hw = self._spatial_shape(shape)
        win = self._ssim.size
        hog_side = self.hog_cells_per_block * self.hog_pixels_per_cell
        ok = {
            "spearman_abs": True,
            "spearman_signed": True,
            "topk": True,
            "ssim": hw is not None and min(hw) >= win,
            "hog": hw is not None and min(hw) >= hog_side,
        }
        if self.metrics is None:
            return tuple(m for m in ALL_METRICS if ok[m])
        missing = [m for m in self.metrics if not ok[m]]
        if missing:
            raise ValueError(
                f"metrics {missing} do not apply to maps of shape {tuple(shape)}: ssim needs 2-D maps of at least"
                f" {win}x{win}, hog at least {hog_side}x{hog_side}; remove them from metrics"
            )
        return self.metrics

    # ----------------------------------------------------------------------------------------------------- compare
    def prepare(self, maps: torch.Tensor, metrics: Optional[Sequence[str]] = None, *, signed: bool = True
                ) -> PreparedMaps:
        """Normalize ``maps`` once and compute what ``metrics`` need (default: :meth:`applicable` ones).

        ``signed=False`` skips the normalized signed maps (``PreparedMaps.signed`` is ``None``) unless
        ``spearman_signed`` needs them: no metric but that one reads them.
        """
        if not isinstance(maps, torch.Tensor) or maps.dim() < 2:
            raise ValueError("maps must be a tensor of shape (batch, ...) with at least two dimensions")
        maps = maps.detach()
        metrics = self.applicable(maps.shape) if metrics is None else tuple(metrics)
        batch = maps.shape[0]
        if bool(torch.isfinite(maps.sum())):  # no nan/inf anywhere (one reduction instead of a full-size mask)
            finite = torch.ones(batch, dtype=torch.bool, device=maps.device)
            clean = maps
        else:
            finite = _finite_rows(maps.reshape(batch, -1))
            clean = torch.where(torch.isfinite(maps), maps, torch.zeros_like(maps))

        wanted = set(metrics)
        aggregated = aggregate_channels(clean, signed=False).reshape(batch, -1)
        # ranks, top-k and the clipping percentile from one sort, in the maps' own dtype: the conversion to the
        # work dtype is exact and monotone, and a float32 sort is faster
        values, order = _sort_rows(aggregated)
        magnitude, values = aggregated.to(_work_dtype(aggregated)), values.to(_work_dtype(aggregated))
        to_absolute = _absolute_scaler(magnitude, self.clip_percentile, values)
        absolute = to_absolute(magnitude)
        signed_values = signed_order = None
        one_channel = maps.dim() < 4 or maps.shape[1] == 1  # then the magnitude is |signed|, entry by entry
        signed_map: Optional[torch.Tensor] = None  # stays None when not wanted
        if "spearman_signed" in wanted:
            signed_flat = _rows(aggregate_channels(clean, signed=True))
            signed_values, signed_order = (_sort_signed_by_magnitude(signed_flat, order.to(signed_flat.device))
                                           if one_channel else _sort_rows(signed_flat))
            to_signed = _signed_scaler(signed_flat, self.clip_percentile, signed_values)
            signed_map = to_signed(signed_flat)
        elif not signed:
            pass
        elif one_channel and self.clip_percentile is not None:
            # the percentile of |signed| is that of the magnitude, whose sorted rows are at hand: no selection
            span = _percentile_of_sorted(values, self.clip_percentile)
            signed_map = _scale(_rows(aggregate_channels(clean, signed=True)), span).clamp_(-1, 1)
        else:
            signed_flat = _rows(aggregate_channels(clean, signed=True))
            signed_map = _signed_scaler(signed_flat, self.clip_percentile)(signed_flat)

        stats: dict[str, Any] = {}
        if "spearman_abs" in metrics:
            # the scaling is monotone, so the sort of the raw magnitudes orders the normalized map too
            stats["spearman_abs"] = _standardize(_ranks_from_sorted(to_absolute(values), order))
        if "spearman_signed" in metrics:
            stats["spearman_signed"] = _standardize(_ranks_from_sorted(to_signed(signed_values), signed_order))
        spatial = self._spatial_shape(maps.shape)
        # SSIM and HOG in float32: their values agree with float64 to ~1e-6 at half the memory traffic
        images = absolute.view(batch, *spatial).float() if spatial is not None and wanted & {"ssim", "hog"} else None
        if "ssim" in metrics:
            self._ssim.check(images.shape if images is not None else maps.shape)
            stats["ssim"] = self._ssim.stats(images)
        if "hog" in metrics:
            if images is None:
                raise ValueError(f"hog needs 2-D maps, got shape {tuple(maps.shape)}; drop 'hog' from metrics")
            hog = hog_features(images, self.hog_orientations, self.hog_pixels_per_cell, self.hog_cells_per_block)
            hog = hog.to(absolute.dtype)
            stats["hog"] = _standardize(_average_ranks(hog) if self.hog_correlation == "spearman" else hog)
        if "topk" in metrics:
            count = _topk_count(self.top_k, magnitude.shape[1])
            top = order[:, magnitude.shape[1] - count:]  # the sort above already ranks the magnitudes
            mask = torch.zeros_like(magnitude, dtype=torch.bool).scatter_(1, top.to(magnitude.device), True)
            stats["topk"] = (mask, torch.tensor(count), values[:, -1] == values[:, 0])
        shape = (batch, *spatial) if spatial is not None else (batch, magnitude.shape[1])
        return PreparedMaps(absolute.view(shape), None if signed_map is None else signed_map.view(shape), finite, stats)

    def compare(
        self, a: PreparedMaps, b: PreparedMaps, metrics: Optional[Sequence[str]] = None
    ) -> dict[str, torch.Tensor]:
        """Scores of two prepared batches, ``{metric: (B,)}`` (``nan`` where either map is not finite)."""
        if a.absolute.shape != b.absolute.shape:
            raise ValueError(f"cannot compare maps of shapes {tuple(a.absolute.shape)} and {tuple(b.absolute.shape)}")
        return {k: v[0] for k, v in self._compare(a, b, 1, metrics).items()}

    def compare_stacked(
        self, reference: PreparedMaps, stacked: PreparedMaps, metrics: Optional[Sequence[str]] = None
    ) -> dict[str, torch.Tensor]:
        """Scores ``{metric: (S, B)}`` of ``B`` reference maps against ``S`` batches of maps of the same inputs.

        ``stacked`` holds the ``S`` batches one after another along the batch (rows ``s * B ... s * B + B - 1``
        are batch ``s``), e.g. every stage of a randomization test prepared in one call. Row ``s`` equals
        ``compare(reference, batch s)``; the reference is broadcast, not repeated.

        Example:
            >>> sim = MapSimilarity()
            >>> reference = sim.prepare(torch.rand(2, 1, 16, 16))
            >>> sim.compare_stacked(reference, sim.prepare(torch.rand(6, 1, 16, 16)))["spearman_abs"].shape
            torch.Size([3, 2])
        """
        size = len(reference)
        if reference.absolute.shape[1:] != stacked.absolute.shape[1:] or len(stacked) % size:
            raise ValueError(
                f"stacked must hold whole batches of {size} maps shaped like the reference's"
                f" {tuple(reference.absolute.shape[1:])}, got shape {tuple(stacked.absolute.shape)}"
            )
        return self._compare(reference, stacked, len(stacked) // size, metrics)

    def _compare(
        self, a: PreparedMaps, b: PreparedMaps, groups: int, metrics: Optional[Sequence[str]]
    ) -> dict[str, torch.Tensor]:
        """``{metric: (groups, B)}``: ``a`` (``B`` maps) against each of the ``groups`` batches stacked in ``b``."""
        metrics = [m for m in ALL_METRICS if m in a.stats and m in b.stats] if metrics is None else metrics

        def one(t: torch.Tensor) -> torch.Tensor:  # (B, ...) -> (1, B, ...): broadcast against every group
            return t.unsqueeze(0)

        def grouped(t: torch.Tensor) -> torch.Tensor:  # (groups * B, ...) -> (groups, B, ...)
            return t.view(groups, -1, *t.shape[1:])

        out: dict[str, torch.Tensor] = {}
        for m in metrics:
            if m not in a.stats or m not in b.stats:
                raise ValueError(f"metric {m!r} was not prepared for both batches; prepare them with it in metrics")
            if m in ("spearman_abs", "spearman_signed", "hog"):
                out[m] = _correlate(one(a.stats[m]), grouped(b.stats[m]))
            elif m == "ssim":
                stats_a = tuple(one(t) for t in a.stats[m])
                stats_b = tuple(grouped(t) for t in b.stats[m])
                out[m] = self._ssim.combine(one(a.absolute.float()), grouped(b.absolute.float()), stats_a, stats_b,
                                            1.0, 0.01, 0.03, False).to(a.absolute.dtype)
            elif m == "topk":
                mask_a, count, constant_a = a.stats[m]
                mask_b, _, constant_b = b.stats[m]
                out[m] = _intersection(one(mask_a), grouped(mask_b), int(count)).masked_fill(
                    one(constant_a) | grouped(constant_b), math.nan)
        bad = ~(one(a.finite) & grouped(b.finite))
        return {k: v.masked_fill(bad, math.nan) for k, v in out.items()}

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{metric: (B,)}`` similarity of the maps ``a`` and ``b`` (same shape), example by example."""
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape:
            raise ValueError(
                "a and b must be tensors of the same shape (batch, ...), got "
                f"{getattr(a, 'shape', type(a).__name__)} and {getattr(b, 'shape', type(b).__name__)}"
            )
        metrics = self.applicable(a.shape)
        return self.compare(self.prepare(a, metrics), self.prepare(b, metrics), metrics)
