"""Counting over shards of the data: the slice search as local work between sums and gathers.

Every statistic the slice search needs is a sum over rows (sizes, error sums, loss sums per candidate), so data split
into shards (one per process) can be searched without moving rows: each shard counts its rows and the counts are
added. The search is written as a generator that *yields* what it needs from the other shards and receives the
answer:

- :class:`Sum` (named float64 arrays): the element-wise sum of every shard's arrays (an all-reduce);
- :class:`Gather` (any picklable object): every shard's object, in shard order (an all-gather).

All decisions depend on answers only, so every shard makes the same ones and asks the same questions in the same
order. :func:`run_local` answers for a single shard (a sum is its own answer); the Lightning callback answers with
collectives between ranks, outside its failure-isolated code (see ``SubgroupErrorSlices``).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, TypeVar, Union

import numpy as np

__all__ = ["Gather", "Steps", "Sum", "hash_ids", "run_local", "run_sharded"]

T = TypeVar("T")


@dataclass(frozen=True)
class Sum:
    """A request for the element-wise sum over shards of each named float64 array (same shapes on every shard)."""

    arrays: dict[str, np.ndarray]


@dataclass(frozen=True)
class Gather:
    """A request for every shard's ``obj`` (picklable), as a list in shard order."""

    obj: Any


Request = Union[Sum, Gather]
Steps = Generator[Request, Any, T]


def run_local(steps: "Steps[T]") -> T:
    """Run a generator of :class:`Sum` / :class:`Gather` requests on one shard holding all the data.

    Example:
        >>> def steps():
        ...     total = yield Sum({"n": np.array([3.0])})
        ...     parts = yield Gather("rows")
        ...     return float(total["n"][0]), parts
        >>> run_local(steps())
        (3.0, ['rows'])
    """
    reply: Any = None
    while True:
        try:
            request = steps.send(reply)
        except StopIteration as stop:
            return stop.value
        if isinstance(request, Sum):
            reply = {k: np.asarray(v, dtype=np.float64) for k, v in request.arrays.items()}
        elif isinstance(request, Gather):
            reply = [request.obj]
        else:
            raise TypeError(f"a slice search step must yield Sum or Gather, got {type(request).__name__}")


def run_sharded(shards: "list[Steps[T]]") -> list[T]:
    """Run one generator per shard in lock-step, answering each request with the sum / the list over all shards
    (what the collectives of a multi-process run do; for tests and single-process use of sharded data).

    Example:
        >>> def steps(rows):
        ...     total = yield Sum({"n": np.array([float(len(rows))])})
        ...     return float(total["n"][0])
        >>> run_sharded([steps([1, 2]), steps([3])])
        [3.0, 3.0]
    """
    requests: list[Any] = [None] * len(shards)
    results: list[Any] = [None] * len(shards)
    done = [False] * len(shards)
    reply: Any = None
    while True:
        for i, steps in enumerate(shards):
            try:
                requests[i] = steps.send(reply)
            except StopIteration as stop:
                results[i], done[i] = stop.value, True
        if all(done):
            return results
        if any(done) or len({type(r) for r in requests}) != 1:
            raise RuntimeError("shards diverged: they must ask for the same sums and gathers in the same order")
        if isinstance(requests[0], Sum):
            keys = list(requests[0].arrays)
            if any(list(r.arrays) != keys for r in requests):
                raise RuntimeError("shards asked for sums of different arrays")
            reply = {k: np.sum([np.asarray(r.arrays[k], dtype=np.float64) for r in requests], axis=0) for k in keys}
        else:
            reply = [r.obj for r in requests]


def hash_ids(ids: Any, seed: int = 0) -> np.ndarray:
    """A well-mixed uint64 per sample id (splitmix64): samples chosen by hash are the same however rows are sharded.

    Example:
        >>> h = hash_ids(np.arange(4))
        >>> h.dtype, len(set(h.tolist()))
        (dtype('uint64'), 4)
    """
    x = np.asarray(ids).astype(np.int64).view(np.uint64)  # a copy: the steps below work in place
    tmp = np.empty_like(x)
    with np.errstate(over="ignore"):
        x += np.uint64((0x9E3779B97F4A7C15 * (seed + 1)) % 2**64)
        for shift, factor in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB), (31, None)):
            np.right_shift(x, np.uint64(shift), out=tmp)
            x ^= tmp
            if factor is not None:
                x *= np.uint64(factor)
    return x
