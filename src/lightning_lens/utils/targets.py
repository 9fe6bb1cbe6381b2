"""One narrow rule for attribution targets: an int, a per-example 1-D tensor (or sequence), or None for argmax."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch

Target = Union[int, Sequence[int], torch.Tensor, None]


def resolve_target(target: Target, logits: torch.Tensor) -> torch.Tensor:
    """Per-example class indices, shape ``(B,)``, for model outputs ``logits`` of shape ``(B, C)``.

    Args:
        target: ``None`` (the predicted class), an ``int`` (the same class for every example), or a 1-D tensor or
            sequence of ``B`` class indices.
        logits: the model's output, ``(B, C)``.

    Example:
        >>> resolve_target(None, torch.tensor([[0.0, 2.0], [3.0, 1.0]])).tolist()
        [1, 0]
    """
    if logits.dim() != 2:
        raise ValueError(
            f"the model must return logits of shape (batch, classes) to pick a target, got shape {tuple(logits.shape)};"
            " wrap the model so that it returns one score per class"
        )
    batch, classes = logits.shape
    if target is None:
        out = logits.detach().argmax(dim=1)
    elif isinstance(target, bool):
        raise TypeError("target must be an int, a 1-D tensor of class indices or None, got a bool")
    elif isinstance(target, int):
        out = torch.full((batch,), target, dtype=torch.long, device=logits.device)
    else:
        out = torch.as_tensor(target, device=logits.device)
        if out.dim() == 0:
            out = out.expand(batch)
        if out.dim() != 1 or out.shape[0] != batch:
            raise ValueError(
                f"target must hold one class index per example: expected shape ({batch},), got {tuple(out.shape)}"
            )
        if out.is_floating_point() or out.dtype == torch.bool:
            raise TypeError(f"target must hold integer class indices, got dtype {out.dtype}")
        out = out.long()
    # a normal tensor even when target or logits were made under inference mode, so autograd accepts it later
    with torch.inference_mode(False):
        out = out.clone()
    if out.numel() and (int(out.min()) < 0 or int(out.max()) >= classes):
        raise ValueError(f"target class indices must lie in [0, {classes - 1}], got {out.tolist()}")
    return out
