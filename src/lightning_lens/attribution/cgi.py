"""Competitive Gradient x Input (Gupta & Arora, 2019): Gradient x Input with a competition among the classes."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lightning_lens.attribution._batching import blocks, check_batch_size, logits_in_blocks, resolve_batch_size
from lightning_lens.attribution.base import Attribution, OutputFn, Target, input_gradients
from lightning_lens.utils import resolve_target

__all__ = ["CompetitiveGradientXInput"]


class CompetitiveGradientXInput(Attribution):
    """Gradient x Input of the target class, kept only at the features where the target class wins the competition.

    Gupta and Arora, "A Simple Saliency Method That Passes the Sanity Checks", 2019 (arXiv:1905.12152), "competition
    for pixels" applied to Gradient x Input (CGI). With ``S_k(i) = x_i dS_k/dx_i`` the Gradient x Input of class
    ``k`` at feature ``i``, the map of class ``c`` is::

        CGI_c(i) = S_c(i)  if S_c(i) > 0 and S_c(i) = max_k S_k(i)   (c wins the feature's positive evidence)
                   S_c(i)  if S_c(i) < 0 and S_c(i) = min_k S_k(i)   (c is the class the feature speaks most against)
                   0       otherwise

    over all classes ``k`` of the model's output, feature by feature (every channel of a pixel competes on its own).
    The reasoning of the paper: in a ReLU network with zero biases the class scores decompose exactly into these
    per-feature terms, and a feature that another class uses more strongly is not evidence *for* ``c``. Cost: one
    gradient per class (``C`` backward passes per example), run in blocks of rows within the element budget.

    Args:
        model: the classifier.
        batch_size: most rows (examples x classes) per forward pass; ``None`` picks whole classes of the batch
            within a budget of ``2**17`` input elements per pass. Results do not depend on it.
        output_fn: maps the model's output to ``(B, C)`` or ``(B,)`` scores (see
            :func:`~lightning_lens.attribution.base.model_scores`); every class of those scores competes.
        eval_mode: see :class:`~lightning_lens.attribution.base.Attribution`.

    Example:
        >>> model = nn.Linear(2, 3, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, 1.0], [2.0, -1.0], [0.5, 3.0]]))
        >>> CompetitiveGradientXInput(model).attribute(torch.tensor([[1.0, 1.0]]), target=0)
        tensor([[0., 0.]])
        >>> CompetitiveGradientXInput(model).attribute(torch.tensor([[1.0, 1.0]]), target=1)
        tensor([[ 2., -1.]])
    """

    name = "cgi"
    call_options = ("batch_size",)

    def __init__(
        self,
        model: nn.Module,
        batch_size: Optional[int] = None,
        *,
        output_fn: Optional[OutputFn] = None,
        eval_mode: bool = True,
    ) -> None:
        super().__init__(model, output_fn=output_fn, eval_mode=eval_mode)
        self.batch_size = check_batch_size(batch_size)

    def _check_option(self, key: str, value: object) -> object:
        return check_batch_size(value)  # type: ignore[arg-type]

    def attribute(  # type: ignore[override]
        self, inputs: torch.Tensor, target: Target = None, *, abs: bool = False, batch_size: Optional[int] = None
    ) -> torch.Tensor:
        """CGI maps shaped like ``inputs``; ``batch_size`` overrides the constructor's for this call."""
        return super().attribute(inputs, target, abs=abs, batch_size=batch_size)

    def _attribute(self, inputs: torch.Tensor, target: Target, *, batch_size: Optional[int]) -> torch.Tensor:
        x = inputs.detach()
        batch, shape = x.shape[0], x.shape[1:]
        rows = resolve_batch_size(batch_size, batch, x[0].numel())
        with torch.no_grad():
            logits = logits_in_blocks(self.model, x, rows, self.output_fn)
        resolved = resolve_target(target, logits)
        classes = logits.shape[1]
        own = torch.zeros_like(x)
        high = torch.full_like(x, -torch.inf)
        low = torch.full_like(x, torch.inf)
        for blk in blocks(classes, batch, rows):
            k, width = blk.s1 - blk.s0, blk.b1 - blk.b0
            part = x[blk.b0 : blk.b1]
            rows_x = part.repeat(k, *([1] * len(shape)))
            labels = torch.arange(blk.s0, blk.s1, device=x.device).repeat_interleave(width)
            grads, _, _ = input_gradients(self.model, rows_x, labels, owned=True, output_fn=self.output_fn)
            scores = (grads * rows_x).view(k, width, *shape)
            high[blk.b0 : blk.b1] = torch.maximum(high[blk.b0 : blk.b1], scores.max(dim=0).values)
            low[blk.b0 : blk.b1] = torch.minimum(low[blk.b0 : blk.b1], scores.min(dim=0).values)
            for j, label in enumerate(range(blk.s0, blk.s1)):
                mine = resolved[blk.b0 : blk.b1] == label
                own[blk.b0 : blk.b1][mine] = scores[j][mine]
        keep = ((own > 0) & (own >= high)) | ((own < 0) & (own <= low))
        return torch.where(keep, own, torch.zeros_like(own))
