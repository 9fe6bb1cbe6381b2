"""Helpers of the chunking tests of the multi-sample attribution methods."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def conv_model_5x5() -> nn.Module:
    """A seeded conv net for (B, 2, 5, 5) inputs, in eval mode."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).eval()


def rows_of_every_forward(model: nn.Module, run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """``run()``'s result and the number of rows of every forward of ``model`` during it."""
    rows: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        return run(), rows
    finally:
        handle.remove()
