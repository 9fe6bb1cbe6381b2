"""One narrow rule for attribution targets: an int, a per-example 1-D tensor (or sequence), or None for argmax."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch

Target = Union[int, Sequence[int], torch.Tensor, None]


def per_example_target(target: Target, batch: int, device: torch.device) -> torch.Tensor:
    """A given (not None) target as ``(batch,)`` class indices, checked for type and shape but not yet against the
    number of classes (:func:`resolve_target` does that once the model's output is known).

    Lets a method skip the forward pass that only resolving ``None`` needs.

    Example:
        >>> per_example_target(2, 3, torch.device("cpu")).tolist()
        [2, 2, 2]
    """
    if target is None:
        raise ValueError("target=None means the predicted classes: resolve it with resolve_target(None, logits)")
    if isinstance(target, bool):
        raise TypeError("target must be an int, a 1-D tensor of class indices or None, got a bool")
    if isinstance(target, int):
        out = torch.full((batch,), target, dtype=torch.long, device=device)
    else:
        out = torch.as_tensor(target, device=device)
        if out.dim() == 0:
            out = out.expand(batch)
        if out.dim() != 1 or out.shape[0] != batch:
            raise ValueError(
                f"target must hold one class index per example: expected shape ({batch},), got {tuple(out.shape)}"
            )
        if out.is_floating_point() or out.dtype == torch.bool:
            raise TypeError(f"target must hold integer class indices, got dtype {out.dtype}")
        out = out.long()
    # a normal tensor even when target was made under inference mode, so autograd accepts it later
    with torch.inference_mode(False):
        return out.clone()


def resolve_target(target: Target, logits: torch.Tensor) -> torch.Tensor:
    """Per-example class indices, shape ``(B,)``, for model outputs ``logits`` of shape ``(B, C)``.

    Args:
        target: ``None`` (the predicted class), an ``int`` (the same class for every example), or a 1-D tensor or
            sequence of ``B`` class indices. For a model with a single output (``(B, 1)``, a binary classifier's
            score) the only index is 0, and ``None`` selects it.
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
        with torch.inference_mode(False):
            out = logits.detach().argmax(dim=1).clone()
    else:
        out = per_example_target(target, batch, logits.device)
    if out.numel() and (int(out.min()) < 0 or int(out.max()) >= classes):
        # the distinct offending values: a method may resolve targets on rows that repeat each example many times
        bad = sorted({int(v) for v in out[(out < 0) | (out >= classes)].tolist()})
        if classes == 1:
            raise ValueError(
                f"target: the model returns a single score per example (outputs of shape (batch, 1)), so the only"
                f" target is 0, that score (None selects it too); got {bad}. Binary labels 0/1 do not index a"
                " one-score output: explain target=0 (the evidence for the positive class), or make the model return"
                " two logits, e.g. torch.cat([-score, score], dim=1)"
            )
        raise ValueError(f"target class indices must lie in [0, {classes - 1}], got out-of-range {bad}")
    return out
