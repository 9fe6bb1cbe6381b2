"""Module helpers: mode preservation, name lookup, execution order."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Union

import torch
from torch import nn

from lightning_lens.utils.checks import check_instance


@contextlib.contextmanager
def preserve_modes(model: nn.Module, mode: bool | None = None) -> Iterator[nn.Module]:
    """Record every submodule's ``training`` flag and restore it on exit, also after an exception.

    Args:
        model: the model.
        mode: if given, ``model.train(mode)`` on entry (``False`` for eval).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout()); net[1].eval()
        Dropout(p=0.5, inplace=False)
        >>> with preserve_modes(net, mode=False):
        ...     pass
        >>> [m.training for m in net.modules()]
        [True, True, False]
    """
    saved = [(m, m.training) for m in model.modules()]
    try:
        if mode is not None:
            model.train(mode)
        yield model
    finally:
        for m, flag in saved:
            m.training = flag


def resolve_module(model: nn.Module, layer: Union[nn.Module, str], argument: str = "layer") -> nn.Module:
    """The submodule ``layer`` of ``model``: the module itself or its dotted name (``"features.7"``).

    Raises a ``ValueError`` naming ``argument`` and listing close names when it is not found.
    """
    check_instance(layer, argument, (nn.Module, str), hint="a submodule or its dotted name, e.g. 'features.7'")
    if isinstance(layer, nn.Module):
        if not any(m is layer for m in model.modules()):
            raise ValueError(f"{argument}: the given module is not a submodule of the model")
        return layer
    modules = dict(model.named_modules())
    if layer in modules:
        return modules[layer]
    names = [n for n in modules if n]
    hint = ", ".join(repr(n) for n in names[:12]) + (" ..." if len(names) > 12 else "")
    raise ValueError(f"{argument}={layer!r} is not a module of the model; available names: {hint}")


def modules_in_execution_order(
    model: nn.Module,
    *inputs: Any,
    predicate: Callable[[nn.Module], bool] | None = None,
) -> list[tuple[str, nn.Module]]:
    """Submodules in the order their forward runs first, found by one forward pass without grad.

    Args:
        model: the model.
        inputs: arguments for ``model(*inputs)``.
        predicate: keep only modules for which this is true (default: all but the root).

    Hooks are removed and modes restored even if the forward raises.
    """
    order: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    handles = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if id(module) not in seen:
                seen.add(id(module))
                order.append((name, module))

        return hook

    try:
        for name, module in model.named_modules():
            if module is model:
                continue
            if predicate is None or predicate(module):
                handles.append(module.register_forward_pre_hook(make_hook(name)))
        # clones: a model that edits its input in place must not change the caller's tensors
        args = [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]
        with preserve_modes(model, mode=False), torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return order
