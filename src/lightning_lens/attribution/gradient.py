"""Vanilla gradient (Simonyan et al., 2014) and Gradient x Input (Shrikumar et al., 2016)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Union

import torch
from torch import nn

from lightning_lens.attribution._batching import check_batch_size, example_slices, resolve_batch_size
from lightning_lens.attribution._inputs import ModelInputs
from lightning_lens.attribution.base import Attribution, OutputFn, Target, gradients
from lightning_lens.utils.targets import per_example_target

if TYPE_CHECKING:
    from lightning_lens.attribution.layer import LayerSpec


class Gradient(Attribution):
    """Gradient of the target logit with respect to the input, ``dS_c/dx`` (signed unless ``abs=True``).

    "Deep Inside Convolutional Networks: Visualising Image Classification Models and Saliency Maps",
    Simonyan, Vedaldi and Zisserman, ICLR workshop 2014. Unlike Captum's ``Saliency`` the result is signed by
    default; pass ``abs=True`` for the paper's absolute map.

    Args:
        model: the model to explain.
        layer: a module of the model or its dotted name: the gradient with respect to that module's output, shaped
            like it (e.g. the embedding layer of a text model, whose token ids cannot be differentiated).
        batch_size: most examples per forward pass; ``None`` picks slices within a budget of ``2**17`` input elements
            per pass (21 images of 3x32x32, one image of 3x224x224, per pass), so activation memory does not
            grow with the batch. Results do not depend on it (in eval mode rows do not interact).
        output_fn: maps the model's output to ``(B, C)`` or ``(B,)`` scores (default: a tensor as it is, the first
            element of a tuple, the ``"logits"`` of a mapping or HuggingFace ``ModelOutput``).
        eval_mode: see :class:`~lightning_lens.attribution.base.Attribution`.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> g = Gradient(model).attribute(torch.randn(4, 3), target=1)
        >>> torch.allclose(g, model.weight[1].expand(4, 3))
        True
    """

    name = "gradient"
    supports_structured = True
    supports_layer = True

    def __init__(
        self,
        model: nn.Module,
        layer: Optional[LayerSpec] = None,
        *,
        batch_size: Optional[int] = None,
        output_fn: Optional[OutputFn] = None,
        eval_mode: bool = True,
    ) -> None:
        super().__init__(model, eval_mode=eval_mode, output_fn=output_fn)
        self._set_layer(layer)
        self.batch_size = check_batch_size(batch_size)

    call_options = ("batch_size",)

    def _check_option(self, key: str, value: object) -> object:
        return check_batch_size(value)  # type: ignore[arg-type]

    #: multiply each gradient by the input (or the layer's output): Gradient x Input
    _times_input = False

    def _attribute(  # type: ignore[override]
        self, inputs: ModelInputs, target: Target, *, batch_size: Optional[int]
    ) -> Union[list[torch.Tensor], torch.Tensor]:
        """The gradients of slices of at most ``batch_size`` examples (default: the element budget, as the
        multi-sample methods), each written into the preallocated result: a batch of any size needs activation
        memory for one slice only (issue 19). Rows are independent in eval mode, so slicing changes nothing; with
        ``eval_mode=False`` (BatchNorm may use batch statistics) the batch stays whole unless ``batch_size`` is given."""
        batch = inputs.batch_size
        if batch_size is None and not self.eval_mode:
            batch_size = batch
        per_row = self._elements_per_row(inputs) if batch_size is None and batch > 1 else 1
        rows = resolve_batch_size(batch_size, batch, per_row)
        given = None if target is None else per_example_target(target, batch, inputs.leaves[0].device)
        results: Optional[list[torch.Tensor]] = None
        for b0, b1 in example_slices(batch, min(rows, batch)):
            part = inputs.rows(b0, b1)
            out = gradients(self.model, part, None if given is None else given[b0:b1], output_fn=self.output_fn,
                            layer=self._layer)
            if isinstance(out.grads, torch.Tensor):  # layer mode: one tensor shaped like the layer's output
                assert out.layer_output is not None
                grads = [out.grads.mul_(out.layer_output) if self._times_input else out.grads]
            else:
                grads = [g.mul_(x) for g, x in zip(out.grads, part.attributed)] if self._times_input else out.grads
            if b0 == 0 and b1 == batch:
                results = grads
                break
            if results is None:
                results = [torch.empty((batch, *g.shape[1:]), dtype=g.dtype, device=g.device) for g in grads]
            for result, g in zip(results, grads):
                result[b0:b1] = g
        assert results is not None
        return results[0] if self._layer is not None else results


class GradientXInput(Gradient):
    """Gradient times input, ``x * dS_c/dx``; with ``layer=``, the layer's output times the gradient with respect to it
    (Captum's ``LayerGradientXActivation``).

    "Not Just a Black Box: Learning Important Features Through Propagating Activation Differences",
    Shrikumar et al., 2016. For a linear model it is each feature's additive contribution ``w_c * x``.
    Arguments as :class:`Gradient`.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(GradientXInput(model).attribute(x, target=0), x * model.weight[0])
        True
    """

    name = "gradient_x_input"
    _times_input = True
