"""BatchNorm canonization: fold eval-mode BatchNorm layers into the convolution or linear layer that feeds them.

Modified-backprop rules such as LRP's are defined for linear layers followed by an element-wise activation. A
BatchNorm in eval mode is an affine map per channel, ``y = s * (z - mean) + beta`` with ``s = gamma / sqrt(var +
eps)``; applied to the output ``z = W x + b`` of a convolution or linear layer it equals one linear layer with
``W' = s W`` and ``b' = s (b - mean) + beta`` (Montavon et al., "Layer-Wise Relevance Propagation: An Overview",
2019, Sec. 10.3.1; Zennit calls this "canonization"). :func:`fold_batchnorm` does this on a deep copy: the user's
model is never modified, and the copy's outputs equal the model's up to float rounding.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import torch
from torch import nn

__all__ = ["fold_batchnorm", "has_foldable_batchnorm"]

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_LINEAR_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _foldable(bn: nn.Module) -> bool:
    """An eval-mode BatchNorm that normalizes with its running statistics (an affine map)."""
    return isinstance(bn, _BATCHNORMS) and not bn.training and bn.running_mean is not None


def has_foldable_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` holds a BatchNorm in eval mode with running statistics (a candidate for folding).

    Example:
        >>> has_foldable_batchnorm(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).eval())
        True
    """
    return any(_foldable(m) for m in model.modules())


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def fold_batchnorm(
    model: nn.Module, example_inputs: torch.Tensor, forward: Optional[Callable[[nn.Module, torch.Tensor], Any]] = None
) -> tuple[nn.Module, list[tuple[str, str]]]:
    """A deep copy of ``model`` with every eval-mode BatchNorm folded into the layer that produces its input.

    One forward pass of ``example_inputs`` on the copy (one example is enough) finds the pairs: a BatchNorm is folded
    when its input is exactly the output of a ``Linear``/``Conv1d``/``Conv2d``/``Conv3d`` whose output channels it
    normalizes, and both modules run once per forward. The folded BatchNorm becomes ``nn.Identity``. BatchNorms in
    training mode (they normalize with batch statistics) and BatchNorms after other operations are left as they are.
    A layer whose pre-BatchNorm output is also used elsewhere (rare) would change that other use: such models should
    not be canonized.

    Args:
        model: the model; never modified (put it in eval mode first to fold its BatchNorms).
        example_inputs: inputs the model takes, used for one forward pass on the copy.
        forward: runs that pass as ``forward(copy, inputs)`` (default ``copy(inputs)``), e.g. to translate errors.

    Returns:
        ``(copy, pairs)`` with ``pairs`` the ``(layer_name, batchnorm_name)`` folded.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()).eval()
        >>> folded, pairs = fold_batchnorm(net, torch.rand(1, 1, 5, 5))
        >>> pairs, isinstance(folded[1], nn.Identity)
        ([('0', '1')], True)
        >>> x = torch.rand(2, 1, 5, 5)
        >>> torch.allclose(folded(x), net(x), atol=1e-6)
        True
    """
    clone = copy.deepcopy(model)
    names = {id(m): n for n, m in clone.named_modules()}
    calls: dict[int, int] = {}
    produced_by: dict[int, tuple[nn.Module, torch.Tensor]] = {}  # id(output) -> (layer, output): keeps it alive
    candidates: list[tuple[nn.Module, nn.Module]] = []

    def record(module: nn.Module, inputs: Any, output: Any) -> None:
        calls[id(module)] = calls.get(id(module), 0) + 1
        if isinstance(module, _LINEAR_LAYERS) and isinstance(output, torch.Tensor):
            produced_by[id(output)] = (module, output)
        elif _foldable(module) and inputs and isinstance(inputs[0], torch.Tensor):
            source = produced_by.get(id(inputs[0]))
            # a Linear feeding a BatchNorm1d folds only on (batch, features) outputs: BatchNorm1d normalizes dim 1
            if source is not None and source[1] is inputs[0] and not (
                isinstance(source[0], nn.Linear) and inputs[0].dim() != 2
            ):
                candidates.append((source[0], module))

    handles = [m.register_forward_hook(record) for m in clone.modules()]
    try:
        sample = example_inputs[:1].detach().clone()
        clone(sample) if forward is None else forward(clone, sample)
    finally:
        for handle in handles:
            handle.remove()
    pairs: list[tuple[str, str]] = []
    for layer, bn in candidates:
        out_channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        if calls.get(id(layer)) != 1 or calls.get(id(bn)) != 1 or bn.num_features != out_channels:
            continue
        scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        weight = layer.weight * scale.view(-1, *([1] * (layer.weight.dim() - 1)))
        bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
        layer.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
        layer.bias = nn.Parameter((bias - bn.running_mean) * scale + shift, requires_grad=layer.weight.requires_grad)
        _set_submodule(clone, names[id(bn)], nn.Identity())
        pairs.append((names[id(layer)], names[id(bn)]))
    return clone, pairs
