"""Layer attribution: attributions with respect to a module's output (``layer=``), e.g. a text model's embeddings.

Token ids cannot be differentiated; the output of the embedding layer can. A gradient method with ``layer=`` runs the
model on the actual inputs while a forward hook hands the rest of the model a copy of the layer's output (or a
replacement for it: a noisy copy for SmoothGrad, a path point for Integrated Gradients, as Captum's
``LayerIntegratedGradients``), and differentiates with respect to that copy. The hook is removed in ``finally``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Callable, Literal, Optional, Union

import torch
from torch import nn

from lightning_lens.utils.checks import check_choice
from lightning_lens.utils.modules import resolve_module

#: how users name a layer: the module itself or its dotted name in the model (``"bert.embeddings.word_embeddings"``).
LayerSpec = Union[nn.Module, str]


def resolve_layer(model: Optional[nn.Module], layer: LayerSpec) -> tuple[nn.Module, str]:
    """The module ``layer`` names in ``model`` and its dotted name.

    Raises:
        TypeError: ``layer`` is neither a module nor a str.
        ValueError: no such submodule (the message lists the names), or a module that is not part of ``model``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(), torch.nn.Linear(8, 2))
        >>> resolve_layer(model, "0")[1], resolve_layer(model, model[2])[1]
        ('0', '2')
    """
    if model is None:
        raise TypeError("layer= needs a model to find the layer in")
    module = resolve_module(model, layer, "layer")
    name = layer if isinstance(layer, str) else next(n for n, m in model.named_modules() if m is module)
    return module, name


def find_embedding(model: Optional[nn.Module]) -> Optional[str]:
    """The dotted name of the model's first ``nn.Embedding``, or None.

    Example:
        >>> find_embedding(torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 2)))
        '0'
    """
    if model is None:
        return None
    return next((n for n, m in model.named_modules() if isinstance(m, nn.Embedding)), None)


class LayerRecord:
    """What the hook saw in one forward: the leaf handed downstream (``output``, requires grad)."""

    def __init__(self) -> None:
        self.output: Optional[torch.Tensor] = None
        self.calls = 0


@contextlib.contextmanager
def layer_hook(
    module: nn.Module,
    name: str,
    replacement: Optional[Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]] = None,
    *,
    differentiable: bool = True,
) -> Iterator[LayerRecord]:
    """A forward hook on ``module`` for the duration of the block.

    The rest of the model receives a copy of a leaf tensor ``record.output`` holding the layer's output, or
    ``replacement`` (same shape) instead, or ``replacement(output)`` when it is a function (SmoothGrad adds its noise
    to the output of each forward, so the clean output of the whole batch is never held); with ``differentiable`` the leaf requires grad, so
    ``torch.autograd.grad(score, record.output)`` is the gradient with respect to the layer's output. The copy keeps a
    later in-place operation of the model from touching the leaf.
    """
    record = LayerRecord()

    def hook(mod: nn.Module, args: object, out: object) -> torch.Tensor:
        record.calls += 1
        if record.calls > 1:
            raise ValueError(
                f"layer={name!r} runs more than once in one forward (a reused module); attribute a module that is"
                " called once, e.g. a wrapper around the uses you mean"
            )
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            raise TypeError(
                f"layer={name!r} returns {type(out).__name__ if not isinstance(out, torch.Tensor) else out.dtype};"
                " layer attribution needs a module whose output is one floating-point tensor (e.g. the embedding"
                " module, not a block that returns a tuple)"
            )
        if replacement is None and not differentiable:
            record.output = out.detach()
            return out
        value = out.detach() if replacement is None else (
            replacement(out.detach()) if callable(replacement) else replacement
        )
        if value.shape != out.shape:
            raise ValueError(
                f"layer={name!r}: the replacement for its output has shape {tuple(value.shape)}, expected"
                f" {tuple(out.shape)}"
            )
        leaf = value.detach().clone().requires_grad_(True) if differentiable else value.detach().to(out.dtype)
        record.output = leaf
        return leaf.clone() if differentiable else leaf

    handle = module.register_forward_hook(hook)
    try:
        yield record
    finally:
        handle.remove()


def layer_output(run: Callable[[], object], module: nn.Module, name: str) -> torch.Tensor:
    """The layer's output in the forward that ``run()`` makes, computed without gradients."""
    with torch.no_grad(), layer_hook(module, name, differentiable=False) as record:
        run()
    if record.output is None:
        raise ValueError(f"layer={name!r} did not run in the model's forward; pick a module the forward uses")
    return record.output


def reduce_tokens(attributions: torch.Tensor, how: Literal["sum", "l2"] = "sum") -> torch.Tensor:
    """One score per token from layer attributions ``(B, N, hidden...)``: the sum (signed) or the L2 norm over the
    hidden dimension(s), shape ``(B, N)``.

    Example:
        >>> a = torch.tensor([[[3.0, -4.0], [1.0, 1.0]]])
        >>> reduce_tokens(a).tolist(), reduce_tokens(a, how="l2").tolist()
        ([[-1.0, 2.0]], [[5.0, 1.4142135381698608]])
    """
    if not isinstance(attributions, torch.Tensor):
        raise TypeError(f"attributions must be a tensor (batch, tokens, hidden), got {type(attributions).__name__}")
    if attributions.dim() < 3:
        raise ValueError(
            f"attributions must have shape (batch, tokens, hidden...), got {tuple(attributions.shape)}: reduce_tokens"
            " takes layer attributions of an embedding layer"
        )
    check_choice(how, "how", ("sum", "l2"))
    flat = attributions.flatten(2)
    return flat.sum(dim=2) if how == "sum" else flat.norm(dim=2)
