"""KernelSHAP (Lundberg & Lee, 2017): Shapley values of feature groups by weighted linear regression."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from lightning_lens.attribution._perturbation import (
    Baseline,
    FeatureMask,
    PerturbationAttribution,
    shapley_coalitions,
)
from lightning_lens.attribution.base import OutputFn, Target
from lightning_lens.utils.checks import check_int
from lightning_lens.utils.rng import check_seed, private_generator


class KernelSHAP(PerturbationAttribution):
    """KernelSHAP: the Shapley values of feature groups, estimated by a weighted least-squares fit of the target score
    on coalitions (Lundberg and Lee, "A Unified Approach to Interpreting Model Predictions", NeurIPS 2017).

    A coalition keeps the input's values on some groups and the baseline's on the others. The fit weights each
    coalition of size ``s`` of ``M`` groups with the Shapley kernel ``(M - 1) / (C(M, s) s (M - s))`` and holds the
    efficiency constraint exactly: the values sum to ``S_c(x) - S_c(baseline)``. When all ``2^M - 2`` coalitions fit in
    ``n_samples`` they are all evaluated and the values are the exact Shapley values (of the game whose absent
    features take the baseline); otherwise coalitions are enumerated by size and sampled as shap's
    ``KernelExplainer`` does (paired, without repeats;
    :func:`~lightning_lens.attribution._perturbation.shapley_coalitions`).
    Exact for linear models: ``(x - baseline) * w``. Every element of a group gets the group's value.

    Args:
        model, baseline, feature_mask, batch_size, eval_mode: see
            :class:`~lightning_lens.attribution._perturbation.PerturbationAttribution` (default groups: one per column
            of tabular inputs, a 4x4 grid of patches of images).
        n_samples: coalitions per example (forward passes, plus one for the baseline); ``None`` (default) is shap's
            ``2 M + 2048``, which enumerates every coalition up to ``M = 11`` groups.
        seed: the seed of the private generator drawing coalitions (``None``: OS entropy, fresh draws every call).
            Examples with the same number of groups share one draw, so a batch gives the same values as a loop.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> x = torch.randn(2, 3)
        >>> torch.allclose(KernelSHAP(model).attribute(x, target=0), x * model.weight[0], atol=1e-5)
        True
    """

    name = "kernel_shap"
    call_options = PerturbationAttribution.call_options + ("n_samples", "seed")

    def __init__(
        self,
        model: nn.Module,
        n_samples: Optional[int] = None,
        baseline: Baseline = 0.0,
        feature_mask: FeatureMask = None,
        batch_size: Optional[int] = None,
        seed: Optional[int] = 0,
        *,
        eval_mode: bool = True,
        output_fn: Optional[OutputFn] = None,
    ) -> None:
        super().__init__(model, baseline, feature_mask, batch_size, eval_mode=eval_mode, output_fn=output_fn)
        self.n_samples = None if n_samples is None else check_int(n_samples, "n_samples", minimum=1)
        self.seed = check_seed(seed)

    def attribute(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        target: Target = None,
        *,
        abs: bool = False,
        baseline: Optional[Baseline] = None,
        feature_mask: FeatureMask = None,
        n_samples: Optional[int] = None,
        batch_size: Optional[int] = None,
        seed: Optional[int] = None,
        **options: Any,
    ) -> Any:
        """Shapley values shaped like ``inputs``; keyword options override the constructor's for this call."""
        return super().attribute(inputs, target, abs=abs, baseline=baseline, feature_mask=feature_mask,
                                 n_samples=n_samples, batch_size=batch_size, seed=seed, **options)

    def _group_values(  # type: ignore[override]
        self,
        n_groups: int,
        evaluate: Callable[[torch.Tensor], torch.Tensor],
        clean: torch.Tensor,
        *,
        n_samples: Optional[int],
        seed: Optional[int],
    ) -> torch.Tensor:
        M = n_groups
        clean = clean.double().cpu()
        if M == 1:
            return (clean - evaluate(torch.zeros(1, 1, dtype=torch.float64))[0].cpu())[:, None]
        budget = 2 * M + 2048 if n_samples is None else n_samples
        coalitions, weights = shapley_coalitions(M, budget, private_generator(seed))
        scores = evaluate(torch.cat([torch.zeros(1, M, dtype=torch.float64), coalitions])).cpu()
        empty, scores = scores[0], scores[1:]
        total = clean - empty  # efficiency: the values sum to f(x) - f(baseline)
        # eliminate the last group's value with the constraint, then weighted least squares for the others
        last = coalitions[:, -1:]
        response = scores - empty - last * total
        design = coalitions[:, :-1] - last
        root = weights.sqrt()[:, None]
        rest = torch.linalg.lstsq(root * design, root * response, driver="gelsd").solution  # (M - 1, B)
        return torch.cat([rest, (total - rest.sum(dim=0))[None]]).T
