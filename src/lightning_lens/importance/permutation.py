"""Permutation importance: how much a model's score drops when a feature is shuffled across the examples."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lens.attribution._batching import check_batch_size, default_rows, logits_in_blocks
from lightning_lens.attribution._inputs import Inputs, ModelInputs
from lightning_lens.attribution._perturbation import default_feature_mask
from lightning_lens.attribution.base import OutputFn
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


def _leaf_groups(batch: ModelInputs, feature_mask: Any) -> list[tuple[torch.Tensor, int]]:
    """Per leaf of ``batch``: the group index of every element of one example (flattened) and the number of groups."""
    if feature_mask is None:
        masks: list[Any] = [None] * len(batch.leaves)
    elif batch.structure == "tensor":
        masks = [feature_mask]
    else:
        masks = [None if m is ... else m for m in batch.unpack(feature_mask, "feature_mask")]
    out = []
    for key, leaf, mask in zip(batch.keys, batch.leaves, masks):
        example = leaf.shape[1:]
        where = "feature_mask" if batch.structure == "tensor" else f"feature_mask[{key!r}]"
        if mask is None:
            mask = default_feature_mask(example) if len(example) else torch.zeros((), dtype=torch.long)
        elif not isinstance(mask, torch.Tensor) or mask.is_floating_point():
            raise TypeError(f"{where} must be an integer tensor of group ids broadcastable to one example, got"
                            f" {getattr(mask, 'dtype', type(mask).__name__)}")
        try:
            mask = torch.broadcast_to(mask.to(leaf.device, torch.long), example)
        except RuntimeError:
            raise ValueError(f"{where} of shape {tuple(mask.shape)} does not broadcast to one example of shape"
                             f" {tuple(example)}; per-example masks make no sense for permutation importance") from None
        _, index = torch.unique(mask, return_inverse=True)
        out.append((index.reshape(-1), int(index.max()) + 1 if index.numel() else 0))
    return out


def _selected_features(batch: ModelInputs, groups: Sequence[tuple[torch.Tensor, int]], features: Any
                       ) -> list[tuple[int, int]]:
    """``(leaf position, group)`` of every feature to permute, in input order then group order."""
    if features is None:
        chosen = [(i, g) for i, (a, (_, n)) in enumerate(zip(batch.is_attributed, groups)) if a for g in range(n)]
        if not chosen:
            integer = [k for k, a in zip(batch.keys, batch.is_attributed) if not a]
            raise TypeError(
                f"inputs hold no floating-point tensor to permute ({batch.describe()}); to permute the columns (token"
                f" positions) of an integer input across examples, select it with features=[{integer[0]!r}]"
            )
        return chosen
    if isinstance(features, (str, int)) or not isinstance(features, Sequence):
        raise TypeError(f"features must be a list of input keys or (input key, feature index) pairs, got"
                        f" {type(features).__name__}")
    position = {k: i for i, k in enumerate(batch.keys)}
    chosen_set: set[tuple[int, int]] = set()
    for entry in features:
        key, group = (entry if isinstance(entry, tuple) and len(entry) == 2 else (entry, None))
        if isinstance(key, bool) or key not in position:
            raise ValueError(f"features names {entry!r}, but the inputs are {list(batch.keys)} (dict keys, or"
                             " positions of a tuple / 0 for one tensor); give an input key or an (input key, index)"
                             " pair")
        i = position[key]
        n = groups[i][1]
        if group is None:
            new = {(i, g) for g in range(n)}
        elif isinstance(group, int) and not isinstance(group, bool) and 0 <= group < n:
            new = {(i, group)}
        else:
            raise ValueError(f"features names {entry!r}, but input {key!r} has {n} features (indices 0 to {n - 1})")
        if new & chosen_set:
            raise ValueError(f"features selects {entry!r} twice; name each feature once")
        chosen_set |= new
    if not chosen_set:
        raise ValueError("features selects no feature; pass None for every floating-point column")
    return sorted(chosen_set)


def _default_name(batch: ModelInputs, leaf: int, group: int) -> str:
    return f"x{group}" if batch.structure == "tensor" else f"{batch.keys[leaf]}/{group}"


def permutation_importance(
    model: nn.Module,
    inputs: Inputs,
    targets: torch.Tensor,
    metric: Union[None, str, Metric] = None,
    n_repeats: int = 5,
    feature_mask: Any = None,
    feature_names: Optional[Sequence[str]] = None,
    seed: Optional[int] = 0,
    batch_size: Optional[int] = None,
    *,
    features: Optional[Sequence[Any]] = None,
    forward_kwargs: Optional[Mapping[str, Any]] = None,
    output_fn: Optional[OutputFn] = None,
) -> PermutationImportance:
    """Permutation importance (Breiman, "Random Forests", 2001; Fisher, Rudin and Dominici, JMLR 2019): the drop of
    ``metric`` when the values of one feature are shuffled across the examples, breaking its link to the target.

    ``inputs`` are what the attribution methods take: a tensor (``model(inputs)``), a tuple (``model(*inputs)``) or a
    dict of tensors (``model(**inputs)``). The features are the groups of ``feature_mask`` of each input (default: one
    per column of a ``(N, F)`` input, a 4x4 grid of patches for images, one for an ``(N,)`` input); by default every
    feature of every floating-point input is permuted, integer inputs (token ids, masks) are permuted only when
    ``features`` selects them (a token id column, i.e. one position, is shuffled across the examples).

    A feature group is shuffled as a whole: all its elements take the values of the same permuted rows. The features
    are taken in input order, then group order; repeat ``r`` of the ``f``-th feature uses the ``(f * n_repeats + r)``-th
    ``torch.randperm(N)`` of a private generator seeded with ``seed``. The model runs in eval mode (every submodule's
    mode restored afterwards) without autograd, in blocks of ``batch_size`` rows.

    Args:
        model: returns ``(N, C)`` logits, or ``(N,)`` / ``(N, 1)`` scores (a regression or a binary logit); a tuple's
            first element or a mapping's ``"logits"`` (a HuggingFace ``ModelOutput``) is used, or ``output_fn``.
        inputs: ``(N, ...)`` examples, e.g. ``(N, F)`` tabular rows; or a tuple / dict of such tensors.
        targets: ``(N,)`` class indices or regression targets.
        metric: ``"accuracy"`` (the default for classifiers: ``(N, C)`` logits, or one logit per example with integer
            targets), ``"neg_log_loss"``, ``"neg_mse"`` (the default for one output per example with float targets),
            or a callable ``(outputs, targets) -> float``; higher is better.
        n_repeats: shuffles per feature.
        feature_mask: integer group ids broadcastable to one example (a group is shuffled together); for a tuple or
            dict of inputs, a tuple / dict of such masks mirroring them (``None`` or a missing key: the default).
        feature_names: one name per permuted feature (default ``"x0"``, ``"x1"``, ... for one tensor,
            ``"<input>/<index>"`` for a dict or tuple, e.g. ``"age/0"``).
        seed: the generator's seed; ``None`` draws from OS entropy. The global RNG is untouched.
        batch_size: rows per forward; default within the attribution methods' element budget.
        features: the features to permute: a list of input keys (dict keys, tuple positions, ``0`` for one tensor:
            every feature of that input) or ``(key, index)`` pairs (one feature); default every feature of every
            floating-point input.
        forward_kwargs: extra keyword arguments of the model's forward, never permuted (tensors with one row per
            example follow their rows).
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
        >>> class TwoInputs(torch.nn.Module):
        ...     def forward(self, a, b):
        ...         return a[:, :1] + 0.0 * b
        >>> both = permutation_importance(TwoInputs(), {"a": x, "b": x[:, :1]}, x[:, 0])
        >>> both.feature_names, float(both.importances_mean[1])
        (('a/0', 'a/1', 'b/0'), 0.0)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(inputs, torch.Tensor):
        check_tensor(inputs, "inputs", floating=False, min_dim=1)
    targets = check_tensor(targets, "targets", floating=False, min_dim=1)
    n_repeats = check_int(n_repeats, "n_repeats", minimum=1)
    seed = None if seed is None else check_int(seed, "seed")
    batch_size = check_batch_size(batch_size)
    if isinstance(inputs, torch.Tensor) and feature_mask is not None and not isinstance(feature_mask, torch.Tensor):
        raise TypeError(f"feature_mask must be an integer tensor of group ids broadcastable to one example, got"
                        f" {type(feature_mask).__name__}")
    with gradients_enabled(), preserve_modes(model, mode=False), torch.no_grad():
        batch = ModelInputs.from_user(inputs, forward_kwargs)  # normal tensors even under inference mode
        n = batch.batch_size
        if targets.shape[0] != n:
            raise ValueError(f"targets must hold one entry per example: {n} inputs, {targets.shape[0]} targets")
        groups = _leaf_groups(batch, feature_mask)
        chosen = _selected_features(batch, groups, features)
        if feature_names is None:
            names = tuple(_default_name(batch, i, g) for i, g in chosen)
        else:
            if isinstance(feature_names, str) or not isinstance(feature_names, Sequence):
                raise TypeError(f"feature_names must be a list of str, got {type(feature_names).__name__}")
            names = tuple(str(name) for name in feature_names)
            if len(names) != len(chosen):
                raise ValueError(f"feature_names holds {len(names)} names for {len(chosen)} features (groups); give"
                                 " one each")
        rows = batch_size if batch_size is not None else default_rows(max(batch.elements_per_row, 1))
        gen = private_generator(seed)
        scores = np.zeros((len(chosen), n_repeats))
        y = targets.detach().clone()
        outputs = logits_in_blocks(model, batch, rows, output_fn).detach()
        name, score = _metric(metric, outputs, y)
        baseline = float(score(outputs, y))
        leaves = list(batch.leaves)
        flat = [leaf.reshape(n, -1) for leaf in leaves]
        shuffled: dict[int, torch.Tensor] = {}  # one copy per permuted input: a feature's columns are put back after
        for f, (i, g) in enumerate(chosen):
            columns = (groups[i][0] == g).nonzero().squeeze(1).to(flat[i].device)
            original = flat[i][:, columns]
            copy = shuffled.setdefault(i, flat[i].clone())
            permuted = batch.with_leaves(leaves[:i] + [copy.view_as(leaves[i])] + leaves[i + 1:])
            for r in range(n_repeats):
                perm = torch.randperm(n, generator=gen).to(original.device)
                copy[:, columns] = original[perm]
                scores[f, r] = float(score(logits_in_blocks(model, permuted, rows, output_fn).detach(), y))
            copy[:, columns] = original
    importances = baseline - scores
    return PermutationImportance(
        importances_mean=importances.mean(axis=1),
        importances_std=importances.std(axis=1),
        importances=importances,
        feature_names=names,
        baseline_score=baseline,
        metric=name,
    )
