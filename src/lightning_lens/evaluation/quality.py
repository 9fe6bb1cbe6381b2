"""One entry point that computes a chosen set of explanation-quality metrics as flat ``{key: float}`` scalars.

This is what :class:`~lightning_lens.callbacks.SaliencyMapCallback` calls on its probe set (logging every key as
``quality/<method>/<key>``), and what a user calls on any batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import nn

from lightning_lens.attribution.base import Attribution, OutputFn
from lightning_lens.attribution.registry import MethodSpec, resolve_method
from lightning_lens.evaluation._common import model_device
from lightning_lens.evaluation.faithfulness import perturbation_curve
from lightning_lens.evaluation.localization import (
    pointing_game,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
)
from lightning_lens.evaluation.robustness import max_sensitivity
from lightning_lens.utils.checks import check_differentiable_inputs, check_tensor
from lightning_lens.utils.targets import Target

__all__ = [
    "CHEAP_METRICS",
    "COSTLY_METRICS",
    "MASK_METRICS",
    "QUALITY_METRICS",
    "available_quality_metrics",
    "compute_quality",
]

#: Localization metrics: need ground-truth masks, cost nothing beyond the attributions.
MASK_METRICS = ("pointing_game", "relevance_mass", "relevance_rank")
#: Perturbation and robustness metrics: each costs forwards (deletion/insertion: ``n_steps + 1`` per example and per
#: ordering) or whole explanations (max-sensitivity: ``n_samples`` per example).
COSTLY_METRICS = (
    "deletion_auc",
    "deletion_auc_random",
    "insertion_auc",
    "insertion_auc_random",
    "max_sensitivity",
)
CHEAP_METRICS = MASK_METRICS
QUALITY_METRICS = COSTLY_METRICS[:4] + MASK_METRICS + COSTLY_METRICS[4:]

_LOCALIZERS = {
    "pointing_game": pointing_game,
    "relevance_mass": relevance_mass_accuracy,
    "relevance_rank": relevance_rank_accuracy,
}
_OPTION_KEYS = ("deletion", "insertion") + MASK_METRICS + ("max_sensitivity",)


def available_quality_metrics() -> list[str]:
    """Names :func:`compute_quality` accepts in ``metrics``.

    Example:
        >>> "relevance_mass" in available_quality_metrics()
        True
    """
    return list(QUALITY_METRICS)


def _resolve_method(method: Optional[MethodSpec], model: nn.Module) -> Optional[Attribution]:
    """The method object for ``model`` (:func:`~lightning_lens.attribution.resolve_method`), or None."""
    return None if method is None else resolve_method(method, model)


def compute_quality(
    model: nn.Module,
    method: Optional[MethodSpec],
    inputs: torch.Tensor,
    attributions: Optional[torch.Tensor],
    targets: Target,
    masks: Optional[Mapping[str, torch.Tensor]],
    metrics: Sequence[str],
    *,
    options: Optional[Mapping[str, Mapping[str, Any]]] = None,
    batch_size: Optional[int] = None,
    seed: int = 0,
    output_fn: Optional[OutputFn] = None,
) -> dict[str, float]:
    """Explanation-quality scalars of one method on one batch.

    Args:
        model: the classifier (``(B, classes)`` logits); evaluated in eval mode, every module's mode restored.
        method: the method that produced ``attributions``, as :func:`lightning_lens.attribution.resolve_method` takes
            it (a method object, a registry name, a method class, or an explain function
            ``(model, inputs, target) -> maps``). Needed for ``max_sensitivity`` and when ``attributions`` is None.
        inputs: ``(B, C, H, W)`` images (or ``(B, ...)``), on the model's device or movable there.
        attributions: the method's maps of ``inputs`` (inputs' shape or ``(B, 1, H, W)``), or None to compute them.
        targets: the explained classes: int, ``(B,)`` indices, or None for the model's predictions.
        masks: ground-truth region masks ``{region: (B, [1,] H, W)}`` (needed by the localization metrics).
        metrics: names from :data:`QUALITY_METRICS`.
        options: per-metric keyword arguments, keyed by ``"deletion"``, ``"insertion"``, ``"pointing_game"``,
            ``"relevance_mass"``, ``"relevance_rank"`` or ``"max_sensitivity"``, e.g.
            ``{"deletion": {"n_steps": 16, "substrate": "mean"}, "pointing_game": {"tolerance": 2}}``.
        batch_size: the most perturbed inputs per forward (deletion/insertion; default: an element budget, see
            :func:`~lightning_lens.evaluation.perturbation_curve`) or per explanation call
            (max-sensitivity, capped at 64).
        seed: seed of the private generators (random orderings, ties, perturbation noise).
        output_fn: maps the model's output to ``(B, classes)`` scores in every model call (predictions,
            deletion/insertion curves), as the attribution methods' ``output_fn``; default: the method's own
            ``output_fn`` (so a method built for a model returning a ``ModelOutput`` or a dict scores it the same way).

    Returns:
        ``{key: float}`` with these keys, in the order the metrics were asked for:

        * ``"deletion_auc"``, ``"insertion_auc"``: mean AUC of the attribution-ordered curves (target-class softmax
          probability over the removed/inserted fraction in [0, 1]; defaults: 32 steps, deletion substrate zeros,
          insertion substrate blur). Lower deletion / higher insertion is more faithful.
        * ``"deletion_auc_random"``, ``"insertion_auc_random"``: the same for a random ordering (the control).
        * for each localization metric ``m`` in ``pointing_game``, ``relevance_mass``, ``relevance_rank`` and each
          region ``r`` in ``masks``: ``"m/r"``, the mean score over examples whose ``r`` mask is non-empty, and
          ``"m/r_chance"``, the mean chance level (the masks' area fraction) over the same examples. A region whose
          masks are all empty in the batch yields no keys (and a warning).
        * ``"max_sensitivity"``: mean max-sensitivity (radius 0.02, 10 samples by default).

    Example:
        >>> from lightning_lens.attribution import Gradient
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
        >>> x, masks = torch.rand(2, 1, 4, 4), {"corner": torch.zeros(2, 1, 4, 4)}
        >>> masks["corner"][..., :2, :2] = 1
        >>> q = compute_quality(model, Gradient(model), x, None, torch.tensor([0, 1]), masks,
        ...                     ["relevance_mass", "deletion_auc"])
        >>> sorted(q)
        ['deletion_auc', 'relevance_mass/corner', 'relevance_mass/corner_chance']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(metrics, str) or not isinstance(metrics, Sequence):
        raise TypeError(f"metrics must be a sequence of metric names, e.g. ['relevance_mass'], got {metrics!r}")
    unknown = [m for m in metrics if m not in QUALITY_METRICS]
    if unknown:
        raise ValueError(f"metrics: unknown name(s) {unknown}; choose from {list(QUALITY_METRICS)}")
    options = dict(options or {})
    bad = [k for k in options if k not in _OPTION_KEYS]
    if bad:
        raise ValueError(f"options: unknown key(s) {bad}; use {list(_OPTION_KEYS)}")
    wanted = list(dict.fromkeys(metrics))
    if any(m in MASK_METRICS for m in wanted):
        if not masks:
            raise ValueError(
                f"metrics {[m for m in wanted if m in MASK_METRICS]} need ground-truth masks: pass masks={{region:"
                " tensor}} (a dict batch with '<region>_mask' keys provides them) or drop these metrics"
            )
        if not isinstance(masks, Mapping):
            raise TypeError(f"masks must be a dict {{region: (B, [1,] H, W) tensor}}, got {type(masks).__name__}")

    check_differentiable_inputs(inputs, "inputs")
    device = model_device(model, inputs.device)
    x = inputs.detach().to(device)
    if isinstance(targets, torch.Tensor):
        targets = targets.to(device)
    explainer = _resolve_method(method, model)
    if output_fn is None:
        output_fn = getattr(explainer, "output_fn", None)
    if attributions is None:
        if explainer is None:
            raise ValueError("pass attributions, or a method to compute them")
        attributions = explainer.attribute(x, target=targets)
    check_tensor(attributions, "attributions")
    attributions = attributions.detach().to(device)

    out: dict[str, float] = {}
    curves = {}
    for mode in ("deletion", "insertion"):
        asked = [m for m in wanted if m.startswith(mode)]
        if asked:
            kwargs = {"batch_size": batch_size, "seed": seed, "output_fn": output_fn, **options.get(mode, {})}
            kwargs["random_control"] = f"{mode}_auc_random" in asked
            curves[mode] = perturbation_curve(model, x, attributions, targets, mode=mode, **kwargs)
    for name in wanted:
        if name in ("deletion_auc", "insertion_auc"):
            out[name] = curves[name.split("_")[0]].mean_auc
        elif name in ("deletion_auc_random", "insertion_auc_random"):
            value = curves[name.split("_")[0]].mean_random_auc
            out[name] = math.nan if value is None else value
        elif name in MASK_METRICS:
            for region, mask in masks.items():  # type: ignore[union-attr]
                result = _LOCALIZERS[name](attributions, torch.as_tensor(mask).to(device), **options.get(name, {}))
                if result.n_valid:
                    out[f"{name}/{region}"] = result.value
                    out[f"{name}/{region}_chance"] = result.chance_level
        elif name == "max_sensitivity":
            if explainer is None:
                raise ValueError("max_sensitivity recomputes explanations: pass the method")
            kwargs = {"batch_size": 64 if batch_size is None else min(batch_size, 64), "seed": seed,
                      "output_fn": output_fn, **options.get("max_sensitivity", {})}
            result = max_sensitivity(explainer, x, targets, attributions=attributions, model=model, **kwargs)
            out[name] = result.value
    return out
