"""Keeping the training's global random streams where they were: private generators, and restoring the global ones."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from typing import Any, Optional, Union

import numpy as np
import torch

from lightning_lens.utils.checks import check_int

__all__ = ["check_seed", "global_rng_preserved", "private_generator"]


def check_seed(seed: Any) -> Optional[int]:
    """A method's ``seed`` option: an int, or None for fresh entropy on every call."""
    return None if seed is None else check_int(seed, "seed")


def private_generator(seed: Optional[int], device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """A generator on ``device``: seeded with ``seed``, or from OS entropy when ``seed`` is None (global RNG untouched).

    Example:
        >>> a, b = private_generator(3), private_generator(3)
        >>> torch.equal(torch.rand(2, generator=a), torch.rand(2, generator=b))
        True
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") & (2**63 - 1))
    return gen


@contextlib.contextmanager
def global_rng_preserved() -> Iterator[None]:
    """Restore the global torch (CPU, and initialised CUDA devices), NumPy and ``random`` states on exit: reading
    training data (sampler permutations, loader seeds, random transforms) must not move the streams training uses.

    Example:
        >>> state = torch.get_rng_state()
        >>> with global_rng_preserved():
        ...     _ = torch.rand(3)
        >>> torch.equal(torch.get_rng_state(), state)
        True
    """
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
