"""Excitation Backprop (Zhang et al., 2016): marginal winning probabilities, and its contrastive variant c-MWP."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lightning_lens.attribution.base import Attribution, OutputFn, Target
from lightning_lens.attribution.lrp import _Rule, prepare_model, propagate
from lightning_lens.utils.checks import check_bool

__all__ = ["ExcitationBackprop"]

_MWP = _Rule("zplus")


def _mwp_rule(name: str, module: nn.Module, first: bool) -> _Rule:
    return _MWP


class ExcitationBackprop(Attribution):
    """Excitation Backprop: the probability that each input feature is a "winner" for the target class.

    Zhang, Bargal, Lin, Brandt, Shen and Sclaroff, "Top-down Neural Attention by Excitation Backprop", ECCV 2016
    (IJCV 2018). The top-down signal starts as probability 1 on the target logit and is passed from every neuron
    ``a_j`` to its inputs with the conditional probabilities ``P(a_i | a_j) = a_i w_ij+ / sum_i' a_i' w_i'j+``
    (excitatory weights only, no bias): the marginal winning probability (MWP) ``P(a_i) = sum_j P(a_i | a_j) P(a_j)``.
    This is the z+ rule of :class:`~lightning_lens.attribution.LRP` with a top relevance of 1, run by the same
    machinery: ReLUs pass the probability through, max pooling gives it to the winner, average pooling and additions
    split it in proportion. For inputs of either sign the contributions are ``(x_i w_ij)+`` (``x_i w_ij+`` for the
    paper's non-negative activations), so maps are non-negative and sum to 1 per example (except where a neuron
    has no positive input at all). Maps are returned at the input, not at an intermediate layer as in the paper.

    ``contrastive=True`` gives c-MWP: the target's MWP map minus the MWP map of its dual unit, the target's output
    neuron with negated weights (Sec. 3.3 of the paper), so evidence shared with the "non-target" is cancelled.
    The maps then sum to 0 and have both signs. This needs a model whose logits are the output of its last
    ``Linear``/``Conv`` layer (it raises a ``ValueError`` otherwise), and costs two passes.

    Args:
        model: the classifier; never modified (eval-mode BatchNorms are folded on a deep copy, see
            :func:`~lightning_lens.utils.canonize.fold_batchnorm`).
        contrastive: compute c-MWP.
        canonize: fold BatchNorm first.
        output_fn: maps the model's output to ``(B, C)`` or ``(B,)`` scores (see
            :func:`~lightning_lens.attribution.base.model_scores`).
        eval_mode: see :class:`~lightning_lens.attribution.base.Attribution`.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> p = ExcitationBackprop(net).attribute(torch.rand(2, 3), target=0)
        >>> bool((p >= 0).all())
        True
    """

    def __init__(self, model: nn.Module, contrastive: bool = False, canonize: bool = True, *,
                 output_fn: Optional[OutputFn] = None, eval_mode: bool = True) -> None:
        super().__init__(model, output_fn=output_fn, eval_mode=eval_mode)
        self.contrastive = check_bool(contrastive, "contrastive")
        self.canonize = check_bool(canonize, "canonize")

    @property
    def name(self) -> str:  # type: ignore[override]
        return "contrastive_excitation_backprop" if self.contrastive else "excitation_backprop"

    def _attribute(self, inputs: torch.Tensor, target: Target) -> torch.Tensor:
        work = prepare_model(self.model, inputs, self.canonize)
        mwp, resolved, _, top = propagate(work, inputs, target, _mwp_rule, unit_top=True, output_fn=self.output_fn)
        if not self.contrastive:
            return mwp
        if top is None:
            raise ValueError(
                "contrastive=True needs a model whose logits are the output of its last nn.Linear/nn.Conv layer (the"
                " dual unit negates that layer's weights); use contrastive=False for this model, or an output_fn"
                " that returns that layer's output itself (e.g. out['logits']), not new scores computed from it"
            )
        dual, _, _, _ = propagate(work, inputs, resolved, _mwp_rule, unit_top=True, negate=top,
                                 output_fn=self.output_fn)
        return mwp - dual
