"""The shared shape of every attribution method and the one gradient core they all use.

Every method is ``Method(model, ...)`` with ``.attribute(inputs, target=None, **options) -> Tensor``. While a method
runs it:

* puts the model in eval mode (``eval_mode=True``, the default) and restores every submodule's own train/eval flag
  afterwards, also after an exception. Eval mode is the right default for explanations: dropout is off and
  BatchNorm uses its running statistics, so the rows of a batch do not interact and one backward pass of the summed
  target scores gives exact per-example gradients. With ``eval_mode=False`` the model runs in whatever modes it is
  in; the module buffers (BatchNorm running statistics) are then snapshotted and restored so explaining never changes
  the model.
* leaves ``torch.inference_mode`` and enables autograd (``trainer.validate()`` runs under inference mode), and
  differentiates with ``torch.autograd.grad`` with respect to a private copy of the inputs only: parameters' ``.grad``
  are never written and the caller's tensor is never modified.
* removes every hook or mode it installs in a ``finally`` block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from lightning_lens.utils import grad_ready, gradients_enabled, preserve_modes, resolve_target
from lightning_lens.utils.checks import check_bool, check_tensor
from lightning_lens.utils.targets import Target

__all__ = ["Attribution", "Target", "check_inputs", "forward_logits", "target_scores", "input_gradients"]


def check_inputs(inputs: Any, argument: str = "inputs", min_dim: int = 2) -> torch.Tensor:
    """Validate an input batch: a floating-point tensor with a leading batch dimension."""
    return check_tensor(inputs, argument, min_dim=min_dim)


def forward_logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``model(inputs)``, checked to be a ``(batch, classes)`` tensor with one row per input."""
    out = model(inputs)
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"the model must return a tensor of logits of shape (batch, classes), got {type(out).__name__};"
            " wrap the model so that its forward returns one score per class"
        )
    if out.dim() != 2 or out.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"the model must return logits of shape (batch, classes) = ({inputs.shape[0]}, C), got shape"
            f" {tuple(out.shape)}; wrap the model so that its forward returns one score per class"
        )
    return out


def target_scores(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The selected logit of every row: ``logits[i, target[i]]``."""
    if target.is_inference():  # a target built under inference mode cannot be saved for backward
        target = target.clone()
    return logits.gather(1, target.view(-1, 1)).squeeze(1)


def input_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Target,
    *,
    owned: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient of each row's target logit with respect to that row of ``inputs``, in one forward and backward.

    This is the core every gradient method shares. Call it inside :meth:`Attribution.explaining` (or at least
    :func:`lightning_lens.utils.gradients_enabled`). The model sees a non-leaf copy of the inputs, so a forward that
    modifies its input in place still works; only that copy's gradient is requested from autograd, so parameters'
    ``.grad`` stay untouched. Rows are explained independently, which is exact when rows do not interact in the
    forward (true in eval mode).

    Args:
        model: returns ``(rows, classes)`` logits.
        inputs: ``(rows, ...)`` floating-point rows.
        target: see :func:`lightning_lens.utils.resolve_target` (``None`` = each row's argmax).
        owned: the caller built ``inputs`` itself and does not need it afterwards (saves one copy).

    Returns:
        ``(gradients, resolved_target, logits)``, the gradients detached and shaped like ``inputs``.
    """
    # grad_ready copies: an inference tensor becomes a normal one and the caller's tensor is never touched
    leaf = inputs.detach().requires_grad_(True) if owned and not inputs.is_inference() else grad_ready(inputs)
    logits = forward_logits(model, leaf.clone())
    resolved = resolve_target(target, logits)
    score = target_scores(logits, resolved).sum()
    grads = torch.autograd.grad(score, leaf, allow_unused=True)[0] if score.requires_grad else None
    if grads is None:
        raise RuntimeError(
            "the model's output does not depend on its input through autograd: does its forward run under"
            " torch.no_grad(), detach the input, or convert it to numpy?"
        )
    return grads.detach(), resolved, logits.detach()


class Attribution:
    """Base class: an attribution method bound to a model.

    Subclasses set :attr:`name` and implement :meth:`_attribute`, which runs inside :meth:`explaining` and returns
    raw (signed) attributions; :meth:`attribute` validates the inputs and applies ``abs``.

    Args:
        model: the classifier to explain, returning ``(batch, classes)`` logits.
        eval_mode: explain the model in eval mode (default) and restore every submodule's mode afterwards; ``False``
            uses the modes the model is in (buffers are restored afterwards).

    Example:
        >>> from lightning_lens.attribution import Gradient
        >>> model = torch.nn.Linear(3, 2)
        >>> Gradient(model).attribute(torch.ones(1, 3), target=1).shape
        torch.Size([1, 3])
    """

    #: the registry name of the method (``"gradient"``, ``"smoothgrad"`` ...), used as a label in logs.
    name: ClassVar[str] = "attribution"
    #: ``True`` for methods whose output is ``(B, 1, *spatial)`` rather than the input's shape.
    produces_map: ClassVar[bool] = False
    #: ``False`` for controls that ignore the model.
    requires_model: ClassVar[bool] = True

    def __init__(self, model: Optional[nn.Module], *, eval_mode: bool = True) -> None:
        if self.requires_model and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module for {type(self).__name__}, got {type(model).__name__}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        self.model = model
        self.eval_mode = check_bool(eval_mode, "eval_mode")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    @contextlib.contextmanager
    def explaining(self) -> Iterator[None]:
        """The context every forward/backward of the method runs in (see the module docstring)."""
        if self.model is None:
            yield
            return
        buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        if not self.eval_mode:
            buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        try:
            with preserve_modes(self.model, mode=False if self.eval_mode else None), gradients_enabled():
                yield
        finally:
            if buffers:
                with torch.no_grad():
                    for buf, saved in buffers:
                        buf.copy_(saved)

    def attribute(self, inputs: torch.Tensor, target: Target = None, *, abs: bool = False) -> torch.Tensor:
        """Attributions for ``inputs`` (shape ``(B, ...)``) with respect to ``target``.

        Args:
            inputs: a floating-point batch.
            target: an int, a 1-D tensor of ``B`` class indices, or ``None`` for the predicted classes.
            abs: return absolute values (signed by default).
        """
        inputs = check_inputs(inputs)
        with self.explaining():
            attributions = self._attribute(inputs, target)
        return attributions.abs() if abs else attributions

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.attribute(*args, **kwargs)

    def _attribute(self, inputs: torch.Tensor, target: Target) -> torch.Tensor:
        raise NotImplementedError
