"""Shared checks and reductions for the evaluation metrics: one feature map per example, one mask per example."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import nn

from lightning_lens.attribution.base import OutputFn, forward_logits
from lightning_lens.utils import preserve_modes, resolve_target
from lightning_lens.utils.checks import check_choice, check_tensor
from lightning_lens.utils.targets import Target

#: How an attribution with channels becomes one score per pixel.
#:
#: * ``"sum"``: sum over channels (signed), the convention of Captum's visualizations and of RISE-style orderings;
#: * ``"sum_pos"``: sum over channels, then keep the positive part (Arras et al. 2022's pooling for relevance mass
#:   and rank: only evidence *for* the class counts);
#: * ``"abs_sum"``: sum of absolute values over channels (sign-agnostic sensitivity, as Captum's ``Saliency``);
#: * ``"l2_sq"``: sum of squares over channels (Arras et al.'s alternative, "L2-norm squared").
POOLINGS = ("sum", "sum_pos", "abs_sum", "l2_sq")


def feature_map(
    attributions: torch.Tensor,
    inputs_shape: Optional[torch.Size],
    pooling: str,
    argument: str = "attributions",
) -> torch.Tensor:
    """One score per feature, shape ``(B, *feature_shape)``.

    Image-like (4-D) attributions ``(B, C, H, W)`` become pixel maps ``(B, H, W)`` pooled over channels; CAM maps
    ``(B, 1, H, W)`` are just squeezed; 3-D ``(B, H, W)`` maps are taken as they are. Any other shape is one feature
    per element (pooling then only applies its sign rule). ``inputs_shape``, when given, must agree spatially.
    """
    check_choice(pooling, "pooling", POOLINGS)
    check_tensor(attributions, argument)
    a = attributions.detach()
    if inputs_shape is not None and len(inputs_shape) == 4:
        spatial = tuple(inputs_shape[2:])
        if a.dim() == 3:
            a = a.unsqueeze(1)
        if a.dim() != 4 or a.shape[0] != inputs_shape[0] or tuple(a.shape[2:]) != spatial:
            raise ValueError(
                f"{argument} of shape {tuple(attributions.shape)} do not match inputs of shape {tuple(inputs_shape)}:"
                f" expected ({inputs_shape[0]}, C or 1, {spatial[0]}, {spatial[1]}); for Grad-CAM keep"
                " upsample=True so maps come at input resolution"
            )
        if a.shape[1] not in (1, inputs_shape[1]):
            raise ValueError(
                f"{argument} have {a.shape[1]} channels but the inputs have {inputs_shape[1]}: expected 1 or"
                f" {inputs_shape[1]}"
            )
    elif inputs_shape is not None and tuple(a.shape) != tuple(inputs_shape):
        raise ValueError(
            f"{argument} of shape {tuple(attributions.shape)} must have the inputs' shape {tuple(inputs_shape)}"
        )
    if a.dim() == 4:
        if pooling == "sum":
            return a.sum(1)
        if pooling == "sum_pos":
            return a.sum(1).clamp_min(0)
        if pooling == "abs_sum":
            return a.abs().sum(1)
        return a.pow(2).sum(1)
    if pooling == "sum":
        return a
    if pooling == "sum_pos":
        return a.clamp_min(0)
    if pooling == "abs_sum":
        return a.abs()
    return a.pow(2)


def binary_masks(masks: Any, feature_shape: torch.Size, batch: int, argument: str = "masks") -> torch.Tensor:
    """Masks as a bool tensor ``(B, *feature_shape)``.

    Accepts ``(B, H, W)``, ``(B, 1, H, W)`` or ``(B, C, H, W)`` (a pixel is inside if any channel is). Bool masks are
    used as they are; numeric masks count a value > 0.5 as inside (so interpolated soft masks still threshold sanely).
    """
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"{argument} must be a tensor of shape (batch, [1,] H, W), got {type(masks).__name__}")
    m = masks.detach()
    m = m if m.dtype == torch.bool else m > 0.5
    if m.dim() == len(feature_shape) + 2 and len(feature_shape) == 2:
        m = m.any(dim=1)
    if m.shape[0] != batch or tuple(m.shape[1:]) != tuple(feature_shape):
        raise ValueError(
            f"{argument} of shape {tuple(masks.shape)} do not match {batch} maps of shape {tuple(feature_shape)};"
            f" expected ({batch}, {', '.join(map(str, feature_shape))}) or ({batch}, 1,"
            f" {', '.join(map(str, feature_shape))})"
        )
    return m


def model_device(model: nn.Module, default: torch.device) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return default


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, no BatchNorm statistics updates) and no autograd; every module's mode is restored."""
    with preserve_modes(model, mode=False), torch.no_grad():
        yield


def resolve_targets(model: nn.Module, inputs: torch.Tensor, target: Target, batch_size: int,
                    output_fn: Optional[OutputFn] = None) -> torch.Tensor:
    """Per-example class indices ``(B,)``; ``None`` means the model's prediction on ``inputs`` (run in eval mode;
    scores as :func:`~lightning_lens.attribution.base.forward_logits` with ``output_fn``)."""
    with evaluating(model):
        if target is None:
            logits = torch.cat([forward_logits(model, chunk, output_fn) for chunk in inputs.split(batch_size)])
        else:  # the class count is only needed for the range check: one example suffices
            logits = forward_logits(model, inputs[:1], output_fn).expand(inputs.shape[0], -1)
    return resolve_target(target, logits)
