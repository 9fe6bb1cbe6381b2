"""Explanation quality: faithfulness (deletion/insertion), localization against masks, robustness (no Lightning).

* :func:`deletion_curve`, :func:`insertion_curve` (Petsiuk et al. 2018) with a random-ordering control;
* :func:`pointing_game`, :func:`relevance_mass_accuracy`, :func:`relevance_rank_accuracy` (Arras et al. 2022), each
  with its chance level;
* :func:`max_sensitivity` (Yeh et al. 2019);
* :func:`explanation_fragility` (Ghorbani et al. 2019): a label-preserving top-k attack on the explanation;
* :func:`remove_and_retrain` (ROAR, Hooker et al. 2019): accuracy after removing top features and retraining (an
  offline job: it trains models with Lightning, imported lazily);
* :func:`compute_quality`: any of them as flat scalars, as the callbacks log them.

Example:
    >>> import torch
    >>> from lightning_lens.evaluation import relevance_mass_accuracy
    >>> masks = torch.zeros(2, 1, 8, 8); masks[..., :4, :4] = 1
    >>> r = relevance_mass_accuracy(torch.rand(2, 1, 8, 8) * masks, masks)
    >>> r.value, r.chance_level
    (1.0, 0.25)
"""

from lightning_lens.evaluation._common import POOLINGS
from lightning_lens.evaluation.faithfulness import (
    PerturbationCurve,
    Substrate,
    deletion_curve,
    gaussian_blur,
    insertion_curve,
    perturbation_curve,
    substrate_like,
)
from lightning_lens.evaluation.fragility import FragilityResult, explanation_fragility
from lightning_lens.evaluation.localization import (
    LocalizationResult,
    pointing_game,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
)
from lightning_lens.evaluation.quality import (
    CHEAP_METRICS,
    COSTLY_METRICS,
    MASK_METRICS,
    QUALITY_METRICS,
    available_quality_metrics,
    compute_quality,
)
from lightning_lens.evaluation.roar import ROARReport, remove_and_retrain, remove_features
from lightning_lens.evaluation.robustness import SensitivityResult, max_sensitivity
from lightning_lens.evaluation.summaries import saliency_summaries, top_mass

__all__ = [
    "CHEAP_METRICS",
    "COSTLY_METRICS",
    "LocalizationResult",
    "MASK_METRICS",
    "POOLINGS",
    "PerturbationCurve",
    "QUALITY_METRICS",
    "SensitivityResult",
    "Substrate",
    "available_quality_metrics",
    "compute_quality",
    "deletion_curve",
    "explanation_fragility",
    "FragilityResult",
    "gaussian_blur",
    "insertion_curve",
    "max_sensitivity",
    "perturbation_curve",
    "pointing_game",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "remove_and_retrain",
    "remove_features",
    "ROARReport",
    "saliency_summaries",
    "substrate_like",
    "top_mass",
]
