"""Sanity checks for attribution methods, in pure PyTorch (no Lightning import).

* :func:`cascading_randomization` / :func:`independent_randomization`: the model-parameter randomization test of
  Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018, with floor/ceiling controls and verdicts.
* :func:`efficient_mprt`: Hedström et al., 2023, the relative rise of explanation entropy after full randomization.
* :func:`random_logit`: Sixt et al., 2020, similarity of the maps of the explained class and a random other class.
* :func:`input_invariance`: Kindermans et al., a constant input shift compensated in the first layer must not move
  the maps.
* :func:`data_randomization_test`: Adebayo et al.'s label randomization (imports Lightning lazily; trains a copy).
* :class:`MapSimilarity` and the metric functions it uses (Spearman, SSIM, HOG, top-k), batched in torch.

Example:
    >>> import torch
    >>> from lightning_lens.testing import SmallCNN
    >>> report = cascading_randomization(SmallCNN(), torch.rand(4, 1, 32, 32), methods=["gradient", "edge"])
    >>> report.verdicts["edge"].outcome
    'fails'
"""

from lightning_lens.sanity.data_randomization import (
    DataRandomizationReport,
    PermutedLabels,
    data_randomization_test,
)
from lightning_lens.sanity.emprt import EfficientMPRTResult, efficient_mprt, histogram_entropy
from lightning_lens.sanity.input_invariance import InputInvarianceReport, input_invariance, shifted_twin
from lightning_lens.sanity.layers import Layer, find_layers, reinitialize_, scale_matched_normal_
from lightning_lens.sanity.randomization import (
    RANDOMIZED_PREDICTION,
    cascading_randomization,
    independent_randomization,
)
from lightning_lens.sanity.random_logit import RandomLogitResult, random_logit
from lightning_lens.sanity.report import MethodResult, RandomizationReport, Verdict, VerdictRule
from lightning_lens.sanity.similarity import (
    ALL_METRICS,
    MapSimilarity,
    aggregate_channels,
    hog_features,
    normalize_absolute,
    normalize_signed,
    pearson,
    spearman,
    ssim,
    topk_intersection,
)

__all__ = [
    "ALL_METRICS",
    "RANDOMIZED_PREDICTION",
    "aggregate_channels",
    "cascading_randomization",
    "data_randomization_test",
    "DataRandomizationReport",
    "efficient_mprt",
    "EfficientMPRTResult",
    "find_layers",
    "histogram_entropy",
    "hog_features",
    "independent_randomization",
    "input_invariance",
    "InputInvarianceReport",
    "Layer",
    "MapSimilarity",
    "MethodResult",
    "normalize_absolute",
    "normalize_signed",
    "pearson",
    "PermutedLabels",
    "random_logit",
    "RandomizationReport",
    "RandomLogitResult",
    "reinitialize_",
    "scale_matched_normal_",
    "shifted_twin",
    "spearman",
    "ssim",
    "topk_intersection",
    "Verdict",
    "VerdictRule",
]
