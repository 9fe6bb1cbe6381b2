"""Permutation importance: how much a model's score drops when a feature is shuffled across the examples."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lens.attribution._batching import check_batch_size, default_rows
from lightning_lens.attribution._perturbation import default_feature_mask
from lightning_lens.attribution.base import OutputFn, forward_logits
from lightning_lens.utils import gradients_enabled, preserve_modes
from lightning_lens.utils.checks import check_int, check_tensor
from lightning_lens.utils.rng import private_generator

__all__ = ["METRICS", "PermutationImportance", "permutation_importance"]

Metric = Callable[[torch.Tensor, torch.Tensor], float]


def _single_score(outputs: torch.Tensor) -> bool:
    return outputs.dim() == 1 or outputs.shape[1] == 1


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """The fraction of correct predictions: the argmax of ``(N, C)`` logits, or ``score > 0`` for one score per
    example (a binary classifier's logit).

    Example:
        >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]))
        0.5
    """
    predicted = (outputs.reshape(-1) > 0).long() if _single_score(outputs) else outputs.argmax(dim=1)
    return float((predicted == targets.reshape(-1).long()).double().mean())


def neg_log_loss(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Minus the mean cross-entropy of logits (a binary cross-entropy for one logit per example), as scikit-learn's
    ``"neg_log_loss"`` scorer on ``softmax(logits)``.

    Example:
        >>> round(neg_log_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([1])), 4)
        -0.6931
    """
    if _single_score(outputs):
        return -float(F.binary_cross_entropy_with_logits(outputs.detach().reshape(-1).double(),
                                                         targets.reshape(-1).double()))
    return -float(F.cross_entropy(outputs.detach().double(), targets.reshape(-1).long()))


