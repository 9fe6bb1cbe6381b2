"""Fixtures of the sanity-check tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_intra_op_thread() -> Iterator[None]:
    """Run each test with one torch thread, restored afterwards.

    The models and maps here are tiny: a second OpenMP thread gains nothing, and on a shared, oversubscribed CPU its
    spin-waiting made these tests 5-20x slower. Results do not depend on the thread count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
