"""Tabular attributions as bar charts: per-probe feature attributions and a global importance chart with error bars.

Built through matplotlib's object API (:func:`~lightning_lens.render.figures.new_figure`): no pyplot state. Signed
bars use the diverging colormap's ends (red positive, blue negative), as the heatmaps do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import torch

from lightning_lens.render.figures import figure_to_array, new_figure
from lightning_lens.render.heatmap import DIVERGING_CMAP, colorize
from lightning_lens.utils.checks import check_int, check_optional

__all__ = ["feature_bars", "importance_chart", "top_features"]

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[float], Sequence[Sequence[float]]]


def _array(values: ArrayLike, argument: str, ndim: int) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    arr = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if arr.ndim != ndim:
        raise ValueError(f"{argument} must have {ndim} dimension(s), got shape {arr.shape}")
    return arr


def _names(feature_names: Optional[Sequence[str]], n: int) -> list[str]:
    if feature_names is None:
        return [f"x{j}" for j in range(n)]
    names = [str(f) for f in feature_names]
    if len(names) != n:
        raise ValueError(f"feature_names has {len(names)} names for {n} features")
    return names


def top_features(values: ArrayLike, top_k: Optional[int] = None) -> np.ndarray:
    """Indices of the ``top_k`` largest ``|values|`` (all when None), largest first; ties keep column order.

    Example:
        >>> top_features([0.1, -3.0, 2.0], top_k=2).tolist()
        [1, 2]
    """
    v = np.abs(_array(values, "values", 1))
    check_optional(check_int, top_k, "top_k", minimum=1)
    order = np.argsort(-v, kind="stable")
    return order if top_k is None else order[:top_k]


def _signed_colors(values: np.ndarray) -> list[tuple[float, float, float]]:
    ends = colorize(np.sign(values) * 0.85, True, DIVERGING_CMAP).reshape(-1, 3) / 255.0
    return [tuple(float(c) for c in row) for row in ends]  # type: ignore[misc]


def feature_bars(
    attributions: ArrayLike,
    feature_names: Optional[Sequence[str]] = None,
    labels: Optional[Sequence[str]] = None,
    top_k: int = 10,
    ncols: int = 2,
    title: str = "",
) -> np.ndarray:
    """One horizontal bar chart per row of ``attributions`` (a probe): its ``top_k`` features by ``|attribution|``,
    largest on top, red positive and blue negative; as a uint8 (H, W, 3) image.

    Args:
        attributions: (probes, features) attributions.
        feature_names: one name per feature (default ``x0, x1, ...``).
        labels: one title per probe (e.g. ``"#12 y=1 pred=1 (0.93)"``).
        top_k: features shown per probe.
        ncols: charts per row of the image.
        title: a title above everything.

    Example:
        >>> img = feature_bars([[0.5, -1.0, 0.1]], ["age", "dose", "bmi"], labels=["#0 y=1"], top_k=2)
        >>> img.dtype, img.ndim
        (dtype('uint8'), 3)
    """
    a = _array(attributions, "attributions", 2)
    names = _names(feature_names, a.shape[1])
    check_int(top_k, "top_k", minimum=1)
    check_int(ncols, "ncols", minimum=1)
    if labels is not None and len(labels) != a.shape[0]:
        raise ValueError(f"labels has {len(labels)} entries for {a.shape[0]} probes")
    k = min(top_k, a.shape[1])
    cols = min(ncols, a.shape[0])
    rows = -(-a.shape[0] // cols)
    fig, axes = new_figure(rows, cols, figsize=(4.2 * cols, 0.28 * k * rows + 1.0 * rows + 0.4))
    axes = np.atleast_1d(axes).reshape(-1)
    for i, ax in enumerate(axes):
        if i >= a.shape[0]:
            ax.set_axis_off()
            continue
        order = top_features(a[i], k)[::-1]  # largest on top
        values = a[i, order]
        ax.barh(np.arange(k), values, color=_signed_colors(values))
        ax.set_yticks(np.arange(k))
        ax.set_yticklabels([names[j] for j in order], fontsize=7)
        ax.axvline(0.0, color="0.3", linewidth=0.6)
        ax.tick_params(axis="x", labelsize=7)
        if labels is not None:
            ax.set_title(str(labels[i]), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return figure_to_array(fig)


def importance_chart(
    mean: ArrayLike,
    std: Optional[ArrayLike] = None,
    feature_names: Optional[Sequence[str]] = None,
    top_k: int = 15,
    title: str = "",
    xlabel: str = "importance (drop in score)",
) -> np.ndarray:
    """A horizontal bar chart of global feature importances with ``std`` error bars, ``top_k`` features by
    ``|mean|``, largest on top; as a uint8 (H, W, 3) image.

    Example:
        >>> img = importance_chart([0.3, 0.01, 0.1], [0.02, 0.01, 0.03], ["leak", "age", "dose"], top_k=2)
        >>> img.dtype, img.ndim
        (dtype('uint8'), 3)
    """
    m = _array(mean, "mean", 1)
    s = np.zeros_like(m) if std is None else _array(std, "std", 1)
    if s.shape != m.shape:
        raise ValueError(f"std has {s.shape[0]} values for {m.shape[0]} features")
    names = _names(feature_names, m.shape[0])
    check_int(top_k, "top_k", minimum=1)
    order = top_features(m, top_k)[::-1]
    k = len(order)
    fig, ax = new_figure(figsize=(5.5, 0.3 * k + 1.2))
    ax.barh(np.arange(k), m[order], xerr=s[order], color=_signed_colors(m[order]), ecolor="0.2", capsize=2)
    ax.set_yticks(np.arange(k))
    ax.set_yticklabels([names[j] for j in order], fontsize=8)
    ax.axvline(0.0, color="0.3", linewidth=0.6)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return figure_to_array(fig)
