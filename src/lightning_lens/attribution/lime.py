"""LIME (Ribeiro et al., 2016): a weighted sparse linear model of the target score on binary interpretable features."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from lightning_lens.attribution._perturbation import (
    Baseline,
    FeatureMask,
    PerturbationAttribution,
    lime_coalitions,
    weighted_lasso,
)
from lightning_lens.attribution.base import OutputFn, Target
from lightning_lens.utils.checks import check_choice, check_float, check_int
from lightning_lens.utils.rng import check_seed, private_generator

_DISTANCES = ("cosine", "euclidean")


def lime_kernel(coalitions: torch.Tensor, kernel_width: Optional[float] = None,
                distance: str = "cosine") -> torch.Tensor:
    """The proximity of each binary interpretable sample ``z`` to the input (all features on):
    ``exp(-D(1, z)^2 / sigma^2)``.

    ``D`` is the cosine distance (lime's choice for images and text; an all-off sample is at distance 1) or the
    euclidean distance ``sqrt(#off)``. ``sigma = kernel_width``; ``None`` takes 0.25 for cosine (lime's image default)
    and ``0.75 sqrt(M)`` for euclidean (lime's tabular default).

    Example:
        >>> [round(v, 4) for v in lime_kernel(torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])).tolist()]
        [1.0, 0.2535, 0.0]
    """
    z = coalitions.double()
    M = z.shape[1]
    if distance == "cosine":
        on = z.sum(dim=1)
        d = 1.0 - (on / M).sqrt()  # cos(1, z) = |z|_1 / (sqrt(M) sqrt(|z|_1)) for binary z
        width = 0.25 if kernel_width is None else kernel_width
    else:
        d = (M - z.sum(dim=1)).sqrt()
        width = 0.75 * M**0.5 if kernel_width is None else kernel_width
    return torch.exp(-d.square() / width**2)


class LIME(PerturbationAttribution):
    """LIME: the coefficients of a weighted Lasso fit of the target score on binary interpretable features (Ribeiro,
    Singh and Guestrin, "'Why Should I Trust You?': Explaining the Predictions of Any Classifier", KDD 2016).

    The interpretable features are the feature groups (``feature_mask``: one per column of tabular inputs, a 4x4 grid
    of patches of images by default), on (the input's values) or off (the baseline's). ``n_samples`` binary samples
    ``z`` are drawn as lime draws them (the input itself, then a uniform number of features switched off,
    :func:`~lightning_lens.attribution._perturbation.lime_coalitions`), weighted by the exponential kernel
    ``pi_x(z) = exp(-D(x, z)^2 / sigma^2)`` on the distance of ``z`` to the input (:func:`lime_kernel`), and the
    model ``g(z) = b + w . z`` minimising ``sum pi_x(z) (f(z) - g(z))^2 / (2 sum pi_x) + alpha |w|_1`` is fitted
    (scikit-learn's ``Lasso(alpha)`` with ``sample_weight``; ``alpha=0`` is weighted least squares). Every element of a
    group gets the group's coefficient.

    Args:
        model, baseline, feature_mask, batch_size, eval_mode: see
            :class:`~lightning_lens.attribution._perturbation.PerturbationAttribution`.
        n_samples: interpretable samples per example (forward passes; the first is the input itself). Default 1000.
        alpha: the L1 penalty of the Lasso, in the units of the target score (default 0.001; Captum's 0.01 zeroes every
            coefficient when the score moves by less than that, e.g. on a randomly initialised model). 0: weighted
            least squares.
        kernel_width: the kernel's sigma; ``None`` (default) takes 0.25 for the cosine distance, ``0.75 sqrt(M)`` for
            the euclidean.
        distance: ``"cosine"`` (default) or ``"euclidean"``, between binary interpretable vectors.
        seed: the seed of the private generator drawing samples (``None``: OS entropy). Examples with the same number
            of groups share one draw, so a batch gives the same values as a loop.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> x = torch.randn(2, 3)
        >>> lime = LIME(model, n_samples=200, alpha=0.0)
        >>> torch.allclose(lime.attribute(x, target=0), x * model.weight[0], atol=1e-5)
        True
    """

    name = "lime"
    call_options = PerturbationAttribution.call_options + ("n_samples", "seed", "alpha", "kernel_width", "distance")

    def __init__(
        self,
        model: nn.Module,
        n_samples: int = 1000,
        baseline: Baseline = 0.0,
        feature_mask: FeatureMask = None,
        alpha: float = 0.001,
        kernel_width: Optional[float] = None,
        distance: str = "cosine",
        batch_size: Optional[int] = None,
        seed: Optional[int] = 0,
        *,
        eval_mode: bool = True,
        output_fn: Optional[OutputFn] = None,
    ) -> None:
        super().__init__(model, baseline, feature_mask, batch_size, eval_mode=eval_mode, output_fn=output_fn)
        self.n_samples = check_int(n_samples, "n_samples", minimum=1)
        self.alpha = self._check_option("alpha", alpha)
        self.kernel_width = None if kernel_width is None else self._check_option("kernel_width", kernel_width)
        self.distance = self._check_option("distance", distance)
        self.seed = check_seed(seed)

    def _check_option(self, key: str, value: Any) -> Any:
        if key == "alpha":
            return check_float(value, "alpha", minimum=0.0)
        if key == "kernel_width":
            return check_float(value, "kernel_width", minimum=0.0, open_min=True)
        if key == "distance":
            return check_choice(value, "distance", _DISTANCES)
        return super()._check_option(key, value)

    def attribute(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        target: Target = None,
        *,
        abs: bool = False,
        baseline: Optional[Baseline] = None,
        feature_mask: FeatureMask = None,
        n_samples: Optional[int] = None,
        alpha: Optional[float] = None,
        kernel_width: Optional[float] = None,
        distance: Optional[str] = None,
        batch_size: Optional[int] = None,
        seed: Optional[int] = None,
        **options: Any,
    ) -> Any:
        """LIME coefficients shaped like ``inputs``; keyword options override the constructor's for this call."""
        return super().attribute(inputs, target, abs=abs, baseline=baseline, feature_mask=feature_mask,
                                 n_samples=n_samples, alpha=alpha, kernel_width=kernel_width, distance=distance,
                                 batch_size=batch_size, seed=seed, **options)

    def _group_values(  # type: ignore[override]
        self,
        n_groups: int,
        evaluate: Callable[[torch.Tensor], torch.Tensor],
        clean: torch.Tensor,
        *,
        n_samples: int,
        seed: Optional[int],
        alpha: float,
        kernel_width: Optional[float],
        distance: str,
    ) -> torch.Tensor:
        coalitions = lime_coalitions(n_groups, n_samples, private_generator(seed))
        # the first sample is the input itself: its score is known
        scores = torch.cat([clean.double().cpu()[None], evaluate(coalitions[1:]).cpu()]) if n_samples > 1 else \
            clean.double().cpu()[None]
        weights = lime_kernel(coalitions, kernel_width, distance)
        coef, _ = weighted_lasso(coalitions, scores, weights, alpha)
        return coef.T
