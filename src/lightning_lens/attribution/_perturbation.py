"""What the model-agnostic perturbation methods share: feature groups, coalitions and their batched evaluation.

:class:`~lightning_lens.attribution.FeatureAblation`, :class:`~lightning_lens.attribution.KernelSHAP` and
:class:`~lightning_lens.attribution.LIME` all explain an example through ``M`` *interpretable features*: groups of
input elements given by a ``feature_mask`` (one feature per column of a ``(B, F)`` table, a grid of patches of an
image by default). A coalition is a binary vector ``z`` of length ``M``: the elements of the groups with ``z_g = 1``
keep their values, the others take the baseline's. Every method draws or builds coalitions, evaluates the target
score of each (:func:`coalition_scores`, batched within the element budget), and fits one value per group, which
every element of the group receives (Captum's convention).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from lightning_lens.attribution._batching import blocks, check_batch_size, resolve_batch_size
from lightning_lens.attribution._inputs import ModelInputs
from lightning_lens.attribution.base import Attribution, OutputFn, Target, target_scores
from lightning_lens.utils import resolve_target
from lightning_lens.utils.checks import check_int
from lightning_lens.utils.rng import check_seed

__all__ = [
    "PerturbationAttribution",
    "coalition_scores",
    "default_feature_mask",
    "expand_groups",
    "feature_groups",
    "patch_mask",
    "superpixel_mask",
]

#: patches per spatial dim of the default image mask: a 4x4 grid of patches (16 features) whatever the resolution,
#: so KernelSHAP and LIME need the same number of coalitions for a 32x32 and a 224x224 image.
DEFAULT_GRID = 4

Size = Union[int, Sequence[int]]


def _per_spatial_dim(value: Size, n_spatial: int, argument: str) -> tuple[int, ...]:
    values = (value,) * n_spatial if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(values, Sequence)
        or len(values) != n_spatial
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)
    ):
        raise ValueError(f"{argument} must be a positive int or a tuple of {n_spatial} positive ints, got {value!r}")
    return tuple(values)


def patch_mask(
    example_shape: Sequence[int], patch_size: Optional[Size] = None, grid: Size = DEFAULT_GRID
) -> torch.Tensor:
    """A feature mask of rectangular patches for examples of shape ``(C, *spatial)``, all channels together.

    Args:
        example_shape: the shape of one example, channels first (``(C, H, W)`` for images, ``(C, L)`` for signals).
        patch_size: the patch size in elements per spatial dim (an int or a tuple); the last patch of a dim may be
            cut off by the border. Overrides ``grid``.
        grid: the number of patches per spatial dim (an int or a tuple) when ``patch_size`` is None; default 4, i.e.
            a 4x4 grid of patches of ``ceil(H / 4) x ceil(W / 4)`` pixels for an image.

    Returns:
        a ``(1, *spatial)`` long tensor of patch ids ``0..M-1`` in row-major order; it broadcasts over the batch and
        the channels.

    Example:
        >>> patch_mask((3, 4, 4), grid=2)[0].tolist()
        [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    """
    shape = tuple(int(n) for n in example_shape)
    if len(shape) < 2:
        raise ValueError(
            f"patch_mask needs examples of shape (channels, *spatial), got {shape}; tabular (B, F) inputs use one"
            " feature per column (feature_mask=None)"
        )
    spatial = shape[1:]
    if patch_size is None:
        cells = _per_spatial_dim(grid, len(spatial), "grid")
        sizes = tuple(math.ceil(n / min(c, n)) for n, c in zip(spatial, cells))
    else:
        sizes = _per_spatial_dim(patch_size, len(spatial), "patch_size")
    ids = torch.zeros(spatial, dtype=torch.long)
    for dim, (n, p) in enumerate(zip(spatial, sizes)):
        count = math.ceil(n / p)
        coord = (torch.arange(n) // p).view(*([1] * dim), n, *([1] * (len(spatial) - dim - 1)))
        ids = ids * count + coord
    return ids.unsqueeze(0)


def default_feature_mask(example_shape: Sequence[int]) -> torch.Tensor:
    """The default feature groups: one feature per column for ``(F,)`` examples (tabular data), a 4x4 grid of patches
    of the spatial dims (all channels together, :func:`patch_mask`) for ``(C, *spatial)`` examples.

    Example:
        >>> default_feature_mask((3,)).tolist(), default_feature_mask((1, 8, 8)).unique().numel()
        ([0, 1, 2], 16)
    """
    shape = tuple(example_shape)
    if len(shape) == 1:
        return torch.arange(shape[0])
    return patch_mask(shape)


def superpixel_mask(
    images: torch.Tensor, n_segments: int = 16, compactness: float = 10.0, **slic_kwargs: Any
) -> torch.Tensor:
    """SLIC superpixels (Achanta et al. 2012) of a batch of images as a per-example feature mask.

    Needs scikit-image (optional; ``pip install scikit-image``). Each image is scaled to [0, 1] before segmenting.

    Args:
        images: ``(B, C, H, W)`` images (channels first).
        n_segments, compactness: passed to ``skimage.segmentation.slic``, as are ``slic_kwargs``.

    Returns:
        a ``(B, 1, H, W)`` long tensor of segment ids, one mask per image.

    Example:
        >>> mask = superpixel_mask(torch.rand(2, 3, 16, 16), n_segments=4)
        >>> mask.shape
        torch.Size([2, 1, 16, 16])
    """
    try:
        from skimage.segmentation import slic
    except ImportError as err:  # optional dependency
        raise ImportError(
            "superpixel_mask needs scikit-image: pip install scikit-image, or use patch_mask(...) instead"
        ) from err
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (B, C, H, W) tensor, got {getattr(images, 'shape', type(images).__name__)}")
    n_segments = check_int(n_segments, "n_segments", minimum=1)
    masks = []
    for image in images.detach().cpu().double():
        lo, hi = image.min(), image.max()
        scaled = ((image - lo) / (hi - lo) if hi > lo else image - lo).permute(1, 2, 0).numpy()
        segments = slic(scaled, n_segments=n_segments, compactness=compactness, channel_axis=-1, start_label=0,
                        **slic_kwargs)
        masks.append(torch.as_tensor(segments, dtype=torch.long))
    return torch.stack(masks).unsqueeze(1).to(images.device)


def _broadcast_mask(mask: Any, x: torch.Tensor, argument: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{argument} must be an integer tensor of feature group ids, got {type(mask).__name__}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"{argument} must hold integer group ids, got dtype {mask.dtype}; convert it with .long()")
    try:
        return torch.broadcast_to(mask.to(x.device, torch.long), x.shape)
    except RuntimeError:
        raise ValueError(
            f"{argument} of shape {tuple(mask.shape)} does not broadcast to the inputs' shape {tuple(x.shape)}; give"
            " one group id per element of an example (shared) or of the batch (per example)"
        ) from None


def feature_groups(
    inputs: Sequence[torch.Tensor], feature_mask: Union[None, torch.Tensor, Sequence[Optional[torch.Tensor]]]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every element's group index per example, and the number of groups per example.

    ``feature_mask`` holds one mask per input tensor (or one tensor for a single input), each broadcastable to its
    tensor; ``None`` entries take :func:`default_feature_mask`, offset so that the default groups of different tensors
    are distinct. The same id in two tensors is one group. Ids are renumbered per example to ``0..M_b - 1`` in
    increasing order.

    Returns:
        ``(index, counts)``: ``index[t]`` a ``(B, ...)`` long tensor like ``inputs[t]``, ``counts`` a ``(B,)`` tensor.
    """
    if feature_mask is None or isinstance(feature_mask, torch.Tensor):
        masks: list[Any] = [feature_mask] + [None] * (len(inputs) - 1)
    else:
        masks = list(feature_mask)
        if len(masks) != len(inputs):
            raise ValueError(
                f"feature_mask holds {len(masks)} masks for {len(inputs)} attributed input tensors; give one per tensor"
            )
    full, offset = [], 0
    for t, (x, mask) in enumerate(zip(inputs, masks)):
        argument = "feature_mask" if len(inputs) == 1 else f"feature_mask[{t}]"
        if mask is None:
            mask = default_feature_mask(x.shape[1:]) + offset
        full.append(_broadcast_mask(mask, x, argument))
        offset = max(offset, int(full[-1].max()) + 1)
    batch = inputs[0].shape[0]
    flat = torch.cat([m.reshape(batch, -1) for m in full], dim=1)
    index = torch.empty_like(flat)
    counts = torch.empty(batch, dtype=torch.long)
    for b in range(batch):
        ids, inverse = torch.unique(flat[b], return_inverse=True)
        index[b], counts[b] = inverse, ids.numel()
    out, start = [], 0
    for x in inputs:
        width = x[0].numel()
        out.append(index[:, start : start + width].reshape(x.shape))
        start += width
    return out, counts


def expand_groups(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per-element attributions from per-group ``values`` ``(B, M)``: every element gets its group's value."""
    return values.gather(1, index.reshape(index.shape[0], -1)).view(index.shape)


#: ``score(perturbed, b0, b1, k, target_rows) -> (k * (b1 - b0),)``: the target scores of ``k`` stacked copies
#: (sample-major) of examples ``b0:b1`` whose attributed tensors are replaced by ``perturbed``.
ScoreFn = Callable[[list[torch.Tensor], int, int, int, torch.Tensor], torch.Tensor]


def coalition_scores(
    score: ScoreFn,
    inputs: Sequence[torch.Tensor],
    baselines: Sequence[torch.Tensor],
    index: Sequence[torch.Tensor],
    coalitions: torch.Tensor,
    target: torch.Tensor,
    rows: int,
    offset: int = 0,
) -> torch.Tensor:
    """The target score of every example under every coalition, ``(n, B)``.

    Args:
        score: see :data:`ScoreFn`; it receives example indices shifted by ``offset``.
        inputs, baselines, index: per attributed tensor, ``(B, ...)`` values, baseline values and group indices.
        coalitions: ``(n, M)``, 1 = keep the input's values, 0 = take the baseline's.
        target: ``(B,)`` class indices.
        rows: most rows per forward; blocks are sample-major (:func:`~lightning_lens.attribution._batching.blocks`),
            so the result does not depend on it.
        offset: the index of ``inputs``' first example in the batch ``score`` knows.
    """
    keep = coalitions.to(device=inputs[0].device, dtype=torch.bool)
    n, batch = keep.shape[0], inputs[0].shape[0]
    out = torch.empty(n, batch, dtype=torch.float64, device=inputs[0].device)
    for blk in blocks(n, batch, rows):
        k, width = blk.s1 - blk.s0, blk.b1 - blk.b0
        perturbed = []
        for x, base, idx in zip(inputs, baselines, index):
            x, base, idx = x[blk.b0 : blk.b1], base[blk.b0 : blk.b1], idx[blk.b0 : blk.b1]
            on = keep[blk.s0 : blk.s1][:, idx.reshape(-1)].view(k, *idx.shape)  # (k, width, ...)
            perturbed.append(torch.where(on, x, base).reshape(k * width, *x.shape[1:]))
        values = score(perturbed, offset + blk.b0, offset + blk.b1, k, target[blk.b0 : blk.b1].repeat(k))
        out[blk.s0 : blk.s1, blk.b0 : blk.b1] = values.view(k, width)
    return out


def equal_count_runs(counts: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(b0, b1, M)`` for every run of consecutive examples with the same number of groups ``M``.

    Example:
        >>> equal_count_runs(torch.tensor([3, 3, 5, 3]))
        [(0, 2, 3), (2, 3, 5), (3, 4, 3)]
    """
    runs: list[tuple[int, int, int]] = []
    for b, m in enumerate(counts.tolist()):
        if runs and runs[-1][2] == m:
            runs[-1] = (runs[-1][0], b + 1, m)
        else:
            runs.append((b, b + 1, m))
    return runs


def weighted_lasso(
    design: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    alpha: float,
    *,
    max_iter: int = 1000,
    tol: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A weighted Lasso with an intercept, fitted by cyclic coordinate descent for several targets at once.

    Minimises ``1 / (2 sum(w)) * sum_i w_i (y_i - b - x_i . beta)^2 + alpha * |beta|_1`` for every column of
    ``targets``: scikit-learn's ``Lasso(alpha).fit(X, y, sample_weight=w)``. ``alpha=0`` is weighted least squares,
    solved directly.

    Args:
        design: ``(n, M)`` features.
        targets: ``(n, K)`` responses (``K`` independent fits sharing the design and the weights).
        weights: ``(n,)`` non-negative sample weights.
        alpha: the L1 penalty.
        max_iter, tol: coordinate descent stops when no coefficient moved by more than ``tol`` times the largest
            coefficient (or after ``max_iter`` sweeps).

    Returns:
        ``(coef, intercept)``: ``(M, K)`` and ``(K,)``, in float64.

    Example:
        >>> X = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
        >>> coef, intercept = weighted_lasso(X, X @ torch.tensor([[2.0], [-1.0]]) + 3, torch.ones(4), alpha=0.0)
        >>> [round(v, 6) for v in coef[:, 0].tolist()], round(float(intercept[0]), 6)
        ([2.0, -1.0], 3.0)
    """
    X, Y, w = (t.detach().double().cpu() for t in (design, targets, weights))
    sw = w / w.sum()
    x_mean, y_mean = sw @ X, sw @ Y
    Xc, Yc = X - x_mean, Y - y_mean
    if alpha == 0:
        root = sw.sqrt()[:, None]
        coef = torch.linalg.lstsq(root * Xc, root * Yc, driver="gelsd").solution
        return coef, y_mean - x_mean @ coef
    # coordinate descent on the Gram matrix (M x M): each update costs O(M K), whatever the number of samples;
    # NumPy because the loop runs M updates per sweep and torch's per-call overhead would dominate
    weighted = (Xc * sw[:, None]).numpy()
    gram, corr = weighted.T @ Xc.numpy(), weighted.T @ Yc.numpy()
    diag = np.diag(gram).copy()
    beta = np.zeros_like(corr)
    for _ in range(max_iter):
        largest_step = 0.0
        for j in range(beta.shape[0]):
            if diag[j] <= 0:
                continue
            rho = corr[j] - gram[j] @ beta + diag[j] * beta[j]
            new = np.sign(rho) * np.maximum(np.abs(rho) - alpha, 0.0) / diag[j]
            largest_step = max(largest_step, float(np.abs(new - beta[j]).max()))
            beta[j] = new
        if largest_step <= tol * max(float(np.abs(beta).max()), 1e-12):
            break
    coef = torch.from_numpy(beta)
    return coef, y_mean - x_mean @ coef


def shapley_kernel_weight(n_features: int, size: int) -> float:
    """The Shapley kernel of Lundberg & Lee (2017) for a coalition of ``size`` of ``n_features`` features:
    ``(M - 1) / (C(M, s) s (M - s))`` (infinite for the empty and the full coalition).

    Example:
        >>> shapley_kernel_weight(4, 2)
        0.125
    """
    if size in (0, n_features):
        return math.inf
    return (n_features - 1) / (math.comb(n_features, size) * size * (n_features - size))


def _all_subsets(n_features: int, size: int) -> torch.Tensor:
    # itertools, not torch.combinations: that one builds an n_features ** size grid first
    members = torch.tensor(list(itertools.combinations(range(n_features), size)), dtype=torch.long)
    out = torch.zeros(members.shape[0], n_features, dtype=torch.float64)
    return out.scatter_(1, members.view(members.shape[0], size), 1.0)


def shapley_coalitions(
    n_features: int, n_samples: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coalitions and their weights for KernelSHAP, following shap's ``KernelExplainer``.

    All ``2^M - 2`` non-trivial coalitions, weighted by :func:`shapley_kernel_weight`, when they fit in ``n_samples``.
    Otherwise coalition sizes are filled in order of kernel weight, paired (size ``s`` with ``M - s``, small sizes
    first): a size whose share of the remaining budget covers all its coalitions is enumerated completely; the rest of
    the budget is drawn at random (a size from the kernel's distribution over the remaining sizes, then a uniform
    coalition of that size and its complement), duplicates adding to the weight of the first draw, and the drawn
    weights are scaled to the kernel mass of the sizes they stand for.

    Returns:
        ``(coalitions, weights)``: ``(n, M)`` 0/1 float64 rows (``n <= n_samples``) and ``(n,)`` weights.

    Example:
        >>> z, w = shapley_coalitions(3, 100, torch.Generator().manual_seed(0))
        >>> z.shape, [round(v, 4) for v in w.tolist()]
        (torch.Size([6, 3]), [0.3333, 0.3333, 0.3333, 0.3333, 0.3333, 0.3333])
    """
    M = n_features
    if M <= 60 and 2**M - 2 <= n_samples:
        rows = [_all_subsets(M, s) for s in range(1, M)]
        weights = [torch.full((r.shape[0],), shapley_kernel_weight(M, s), dtype=torch.float64) for s, r in
                   zip(range(1, M), rows)]
        return torch.cat(rows), torch.cat(weights)
    n_sizes = math.ceil((M - 1) / 2)
    n_paired = (M - 1) // 2
    size_weight = torch.tensor([(M - 1) / (s * (M - s)) for s in range(1, n_sizes + 1)], dtype=torch.float64)
    size_weight[:n_paired] *= 2
    size_weight /= size_weight.sum()
    coalitions: list[torch.Tensor] = []
    weights: list[float] = []
    left, remaining, n_full = n_samples, size_weight.clone(), 0
    for s in range(1, n_sizes + 1):
        paired = s <= n_paired
        count = math.comb(M, s) * (2 if paired else 1)
        if left * remaining[s - 1] / count < 1.0 - 1e-8:
            break
        n_full += 1
        left -= count
        if remaining[s - 1] < 1:
            remaining /= 1 - remaining[s - 1]
        w = float(size_weight[s - 1]) / math.comb(M, s) / (2 if paired else 1)
        subsets = _all_subsets(M, s)
        for row in subsets:
            coalitions.append(row)
            weights.append(w)
            if paired:
                coalitions.append(1 - row)
                weights.append(w)
    n_fixed = len(coalitions)
    if n_full < n_sizes and left > 0:
        rest = size_weight.clone()
        rest[:n_paired] /= 2  # every draw of a paired size adds two coalitions
        rest = rest[n_full:]
        rest /= rest.sum()
        draws = torch.multinomial(rest, 4 * left, replacement=True, generator=generator)
        seen: dict[bytes, int] = {}
        for d in draws.tolist():
            if left <= 0:
                break
            s = d + n_full + 1
            row = torch.zeros(M, dtype=torch.float64)
            row[torch.randperm(M, generator=generator)[:s]] = 1.0
            pair = [row, 1 - row] if s <= n_paired else [row]
            for coalition in pair:
                if left <= 0:
                    break
                key = coalition.to(torch.bool).numpy().tobytes()
                if key in seen:
                    weights[seen[key]] += 1.0
                else:
                    seen[key] = len(coalitions)
                    coalitions.append(coalition)
                    weights.append(1.0)
                    left -= 1
        drawn = torch.tensor(weights[n_fixed:], dtype=torch.float64)
        if drawn.numel():
            weights[n_fixed:] = (drawn * float(size_weight[n_full:].sum()) / drawn.sum()).tolist()
    return torch.stack(coalitions), torch.tensor(weights, dtype=torch.float64)


def lime_coalitions(n_features: int, n_samples: int, generator: torch.Generator) -> torch.Tensor:
    """LIME's samples of interpretable inputs (as lime's image explainer draws them): the first is the input itself
    (all features on); each other one switches off a uniform number ``1..M`` of uniformly chosen features.

    Example:
        >>> z = lime_coalitions(4, 3, torch.Generator().manual_seed(0))
        >>> z.shape, z[0].tolist()
        (torch.Size([3, 4]), [1.0, 1.0, 1.0, 1.0])
    """
    M = n_features
    out = torch.ones(n_samples, M, dtype=torch.float64)
    if n_samples > 1:
        n_off = torch.randint(1, M + 1, (n_samples - 1,), generator=generator)
        order = torch.rand(n_samples - 1, M, generator=generator).argsort(dim=1)
        out[1:] = (order >= n_off[:, None]).double()  # the first n_off positions of a random order are off
    return out


#: ``None`` (the default groups), an integer tensor, or for structured inputs a tuple / dict mirroring them (one mask
#: or None per tensor; entries of integer tensors are ignored).
FeatureMask = Union[None, torch.Tensor, Sequence[Optional[torch.Tensor]], Mapping[str, Optional[torch.Tensor]]]
#: a float, a tensor, or for structured inputs a tuple / dict mirroring them (a float, tensor or None = 0 per tensor).
Baseline = Union[float, torch.Tensor, Sequence[Any], Mapping[str, Any]]


def check_baseline(baseline: Any) -> Baseline:
    """A float, a tensor, or a tuple / dict of them (broadcast to the inputs on each call)."""
    entries = list(baseline.values()) if isinstance(baseline, Mapping) else (
        list(baseline) if isinstance(baseline, (tuple, list)) else [baseline])
    for entry in entries:
        if isinstance(entry, bool) or not (entry is None or isinstance(entry, (int, float, torch.Tensor))):
            raise TypeError(
                "baseline must be a float or a tensor broadcastable to the inputs (for tuple or dict inputs also a"
                f" tuple or dict of them mirroring the inputs), got {type(entry).__name__}"
            )
    return baseline


def check_feature_mask(feature_mask: Any) -> FeatureMask:
    """None (the default groups), an integer tensor, or a tuple / dict of them (one per input tensor)."""
    masks = [feature_mask] if feature_mask is None or isinstance(feature_mask, torch.Tensor) else (
        list(feature_mask.values()) if isinstance(feature_mask, Mapping) else feature_mask)
    if isinstance(masks, (str, bytes)) or not isinstance(masks, Sequence) or not all(
        m is None or isinstance(m, torch.Tensor) for m in masks
    ):
        raise TypeError(
            "feature_mask must be None (one feature per column, a grid of patches for images), an integer tensor of"
            " group ids broadcastable to the inputs, or a tuple or dict of them (one per input tensor); got"
            f" {type(feature_mask).__name__}"
        )
    for m in masks:
        if m is not None and (m.is_floating_point() or m.is_complex()):
            raise TypeError(
                f"feature_mask must hold integer group ids, got dtype {m.dtype}; convert it with .long()"
            )
    return feature_mask


def baseline_like(baseline: Union[float, torch.Tensor], x: torch.Tensor, argument: str = "baseline") -> torch.Tensor:
    """``baseline`` broadcast to ``x`` (same dtype and device)."""
    if not isinstance(baseline, torch.Tensor):
        return torch.full_like(x, float(baseline))
    try:
        return torch.broadcast_to(baseline.to(device=x.device, dtype=x.dtype), x.shape)
    except RuntimeError:
        raise ValueError(
            f"{argument} of shape {tuple(baseline.shape)} does not broadcast to the inputs' shape {tuple(x.shape)}"
        ) from None


def _per_attributed_leaf(value: Any, inputs: ModelInputs, argument: str, default: Any) -> list[Any]:
    """One entry of a user's per-input option (a mask, a baseline) per attributed leaf of ``inputs``."""
    n = sum(inputs.is_attributed)
    if value is None or not isinstance(value, (tuple, list, Mapping)):
        if isinstance(value, torch.Tensor) and n > 1:
            raise ValueError(
                f"{argument}: one tensor for inputs with {n} floating-point tensors {inputs.describe()}; give a"
                f" {'dict' if inputs.structure == 'dict' else 'tuple'} mirroring the inputs (None for the default)"
            )
        return [value if value is not None else default] * n if not isinstance(value, torch.Tensor) else [value]
    if inputs.structure == "tensor":
        raise TypeError(f"{argument}: a {type(value).__name__} for a single input tensor; give one tensor")
    entries = inputs.unpack(value, argument)
    return [default if e is None or e is ... else e for e, a in zip(entries, inputs.is_attributed) if a]


class PerturbationAttribution(Attribution):
    """Base of the methods that explain through coalitions of feature groups (see the module docstring).

    Subclasses implement :meth:`_group_values`: given the number of groups ``M``, a function evaluating the target
    score of coalitions and the clean scores, they return one value per group and example. The target class is
    resolved on the unperturbed input. Forward passes only, under ``torch.no_grad()``.

    Inputs may be a tensor, a tuple of tensors (``model(*inputs)``) or a dict (``model(**inputs)``), with
    ``forward_kwargs=`` for arguments that are never perturbed. Every floating-point tensor is perturbed and gets
    attributions of its shape; integer and boolean tensors (token ids, masks, categorical codes) keep their values
    in every coalition and come back unchanged.

    Args:
        model: the classifier (any output :func:`~lightning_lens.attribution.base.model_scores` takes, or
            ``output_fn``).
        baseline: the value a switched-off feature takes: a float (default 0) or a tensor broadcastable to the inputs;
            for tuple or dict inputs also a tuple or dict mirroring them (``None`` entries: 0).
        feature_mask: feature groups, see :func:`feature_groups`; ``None``: one feature per column of ``(B, F)``
            inputs, a 4x4 grid of patches of the spatial dims (all channels together) of ``(B, C, *spatial)`` inputs.
            For tuple or dict inputs a tuple or dict mirroring them (``None`` entries: the default groups, distinct
            from the other tensors'); the same id in two tensors is one group.
        batch_size: most rows per forward pass; ``None`` picks whole coalitions of the batch within a budget of
            ``2**17`` input elements per pass. Results do not depend on it.
        eval_mode, output_fn: see :class:`~lightning_lens.attribution.base.Attribution`.
    """

    call_options: tuple[str, ...] = ("baseline", "feature_mask", "batch_size")  # type: ignore[misc]
    supports_structured = True

    def __init__(
        self,
        model: nn.Module,
        baseline: Baseline = 0.0,
        feature_mask: FeatureMask = None,
        batch_size: Optional[int] = None,
        *,
        eval_mode: bool = True,
        output_fn: Optional[OutputFn] = None,
    ) -> None:
        super().__init__(model, eval_mode=eval_mode, output_fn=output_fn)
        self.baseline = check_baseline(baseline)
        self.feature_mask = check_feature_mask(feature_mask)
        self.batch_size = check_batch_size(batch_size)

    def _check_option(self, key: str, value: Any) -> Any:
        if key == "baseline":
            return check_baseline(value)
        if key == "feature_mask":
            return check_feature_mask(value)
        if key == "batch_size":
            return check_batch_size(value)
        if key == "n_samples":
            return check_int(value, "n_samples", minimum=1)
        if key == "seed":
            return check_seed(value)
        return value

    def _attribute(  # type: ignore[override]
        self,
        inputs: ModelInputs,
        target: Target,
        *,
        baseline: Baseline,
        feature_mask: FeatureMask,
        batch_size: Optional[int],
        **options: Any,
    ) -> list[torch.Tensor]:
        leaves = [t.detach() for t in inputs.attributed]
        masks = _per_attributed_leaf(feature_mask, inputs, "feature_mask", None)
        fills = _per_attributed_leaf(baseline, inputs, "baseline", 0.0)
        keys = inputs.attributed_keys
        bases = [baseline_like(b, x, "baseline" if inputs.structure == "tensor" else f"baseline[{k!r}]")
                 for b, x, k in zip(fills, leaves, keys)]

        def score(perturbed: list[torch.Tensor], b0: int, b1: int, k: int, target_rows: torch.Tensor) -> torch.Tensor:
            return target_scores(self.logits(inputs.rows(b0, b1).repeat(k).with_attributed(perturbed)), target_rows)

        def clean_logits(rows: int) -> torch.Tensor:  # each slice cloned: the model may modify its input in place
            return torch.cat([self.logits(inputs.rows(b0, min(b0 + rows, inputs.batch_size)).cloned())
                              for b0 in range(0, inputs.batch_size, rows)])

        return self._explain(leaves, bases, masks, target, batch_size, score, clean_logits, options, inputs)

    def _explain(
        self,
        inputs: list[torch.Tensor],
        baselines: list[torch.Tensor],
        feature_mask: list[Optional[torch.Tensor]],
        target: Target,
        batch_size: Optional[int],
        score: ScoreFn,
        clean_logits: Callable[[int], torch.Tensor],
        options: dict[str, Any],
        model_inputs: ModelInputs,
    ) -> list[torch.Tensor]:
        """Per-element attributions of every attributed tensor."""
        index, counts = feature_groups(inputs, feature_mask)
        batch, per_row = inputs[0].shape[0], model_inputs.elements_per_row
        device = inputs[0].device
        with torch.no_grad():
            logits = clean_logits(resolve_batch_size(batch_size, batch, per_row))
            resolved = resolve_target(target, logits)
            clean = target_scores(logits, resolved).double()
            values = torch.zeros(batch, int(counts.max()), dtype=torch.float64, device=device)
            # examples with the same number of groups share their coalitions (one batched evaluation)
            for b0, b1, m in equal_count_runs(counts):
                rows = resolve_batch_size(batch_size, b1 - b0, per_row)
                part = ([x[b0:b1] for x in inputs], [z[b0:b1] for z in baselines], [i[b0:b1] for i in index])

                def evaluate(coalitions: torch.Tensor, part: tuple = part, b0: int = b0, b1: int = b1,
                             rows: int = rows) -> torch.Tensor:
                    return coalition_scores(score, *part, coalitions, resolved[b0:b1], rows, offset=b0)

                values[b0:b1, :m] = self._group_values(m, evaluate, clean[b0:b1], **options).to(device)
        return [expand_groups(values, i).to(x.dtype) for i, x in zip(index, inputs)]

    def _group_values(
        self, n_groups: int, evaluate: Callable[[torch.Tensor], torch.Tensor], clean: torch.Tensor, **options: Any
    ) -> torch.Tensor:
        """``(B, M)`` values of the groups, from ``evaluate(coalitions (n, M)) -> (n, B)`` scores and the ``(B,)``
        scores of the unperturbed inputs."""
        raise NotImplementedError
