"""Gradients inside evaluation code.

``trainer.validate()`` runs under ``torch.inference_mode`` by default, where ``enable_grad`` alone does nothing and
the batch tensors are inference tensors that autograd refuses. Both helpers here leave inference mode and clone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def gradients_enabled() -> Iterator[None]:
    """Leave inference mode and enable autograd for the duration of the block.

    Example:
        >>> with torch.inference_mode():
        ...     with gradients_enabled():
        ...         x = grad_ready(torch.ones(2))
        ...         (x * 3).sum().backward() is None
        True
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield


def grad_ready(x: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``x`` (a normal tensor even if ``x`` is an inference tensor) that requires grad.

    Call it inside :func:`gradients_enabled`.
    """
    if not x.is_floating_point():
        raise TypeError(f"inputs must be a floating-point tensor to take gradients, got dtype {x.dtype}")
    return x.detach().clone().requires_grad_(True)
