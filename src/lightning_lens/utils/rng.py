"""Keeping the training's global random streams where they were."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["global_rng_preserved"]


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