def neg_mse(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Minus the mean squared error of one output per example (scikit-learn's ``"neg_mean_squared_error"``).

    Example:
        >>> neg_mse(torch.tensor([[1.0], [3.0]]), torch.tensor([1.0, 1.0]))
        -2.0
    """
    if not _single_score(outputs) and outputs.shape != targets.shape:
        raise ValueError(
            f"metric='neg_mse' needs one output per example (or outputs shaped like the targets), got outputs of shape"
            f" {tuple(outputs.shape)} for targets of shape {tuple(targets.shape)}"
        )
    predicted = outputs.reshape(targets.shape) if _single_score(outputs) else outputs
    return -float((predicted.double() - targets.double()).square().mean())


#: the metrics known by name (higher is better); aliases follow scikit-learn's scorer names.
METRICS: dict[str, Metric] = {
    "accuracy": accuracy,
    "neg_log_loss": neg_log_loss,
    "neg_mse": neg_mse,
    "neg_mean_squared_error": neg_mse,
}


@dataclasses.dataclass(frozen=True)
class PermutationImportance:
    """The result of :func:`permutation_importance`, with the fields of scikit-learn's.

    Attributes:
        importances_mean: ``(n_features,)`` mean drop of the score over the repeats.
        importances_std: ``(n_features,)`` their standard deviation (``ddof=0``, as scikit-learn).
        importances: ``(n_features, n_repeats)`` the drop of every repeat: ``baseline_score - score``.
        feature_names: one name per feature (group).
        baseline_score: the score on the unshuffled data.
        metric: the metric's name.
    """

    importances_mean: np.ndarray
    importances_std: np.ndarray
    importances: np.ndarray
    feature_names: tuple[str, ...]
    baseline_score: float
    metric: str

    def ranking(self) -> list[tuple[str, float]]:
        """``(name, mean importance)`` from the most to the least important feature."""
        order = np.argsort(-self.importances_mean, kind="stable")
        return [(self.feature_names[i], float(self.importances_mean[i])) for i in order]

    def __getitem__(self, key: str) -> Any:  # dict-style access, as scikit-learn's Bunch
        return getattr(self, key)


def _outputs(model: nn.Module, inputs: torch.Tensor, rows: int, output_fn: Optional[OutputFn]) -> torch.Tensor:
    """The model's ``(N, C)`` scores on ``inputs`` in blocks of ``rows`` (see
    :func:`~lightning_lens.attribution.base.model_scores`: a tuple's first element, a mapping's ``"logits"``, ``(N,)``
    as ``(N, 1)``, or ``output_fn``)."""
    return torch.cat([forward_logits(model, inputs[b0 : b0 + rows].clone(), output_fn).detach()
                      for b0 in range(0, inputs.shape[0], rows)])


def _metric(metric: Union[None, str, Metric], outputs: torch.Tensor, targets: torch.Tensor) -> tuple[str, Metric]:
    if metric is None:  # a classifier (logits, or one logit with integer labels): accuracy; a regression: neg_mse
        name = "neg_mse" if _single_score(outputs) and targets.is_floating_point() else "accuracy"
        return name, METRICS[name]
    if isinstance(metric, str):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {sorted(METRICS)} or a callable (outputs, targets) -> float, got"
                             f" {metric!r}")
        return metric, METRICS[metric]
    if callable(metric):
        return getattr(metric, "__name__", "metric"), metric
    raise TypeError(f"metric must be a name ({sorted(METRICS)}) or a callable (outputs, targets) -> float, got"
                    f" {type(metric).__name__}")


def permutation_importance(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    metric: Union[None, str, Metric] = None,
    n_repeats: int = 5,
    feature_mask: Optional[torch.Tensor] = None,
    feature_names: Optional[Sequence[str]] = None,
    seed: Optional[int] = 0,
    batch_size: Optional[int] = None,
    *,
    output_fn: Optional[OutputFn] = None,
) -> PermutationImportance:
    """Permutation importance (Breiman, "Random Forests", 2001; Fisher, Rudin and Dominici, JMLR 2019): the drop of
    ``metric`` when the values of one feature are shuffled across the examples, breaking its link to the target.

    A feature group (``feature_mask``) is shuffled as a whole: all its columns take the values of the same permuted
    rows. Repeat ``r`` of group ``g`` (groups in increasing id order) uses the ``(g * n_repeats + r)``-th
    ``torch.randperm(N)`` of a private generator seeded with ``seed``. The model runs in eval mode (every submodule's
    mode restored afterwards) without autograd, in blocks of ``batch_size`` rows.

    Args:
        model: returns ``(N, C)`` logits, or ``(N,)`` / ``(N, 1)`` scores (a regression or a binary logit); a tuple's
            first element or a mapping's ``"logits"`` (a HuggingFace ``ModelOutput``) is used, or ``output_fn``.
        inputs: ``(N, ...)`` floating-point examples, e.g. ``(N, F)`` tabular rows.
        targets: ``(N,)`` class indices or regression targets.
        metric: ``"accuracy"`` (the default for classifiers: ``(N, C)`` logits, or one logit per example with integer
            targets), ``"neg_log_loss"``, ``"neg_mse"`` (the default for one output per example with float targets),
            or a callable ``(outputs, targets) -> float``; higher is better.
        n_repeats: shuffles per feature.
        feature_mask: integer group ids broadcastable to one example (a group is shuffled together); default one
            feature per column of ``(N, F)`` inputs, a 4x4 grid of patches for images.
        feature_names: one name per feature group (default ``"x0"``, ``"x1"``, ...).
        seed: the generator's seed; ``None`` draws from OS entropy. The global RNG is untouched.
        batch_size: rows per forward; default within the attribution methods' element budget.
        output_fn: maps the model's output to ``(N, C)`` or ``(N,)`` scores (as the attribution methods' ``output_fn``).

    Returns:
        a :class:`PermutationImportance` (``importances_mean``, ``importances_std``, ``importances``,
        ``feature_names``, ``baseline_score``).

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, 0.0]]))
        >>> x = torch.randn(100, 2)
        >>> result = permutation_importance(model, x, model(x).detach().squeeze(1))
        >>> result.ranking()[0][0], float(result.importances_mean[1])
        ('x0', 0.0)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    inputs = check_tensor(inputs, "inputs")
    targets = check_tensor(targets, "targets", floating=False, min_dim=1)
    if targets.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"targets must hold one entry per example: {inputs.shape[0]} inputs, {targets.shape[0]} targets"
        )
    n_repeats = check_int(n_repeats, "n_repeats", minimum=1)
    seed = None if seed is None else check_int(seed, "seed")
    batch_size = check_batch_size(batch_size)
    example = inputs.shape[1:]
    if feature_mask is None:
        mask = default_feature_mask(example)
    else:
        if not isinstance(feature_mask, torch.Tensor) or feature_mask.is_floating_point():
            raise TypeError("feature_mask must be an integer tensor of group ids broadcastable to one example, got"
                            f" {getattr(feature_mask, 'dtype', type(feature_mask).__name__)}")
        mask = feature_mask
    try:
        mask = torch.broadcast_to(mask.to(inputs.device, torch.long), example)
    except RuntimeError:
        raise ValueError(f"feature_mask of shape {tuple(mask.shape)} does not broadcast to one example of shape"
                         f" {tuple(example)}; per-example masks make no sense for permutation importance") from None
    ids, index = torch.unique(mask, return_inverse=True)
    n_groups = ids.numel()
    if feature_names is None:
        names = tuple(f"x{g}" for g in range(n_groups))
    else:
        if isinstance(feature_names, str) or not isinstance(feature_names, Sequence):
            raise TypeError(f"feature_names must be a list of str, got {type(feature_names).__name__}")
        names = tuple(str(n) for n in feature_names)
        if len(names) != n_groups:
            raise ValueError(f"feature_names holds {len(names)} names for {n_groups} features (groups); give one each")
    rows = batch_size if batch_size is not None else default_rows(int(np.prod(example)) if len(example) else 1)
    n = inputs.shape[0]
    gen = private_generator(seed)
    scores = np.zeros((n_groups, n_repeats))
    with gradients_enabled(), preserve_modes(model, mode=False), torch.no_grad():
        x = inputs.detach().clone()  # a normal tensor even under inference mode
        y = targets.detach().clone()
        outputs = _outputs(model, x, rows, output_fn)
        name, score = _metric(metric, outputs, y)
        baseline = float(score(outputs, y))
        flat = x.reshape(n, -1)
        shuffled = flat.clone()  # one copy: each group's columns are shuffled in place, then put back
        for g in range(n_groups):
            columns = (index.reshape(-1) == g).nonzero().squeeze(1)
            original = flat[:, columns]
            for r in range(n_repeats):
                perm = torch.randperm(n, generator=gen).to(x.device)
                shuffled[:, columns] = original[perm]
                scores[g, r] = float(score(_outputs(model, shuffled.view_as(x), rows, output_fn), y))
            shuffled[:, columns] = original
    importances = baseline - scores
    return PermutationImportance(
        importances_mean=importances.mean(axis=1),
        importances_std=importances.std(axis=1),
        importances=importances,
        feature_names=names,
        baseline_score=baseline,
        metric=name,
    )
