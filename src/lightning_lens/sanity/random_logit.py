"""Random-logit test (Sixt et al., 2020, "When Explanations Lie: Why Many Modified BP Attributions Fail"): explain
the target class and a random *other* class of the same input; a class-sensitive method gives different maps.
Modified-backprop methods (Guided Backprop, LRP-alpha-beta) converge to class-independent maps and fail.

Similarities are those of :class:`~lightning_lens.sanity.similarity.MapSimilarity` (Quantus uses SSIM); lower is
better. The verdict reuses :class:`~lightning_lens.sanity.report.VerdictRule` with the same controls as the
randomization tests: the floor (maps of two different inputs) and the ceiling (1, or a re-run for stochastic
methods), treating the other-class maps as a single "stage".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from lightning_lens.sanity._common import (
    Methods,
    Reference,
    bind,
    check_batch,
    median,
    normalize_methods,
    outside_inference_mode,
    predict,
    private_copy,
)
from lightning_lens.sanity.layers import in_fast_layout
from lightning_lens.sanity.report import MapComparison, VerdictRule
from lightning_lens.sanity.similarity import MapSimilarity
from lightning_lens.utils import resolve_target
from lightning_lens.utils.targets import Target

__all__ = ["RandomLogitResult", "random_logit"]


@dataclass
class RandomLogitResult(MapComparison):
    """Result of :func:`random_logit`: a :class:`~lightning_lens.sanity.report.MapComparison` of the maps of the
    target class and of another class (``similarity``, ``floor``, ``ceiling``, ``verdicts``).

    Attributes:
        targets: ``(B,)`` explained classes; ``other_targets``: ``(B,)`` the random other classes.
    """

    targets: torch.Tensor
    other_targets: torch.Tensor

    def to_table(self) -> tuple[list[str], list[list[Any]]]:
        metrics = sorted({m for d in self.similarity.values() for m in d})
        columns = ["method", "verdict", *metrics]
        rows = [[name, self.verdicts[name].outcome, *[median(d[m]) if m in d else math.nan for m in metrics]]
                for name, d in self.similarity.items()]
        return columns, rows

    def summary(self) -> str:
        lines = ["Random-logit test (Sixt et al. 2020): similarity of the maps of the target class and of a random"
                 " other class (lower is better)"]
        return "\n".join(lines + self._method_lines())

    def to_dict(self) -> dict[str, Any]:
        return {"targets": self.targets.tolist(), "other_targets": self.other_targets.tolist(),
                **self._comparison_dict()}


@outside_inference_mode
def random_logit(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Target = None,
    methods: Methods = ("gradient", "guided_backprop"),
    *,
    seed: int = 0,
    similarity: Optional[MapSimilarity] = None,
    rule: Optional[VerdictRule] = None,
) -> RandomLogitResult:
    """Compare each method's maps for the target class with its maps for a random other class.

    Cost: 2 explanations per method (plus a re-run for a stochastic method's ceiling), on a deep copy of the model.

    Args:
        model: a classifier returning ``(batch, classes)`` logits (at least 2 classes).
        inputs: ``(B, ...)`` inputs.
        target: the class explained first (int, ``B`` labels, ``None``: the prediction).
        methods: as in :func:`~lightning_lens.sanity.cascading_randomization`.
        seed: seed of the private generator drawing the other classes (uniform among the ``C - 1`` others).
        similarity: the metrics (default :class:`MapSimilarity()`).
        rule: the verdict thresholds (default :class:`VerdictRule()`).

    Example:
        >>> from lightning_lens.testing import SmallCNN
        >>> result = random_logit(SmallCNN(), torch.rand(4, 1, 32, 32), methods=["gradient", "edge"])
        >>> result.verdicts["edge"].outcome   # the edge map ignores the class
        'fails'
    """
    similarity = similarity or MapSimilarity()
    rule = rule or VerdictRule()
    specs = normalize_methods(methods)
    clone, memo = private_copy(model)
    x = check_batch(inputs, clone)
    bound = [bind(label, spec, model, clone, memo) for label, spec in specs]

    def run() -> RandomLogitResult:
        logits = predict(clone, x)
        classes = logits.shape[1]
        if classes < 2:
            raise ValueError("random_logit needs a model with at least 2 classes")
        targets = resolve_target(target, logits)
        generator = torch.Generator().manual_seed(seed)
        shift = torch.randint(1, classes, (x.shape[0],), generator=generator).to(targets.device)
        others = (targets + shift) % classes  # uniform over the other classes
        sims, floors, ceilings, verdicts = {}, {}, {}, {}
        for m in bound:
            ref = Reference.compute(m, x, targets, similarity)
            scores, _ = ref.compare(m.explain(x, others), similarity)
            sims[m.name] = {k: v.float().cpu() for k, v in scores.items()}
            floors[m.name], ceilings[m.name] = ref.floor, ref.ceiling
            verdicts[m.name] = rule.judge(m.name, {k: v.unsqueeze(0) for k, v in sims[m.name].items()}, ref.floor,
                                          ref.ceiling)
        return RandomLogitResult(sims, floors, ceilings, verdicts, targets=targets.cpu(), other_targets=others.cpu())

    return in_fast_layout(clone, x, run)  # the copy is never modified here, so the whole test can be re-run
