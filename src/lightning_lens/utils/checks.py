"""Argument validators shared by the whole package: each error names the argument and says what it expects.

Pure Python / PyTorch (no Lightning), so the attribution methods, the metrics and the callbacks raise the same errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch

__all__ = ["check_bool", "check_choice", "check_finite", "check_int", "check_str_list", "check_tensor"]


def check_int(value: Any, argument: str, minimum: Optional[int] = None) -> int:
    """``value`` if it is an int (not a bool) and at least ``minimum``.

    Raises:
        TypeError: ``value`` is not an int.
        ValueError: ``value < minimum``.

    Example:
        >>> check_int(3, "every_n_epochs", minimum=1)
        3
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argument} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{argument} must be >= {minimum}, got {value}")
    return value


def check_bool(value: Any, argument: str) -> bool:
    """``value`` if it is a bool.

    Example:
        >>> check_bool(True, "controls")
        True
    """
    if not isinstance(value, bool):
        raise TypeError(f"{argument} must be a bool, got {type(value).__name__}")
    return value


def check_choice(value: Any, argument: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``.

    Example:
        >>> check_choice("label", "target", ("label", "prediction"))
        'label'
    """
    if value not in choices:
        raise ValueError(f"{argument} must be one of {list(choices)}, got {value!r}")
    return value


def check_str_list(value: Any, argument: str) -> tuple[str, ...]:
    """``value`` as a tuple if it is a sequence of strings (a lone string is refused).

    Example:
        >>> check_str_list(["digit", "square"], "mask_regions")
        ('digit', 'square')
    """
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{argument} must be a list of strings, got {value!r}")
    return tuple(value)


def check_tensor(value: Any, argument: str = "inputs", *, floating: bool = True, min_dim: int = 2) -> torch.Tensor:
    """``value`` if it is a non-empty batch: a tensor with a leading batch dimension (floating-point by default).

    Example:
        >>> check_tensor(torch.zeros(2, 3), "inputs").shape
        torch.Size([2, 3])
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{argument} must be a torch.Tensor of shape (batch, ...), got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(
            f"{argument} must be a floating-point tensor, got dtype {value.dtype}; convert it with {argument}.float()"
        )
    if value.dim() < min_dim:
        raise ValueError(
            f"{argument} must have a leading batch dimension and at least {min_dim} dimensions, got shape"
            f" {tuple(value.shape)}; add one with {argument}.unsqueeze(0)"
        )
    if value.shape[0] == 0:
        raise ValueError(f"{argument} is an empty batch (shape {tuple(value.shape)})")
    return value


def check_finite(value: torch.Tensor, argument: str) -> None:
    """Refuse NaN and infinite entries.

    Example:
        >>> check_finite(torch.ones(2), "attributions")
    """
    if not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{argument} holds {bad} NaN or infinite values; fix the method that produced them")
