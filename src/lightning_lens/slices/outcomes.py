"""Per-sample outcomes of a classifier (loss, prediction, correctness) with the samples that cannot be used flagged.

A NaN or infinite input, logit or loss, or a label outside the classes, is a data problem, not an error: the sample
gets a non-zero status (its reason) and is left out of the slice search, counted.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["EXCLUSION_REASONS", "classification_outcomes", "exclusion_counts"]

#: ``status - 1`` indexes this tuple; status 0 is a usable sample
EXCLUSION_REASONS = (
    "non-finite inputs",
    "non-finite logits",
    "label outside the classes",
    "non-finite loss",
    "non-finite embedding",
)


def _flag(status: torch.Tensor, bad: torch.Tensor, reason: str) -> None:
    status[(status == 0) & bad] = EXCLUSION_REASONS.index(reason) + 1


def classification_outcomes(
    logits: torch.Tensor, targets: torch.Tensor, inputs: Optional[torch.Tensor] = None
) -> dict[str, np.ndarray]:
    """Per-sample cross-entropy loss, prediction, confidence, correctness and status of a batch.

    Args:
        logits: ``(B, C)`` class logits, or ``(B,)`` / ``(B, 1)`` binary logits (positive class 1).
        targets: ``B`` class indices (0/1 for binary logits).
        inputs: the batch's inputs, to flag samples with NaN/inf values (floating-point inputs only).

    Returns:
        NumPy arrays of length B: ``loss`` (float64, NaN where excluded), ``pred``, ``label`` (int64, -1 where the
        label is unusable), ``confidence`` (probability of the prediction), ``correct`` (bool), ``status`` (int8: 0
        usable, else ``1 + EXCLUSION_REASONS.index(reason)``; the first reason that applies).

    Raises:
        ValueError: logits that are not ``(B, C)``, ``(B,)`` or ``(B, 1)``, or targets without one value per sample.

    Example:
        >>> out = classification_outcomes(torch.tensor([[2.0, 0.0], [float("nan"), 0.0], [0.0, 3.0]]),
        ...                               torch.tensor([0, 0, 7]))
        >>> out["correct"].tolist(), [EXCLUSION_REASONS[s - 1] if s else "ok" for s in out["status"]]
        ([True, False, False], ['ok', 'non-finite logits', 'label outside the classes'])
    """
    logits = logits.detach().float()
    b = logits.shape[0]
    if logits.dim() == 2 and logits.shape[1] == 1:
        logits = logits.reshape(b)
    if logits.dim() not in (1, 2) or (logits.dim() == 2 and logits.shape[1] < 2):
        raise ValueError(f"classification logits must be (B, C) or (B,), got shape {tuple(logits.shape)}")
    targets = torch.as_tensor(targets).detach().to(logits.device)
    if targets.numel() != b:
        raise ValueError(f"targets must hold one class index per sample ({b}), got shape {tuple(targets.shape)}")
    t = targets.reshape(b).double()
    classes = 2 if logits.dim() == 1 else logits.shape[1]
    status = torch.zeros(b, dtype=torch.int8, device=logits.device)
    if inputs is not None and inputs.is_floating_point() and inputs.shape[0] == b:
        _flag(status, ~torch.isfinite(inputs.detach().reshape(b, -1)).all(dim=1), "non-finite inputs")
    finite_logits = torch.isfinite(logits) if logits.dim() == 1 else torch.isfinite(logits).all(dim=1)
    _flag(status, ~finite_logits, "non-finite logits")
    _flag(status, ~(torch.isfinite(t) & (t == t.round()) & (t >= 0) & (t < classes)), "label outside the classes")
    usable = status == 0
    label = torch.where(usable, t.nan_to_num(0.0), torch.zeros_like(t)).long()
    z = torch.where(finite_logits if logits.dim() == 1 else finite_logits[:, None], logits, torch.zeros_like(logits))
    if logits.dim() == 1:
        loss = F.binary_cross_entropy_with_logits(z, label.float(), reduction="none")
        pred = (z > 0).long()
        p1 = torch.sigmoid(z)
        confidence = torch.where(pred == 1, p1, 1 - p1)
    else:
        loss = F.cross_entropy(z, label, reduction="none")
        confidence, pred = z.softmax(dim=1).max(dim=1)
    _flag(status, ~torch.isfinite(loss), "non-finite loss")
    usable = status == 0
    return {
        "loss": torch.where(usable, loss, torch.full_like(loss, float("nan"))).cpu().double().numpy(),
        "pred": pred.cpu().numpy().astype(np.int64),
        "label": torch.where(usable, label, torch.full_like(label, -1)).cpu().numpy().astype(np.int64),
        "confidence": confidence.cpu().double().numpy(),
        "correct": (usable & (pred == label)).cpu().numpy(),
        "status": status.cpu().numpy(),
    }


def exclusion_counts(status: np.ndarray) -> dict[str, int]:
    """Samples per exclusion reason (reasons with none left out), from the ``status`` of
    :func:`classification_outcomes`.

    Example:
        >>> exclusion_counts(np.array([0, 2, 2, 4], dtype=np.int8))
        {'non-finite logits': 2, 'non-finite loss': 1}
    """
    counts = np.bincount(np.asarray(status, dtype=np.int64), minlength=len(EXCLUSION_REASONS) + 1)
    return {reason: int(counts[i + 1]) for i, reason in enumerate(EXCLUSION_REASONS) if counts[i + 1]}
