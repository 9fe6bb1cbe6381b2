"""Guided Backpropagation (Springenberg et al., 2015) and Deconvnet (Zeiler and Fergus, 2014).

Both are the input gradient with a different backward rule at every ReLU:

* gradient:        ``grad_in = grad_out * [x > 0]``
* guided backprop: ``grad_in = max(grad_out, 0) * [x > 0]``
* deconvnet:       ``grad_in = max(grad_out, 0)``

The rule is applied to every ReLU the forward pass executes, however the model calls it: ``nn.ReLU`` (also
``inplace=True``), ``F.relu``, ``F.relu_``, ``torch.relu``, ``torch.relu_``, ``Tensor.relu`` and ``Tensor.relu_``.
A :class:`torch.overrides.TorchFunctionMode` active during the forward swaps each of these calls for an autograd
Function with the same forward and the method's backward (``nn.ReLU`` goes through ``F.relu``, so it is caught
too). Hooks on ``nn.ReLU`` modules, as Captum uses, silently miss functional ReLUs. Not caught: ReLUs written as
``clamp(min=0)``/``threshold`` and ReLUs inside TorchScript or compiled code (a warning is raised when the forward
executed no ReLU at all).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from lightning_lens.attribution.base import Attribution, OutputFn, Target, input_gradients
from lightning_lens.utils.checks import check_choice

_RULES = ("guided", "deconv")


def _relu_backward(grad: torch.Tensor, output: torch.Tensor | None, rule: str) -> torch.Tensor:
    positive = grad.clamp(min=0)
    return positive if rule == "deconv" else positive * (output > 0)


class _ReLU(torch.autograd.Function):
    """``relu(x)`` whose backward follows ``rule``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rule: str) -> torch.Tensor:
        out = torch.relu(x)
        ctx.rule = rule
        ctx.save_for_backward(out if rule == "guided" else None)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (out,) = ctx.saved_tensors
        return _relu_backward(grad, out, ctx.rule), None


class _ReLUInplace(_ReLU):
    """``x.relu_()`` (modifies and returns ``x``, as the real in-place op does) whose backward follows ``rule``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rule: str) -> torch.Tensor:
        x.relu_()
        ctx.mark_dirty(x)
        ctx.rule = rule
        # [x > 0] == [relu(x) > 0], so the output is enough for the guided mask
        ctx.save_for_backward(x if rule == "guided" else None)
        return x


_OUT_OF_PLACE: tuple[Callable[..., Any], ...] = (torch.relu, torch.Tensor.relu)
_IN_PLACE: tuple[Callable[..., Any], ...] = (torch.relu_, torch.Tensor.relu_, F.relu_)


class ReLURule(TorchFunctionMode):
    """While active, every ReLU call runs forward as usual and backward by ``rule`` (``"guided"`` or ``"deconv"``).

    ``count`` holds the number of ReLU calls replaced. Use it as a context manager around the forward pass only.

    Example:
        >>> x = torch.tensor([-1.0, 2.0], requires_grad=True)
        >>> with ReLURule("deconv"):
        ...     y = torch.relu(x)
        >>> torch.autograd.grad(y.sum(), x)[0]
        tensor([1., 1.])
    """

    def __init__(self, rule: str) -> None:
        super().__init__()
        check_choice(rule, "rule", _RULES)
        self.rule = rule
        self.count = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.relu:
            x = args[0] if args else kwargs["input"]
            inplace = args[1] if len(args) > 1 else kwargs.get("inplace", False)
            self.count += 1
            return _ReLUInplace.apply(x, self.rule) if inplace else _ReLU.apply(x, self.rule)
        if any(func is f for f in _OUT_OF_PLACE):
            self.count += 1
            return _ReLU.apply(args[0] if args else kwargs["input"], self.rule)
        if any(func is f for f in _IN_PLACE):
            self.count += 1
            return _ReLUInplace.apply(args[0] if args else kwargs["input"], self.rule)
        return func(*args, **kwargs)


def rule_gradients(
    model: torch.nn.Module, inputs: torch.Tensor, target: Target, rule: str, output_fn: Optional[OutputFn] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input gradients with ``rule`` at every ReLU; returns ``(gradients, resolved_target)``."""
    mode = ReLURule(rule)
    with mode:
        grads, resolved, _ = input_gradients(model, inputs, target, output_fn=output_fn)
    if mode.count == 0:
        warnings.warn(
            f"the model's forward executed no ReLU, so {rule} backpropagation equals the plain gradient"
            " (ReLUs written as clamp/threshold or inside TorchScript are not recognised)",
            stacklevel=3,
        )
    return grads, resolved


class GuidedBackprop(Attribution):
    """Guided Backpropagation: the input gradient where every ReLU passes back only positive gradients at positive inputs.

    Springenberg et al., "Striving for Simplicity: The All Convolutional Net", ICLR workshop 2015. Applies to every
    ReLU the forward executes, modules and functional calls alike (see the module docstring).

    Args:
        model: the classifier.
        output_fn: maps the model's output to ``(B, C)`` or ``(B,)`` scores (see
            :func:`~lightning_lens.attribution.base.model_scores`).
        eval_mode: see :class:`~lightning_lens.attribution.base.Attribution`.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
        >>> GuidedBackprop(model).attribute(torch.ones(1, 2), target=0).shape
        torch.Size([1, 2])
    """

    name = "guided_backprop"
    _rule = "guided"

    def _attribute(self, inputs: torch.Tensor, target: Target) -> torch.Tensor:
        return rule_gradients(self.model, inputs, target, self._rule, self.output_fn)[0]


class Deconvnet(GuidedBackprop):
    """Deconvnet: the input gradient where every ReLU passes back the positive part of the gradient, ignoring its input.

    Zeiler and Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014, in the gradient form of
    Springenberg et al. (2015). Applies to every ReLU the forward executes.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
        >>> Deconvnet(model).attribute(torch.ones(1, 2), target=0).shape
        torch.Size([1, 2])
    """

    name = "deconvnet"
    _rule = "deconv"
