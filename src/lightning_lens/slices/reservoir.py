"""A bounded uniform sample of a stream: reservoir sampling (Vitter 1985, Algorithm R)."""

from __future__ import annotations

from typing import Any, Generic, Hashable, TypeVar

import numpy as np

from lightning_lens.utils.checks import check_int

__all__ = ["Reservoir"]

T = TypeVar("T")


class Reservoir(Generic[T]):
    """Keeps a uniform sample of at most ``capacity`` of the ``(key, item)`` pairs offered to it.

    After ``n`` offers every pair is held with probability ``min(1, capacity / n)`` (J. S. Vitter, "Random sampling
    with a reservoir", ACM TOMS 11(1), 1985, Algorithm R). The generator is private, so the global NumPy and torch
    random states are untouched.

    Args:
        capacity: most pairs held (0 holds nothing).
        seed: seed of the private generator.

    Example:
        >>> r = Reservoir(capacity=3, seed=0)
        >>> for i in range(100):
        ...     r.offer(i, f"item {i}")
        >>> len(r), r.seen
        (3, 100)
        >>> r.as_dict()[r.keys()[0]] == f"item {r.keys()[0]}"
        True
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = check_int(capacity, "capacity", minimum=0)
        self._rng = np.random.default_rng(check_int(seed, "seed"))
        self._items: list[tuple[Hashable, T]] = []
        self.seen = 0

    def offer(self, key: Hashable, item: T) -> None:
        """Offer one pair; it replaces a random held one with probability ``capacity / seen``."""
        self.seen += 1
        if len(self._items) < self.capacity:
            self._items.append((key, item))
            return
        slot = int(self._rng.integers(0, self.seen))
        if slot < self.capacity:
            self._items[slot] = (key, item)

    def reset(self) -> None:
        """Empty it for a new stream (the generator continues its sequence)."""
        self._items = []
        self.seen = 0

    def keys(self) -> list[Any]:
        return [k for k, _ in self._items]

    def as_dict(self) -> dict[Any, T]:
        return dict(self._items)

    def __len__(self) -> int:
        return len(self._items)
