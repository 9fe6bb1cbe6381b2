"""Vanilla gradient (Simonyan et al., 2014) and Gradient x Input (Shrikumar et al., 2016)."""

from __future__ import annotations

import torch

from lightning_lens.attribution.base import Attribution, Target, input_gradients


class Gradient(Attribution):
    """Gradient of the target logit with respect to the input, ``dS_c/dx`` (signed unless ``abs=True``).

    "Deep Inside Convolutional Networks: Visualising Image Classification Models and Saliency Maps",
    Simonyan, Vedaldi and Zisserman, ICLR workshop 2014. Unlike Captum's ``Saliency`` the result is signed by
    default; pass ``abs=True`` for the paper's absolute map.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> g = Gradient(model).attribute(torch.randn(4, 3), target=1)
        >>> torch.allclose(g, model.weight[1].expand(4, 3))
        True
    """

    name = "gradient"

    def _attribute(self, inputs: torch.Tensor, target: Target) -> torch.Tensor:
        grads, _, _ = input_gradients(self.model, inputs, target)
        return grads


class GradientXInput(Attribution):
    """Gradient times input, ``x * dS_c/dx``.

    "Not Just a Black Box: Learning Important Features Through Propagating Activation Differences",
    Shrikumar et al., 2016. For a linear model it is each feature's additive contribution ``w_c * x``.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(GradientXInput(model).attribute(x, target=0), x * model.weight[0])
        True
    """

    name = "gradient_x_input"

    def _attribute(self, inputs: torch.Tensor, target: Target) -> torch.Tensor:
        grads, _, _ = input_gradients(self.model, inputs, target)
        return inputs.detach() * grads
