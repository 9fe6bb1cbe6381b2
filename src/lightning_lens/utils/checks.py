"""Argument validators shared by the whole package: each error names the argument and says what it expects.

Pure Python / PyTorch (no Lightning), so the attribution methods, the metrics and the callbacks raise the same errors.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Callable, Optional, TypeVar, Union

import torch

__all__ = [
    "check_bool",
    "check_callable",
    "check_choice",
    "check_finite",
    "check_float",
    "check_fraction",
    "check_instance",
    "check_int",
    "check_key",
    "check_optional",
    "check_positive_number",
    "check_str_list",
    "check_tensor",
]

T = TypeVar("T")


def check_int(value: Any, argument: str, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """``value`` as an int if it is an integer (a Python or NumPy int, not a bool) in ``[minimum, maximum]``.

    Raises:
        TypeError: ``value`` is not an int.
        ValueError: ``value < minimum`` or ``value > maximum``.

    Example:
        >>> check_int(3, "every_n_epochs", minimum=1)
        3
        >>> check_int(5, "max_depth", minimum=1, maximum=4)
        Traceback (most recent call last):
        ...
        ValueError: max_depth must be <= 4, got 5
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{argument} must be an int, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{argument} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{argument} must be <= {maximum}, got {value}")
    return value


def check_float(
    value: Any,
    argument: str,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
    open_min: bool = False,
    open_max: bool = False,
) -> float:
    """``value`` as a float if it is a real number (int or float, not a bool, not NaN) within the bounds.

    Args:
        minimum, maximum: bounds, inclusive unless ``open_min`` / ``open_max``.

    Raises:
        TypeError: ``value`` is not a real number.
        ValueError: ``value`` is NaN or out of bounds.

    Example:
        >>> check_float(0.5, "alpha", minimum=0.0, maximum=1.0)
        0.5
        >>> check_float(0, "lr", minimum=0.0, open_min=True)
        Traceback (most recent call last):
        ...
        ValueError: lr must be > 0.0, got 0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{argument} must be a number, got {type(value).__name__}")
    number = float(value)
    if math.isnan(number):
        raise ValueError(f"{argument} must be a number, got NaN")
    if minimum is not None and (number <= minimum if open_min else number < minimum):
        raise ValueError(f"{argument} must be {'>' if open_min else '>='} {minimum}, got {value!r}")
    if maximum is not None and (number >= maximum if open_max else number > maximum):
        raise ValueError(f"{argument} must be {'<' if open_max else '<='} {maximum}, got {value!r}")
    return number


def check_positive_number(value: Any, argument: str) -> float:
    """``value`` as a float if it is a finite number > 0 (a time budget in seconds, a learning rate, a scale).

    Example:
        >>> check_positive_number(2, "time_budget")
        2.0
        >>> check_positive_number(float("inf"), "time_budget")
        Traceback (most recent call last):
        ...
        ValueError: time_budget must be a finite number > 0, got inf
    """
    number = check_float(value, argument, minimum=0.0, open_min=True)
    if math.isinf(number):
        raise ValueError(f"{argument} must be a finite number > 0, got {value!r}")
    return number


def check_fraction(value: Any, argument: str, allow_zero: bool = False, allow_one: bool = True) -> float:
    """``value`` as a float if it is a fraction: in ``(0, 1]`` by default; ``allow_zero``/``allow_one`` close or
    open the ends (``[0, 1]`` for a probability, ``(0, 1)`` for a significance level).

    Example:
        >>> check_fraction(0.25, "max_overhead")
        0.25
        >>> check_fraction(0.0, "mislabel_fraction", allow_zero=True)
        0.0
        >>> check_fraction(1.5, "alpha", allow_one=False)
        Traceback (most recent call last):
        ...
        ValueError: alpha must be < 1.0, got 1.5
    """
    return check_float(value, argument, minimum=0.0, maximum=1.0, open_min=not allow_zero, open_max=not allow_one)


def check_instance(value: Any, argument: str, types: Union[type, tuple[type, ...]], hint: str = "") -> Any:
    """``value`` if it is an instance of ``types``; the error names the expected type(s) and adds ``hint``.

    Example:
        >>> check_instance({"a": 1}, "metadata", dict)
        {'a': 1}
        >>> check_instance([1], "metadata", dict, hint="a dict of attribute name -> values")
        Traceback (most recent call last):
        ...
        TypeError: metadata must be a dict (a dict of attribute name -> values), got list
    """
    if not isinstance(value, types):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        extra = f" ({hint})" if hint else ""
        raise TypeError(f"{argument} must be a {names}{extra}, got {type(value).__name__}")
    return value


def check_optional(check: Callable[..., T], value: Any, argument: str, *args: Any, **kwargs: Any) -> Optional[T]:
    """``None`` if ``value`` is None, else ``check(value, argument, *args, **kwargs)``.

    Example:
        >>> check_optional(check_int, None, "max_slices", minimum=1) is None
        True
        >>> check_optional(check_int, 3, "max_slices", minimum=1)
        3
    """
    return None if value is None else check(value, argument, *args, **kwargs)


def check_key(value: Any, argument: str) -> Union[int, str, Callable[..., Any], None]:
    """``value`` if it can select part of a batch: a tuple position (int), a dict key (str), a callable
    ``batch -> part`` or None (the default lookup).

    Example:
        >>> check_key("image", "input_key")
        'image'
        >>> check_key(1.0, "target_key")
        Traceback (most recent call last):
        ...
        TypeError: target_key must be an int, a str, a callable or None, got float
    """
    if value is None or callable(value) or (isinstance(value, (int, str)) and not isinstance(value, bool)):
        return value
    raise TypeError(f"{argument} must be an int, a str, a callable or None, got {type(value).__name__}")


def check_callable(value: Any, argument: str, hint: str = "") -> Callable[..., Any]:
    """``value`` if it is callable; the error adds ``hint`` (what the function takes and returns).

    Example:
        >>> check_callable(len, "output_fn").__name__
        'len'
        >>> check_callable("logits", "output_fn", hint="model output -> (batch, classes) scores")
        Traceback (most recent call last):
        ...
        TypeError: output_fn must be a function (model output -> (batch, classes) scores), got str
    """
    if not callable(value):
        extra = f" ({hint})" if hint else ""
        raise TypeError(f"{argument} must be a function{extra}, got {type(value).__name__}")
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


def check_differentiable_inputs(value: Any, argument: str = "inputs", *, min_dim: int = 2) -> torch.Tensor:
    """``value`` if it is a batch an attribution method can differentiate: a floating-point tensor (see
    :func:`check_tensor`). Integer inputs get a ``TypeError`` that says why: ``inputs.float()`` is no fix for token ids,
    whose gradient only exists at the output of the embedding layer.

    Example:
        >>> check_differentiable_inputs(torch.zeros(2, 3)).dtype
        torch.float32
    """
    if isinstance(value, torch.Tensor) and not value.is_floating_point():
        raise TypeError(
            f"{argument} must be a floating-point tensor, got dtype {value.dtype}: attribution methods take gradients"
            f" (or perturb values) with respect to {argument}. Integer inputs such as token ids cannot be"
            " differentiated, and converting them to float does not help: explain the output of the embedding layer"
            " instead: a gradient method with layer=<the embedding module>, e.g."
            " IntegratedGradients(model, layer='embeddings')"
        )
    return check_tensor(value, argument, min_dim=min_dim)


def check_finite(value: torch.Tensor, argument: str) -> None:
    """Refuse NaN and infinite entries.

    Example:
        >>> check_finite(torch.ones(2), "attributions")
    """
    if not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{argument} holds {bad} NaN or infinite values; fix the method that produced them")
