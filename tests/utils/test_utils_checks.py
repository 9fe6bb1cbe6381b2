"""The shared validators: wrong type -> TypeError, wrong value -> ValueError, both naming the argument."""

import math

import numpy as np
import pytest
import torch

from lightning_lens.utils.checks import (
    check_float,
    check_fraction,
    check_instance,
    check_int,
    check_key,
    check_optional,
    check_positive_number,
)


def test_check_int_bounds_types_and_numpy_integers():
    assert check_int(np.int64(3), "n", minimum=1) == 3 and type(check_int(np.int64(3), "n")) is int
    assert check_int(4, "max_depth", minimum=1, maximum=4) == 4
    with pytest.raises(ValueError, match="max_depth must be <= 4, got 5"):
        check_int(5, "max_depth", maximum=4)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        check_int(0, "n", minimum=1)
    for wrong in (True, 2.0, "2", None, torch.tensor(2)):
        with pytest.raises(TypeError, match="n must be an int, got"):
            check_int(wrong, "n")


@pytest.mark.parametrize(
    "kwargs, inside, outside",
    [
        (dict(minimum=0.0), [0.0, 1e9], [-1e-12]),
        (dict(minimum=0.0, open_min=True), [1e-12], [0.0, -1.0]),
        (dict(maximum=1.0), [1.0, -5.0], [1.0 + 1e-12]),
        (dict(maximum=1.0, open_max=True), [1.0 - 1e-12], [1.0]),
        (dict(minimum=0.0, maximum=100.0, open_min=True), [100.0, 0.5], [0.0, 100.5]),
    ],
)
def test_check_float_bounds_are_exact(kwargs, inside, outside):
    for value in inside:
        assert check_float(value, "x", **kwargs) == value
    for value in outside:
        with pytest.raises(ValueError, match="x must be"):
            check_float(value, "x", **kwargs)


def test_check_float_types_nan_and_numpy_scalars():
    assert check_float(np.float32(0.5), "alpha") == 0.5 and type(check_float(3, "alpha")) is float
    with pytest.raises(ValueError, match="alpha must be a number, got NaN"):
        check_float(math.nan, "alpha", minimum=0.0)
    for wrong in (True, "0.5", None, [0.5], torch.tensor(0.5)):
        with pytest.raises(TypeError, match="alpha must be a number, got"):
            check_float(wrong, "alpha")


def test_positive_numbers_and_fractions():
    assert check_positive_number(1e-9, "time_budget") == 1e-9
    for bad in (0, -1.0, math.inf):
        with pytest.raises(ValueError, match="time_budget must be"):
            check_positive_number(bad, "time_budget")
    assert check_fraction(1.0, "max_overhead") == 1.0
    with pytest.raises(ValueError, match=r"max_overhead must be > 0.0, got 0"):
        check_fraction(0, "max_overhead")
    assert check_fraction(0.0, "p", allow_zero=True) == 0.0
    with pytest.raises(ValueError, match="p must be < 1.0"):
        check_fraction(1.0, "p", allow_one=False)


def test_check_key_check_instance_check_optional():
    for key in (None, 0, "image", len):
        assert check_key(key, "input_key") is key
    for wrong in (True, 1.5, ("a",), b"x"):
        with pytest.raises(TypeError, match="input_key must be an int, a str, a callable or None"):
            check_key(wrong, "input_key")
    with pytest.raises(TypeError, match=r"layer must be a Module or str \(a submodule\), got int"):
        check_instance(3, "layer", (torch.nn.Module, str), hint="a submodule")
    assert check_optional(check_fraction, None, "alpha") is None
    assert check_optional(check_fraction, 0.5, "alpha", allow_one=False) == 0.5
    with pytest.raises(ValueError, match="alpha must be > 0.0"):
        check_optional(check_fraction, 0.0, "alpha")
