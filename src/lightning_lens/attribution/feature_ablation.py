"""Feature ablation: the drop of the target score when a feature group is replaced by the baseline."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from lightning_lens.attribution._perturbation import Baseline, FeatureMask, PerturbationAttribution
from lightning_lens.attribution.base import Target


class FeatureAblation(PerturbationAttribution):
    """Feature ablation (as Captum's ``FeatureAblation``): each feature group in turn takes the baseline's values; its
    attribution is ``S_c(x) - S_c(x with the group ablated)``, given to every element of the group. Positive values
    mark evidence for the class. ``M`` forward passes per example (``M`` groups), no autograd.

    Zeiler and Fergus's occlusion with the windows replaced by arbitrary groups (Zeiler and Fergus, "Visualizing and
    Understanding Convolutional Networks", ECCV 2014). Groups come from ``feature_mask``: one feature per column of
    ``(B, F)`` inputs by default, a 4x4 grid of patches (all channels together) for ``(B, C, H, W)`` images; see
    :func:`~lightning_lens.attribution.patch_mask` and :func:`~lightning_lens.attribution.superpixel_mask`.

    Args:
        model, baseline, feature_mask, batch_size, eval_mode: see
            :class:`~lightning_lens.attribution._perturbation.PerturbationAttribution`.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> x = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0]])
        >>> torch.allclose(FeatureAblation(model).attribute(x, target=0), x * model.weight[0], atol=1e-6)
        True
    """

    name = "feature_ablation"

    def attribute(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        target: Target = None,
        *,
        abs: bool = False,
        baseline: Optional[Baseline] = None,
        feature_mask: FeatureMask = None,
        batch_size: Optional[int] = None,
        **options: Any,
    ) -> Any:
        """Attributions shaped like ``inputs``; keyword options override the constructor's for this call."""
        return super().attribute(inputs, target, abs=abs, baseline=baseline, feature_mask=feature_mask,
                                 batch_size=batch_size, **options)

    def _group_values(  # type: ignore[override]
        self, n_groups: int, evaluate: Callable[[torch.Tensor], torch.Tensor], clean: torch.Tensor
    ) -> torch.Tensor:
        ablated = evaluate(1.0 - torch.eye(n_groups, dtype=torch.float64))  # (M, B): row g has group g off
        return (clean[None] - ablated).T
