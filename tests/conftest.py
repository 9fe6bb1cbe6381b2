"""Suite-wide settings.

The models in these tests are tiny: a second intra-op thread (torch, BLAS, OpenMP) only adds synchronisation, and on
a busy 2-core machine its spin-waiting made Lightning fits 5-20x slower. Results do not depend on the thread count.
"""

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_limits


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(previous)


# Shared helpers (tests/_data.py, tests/_concepts.py) are imported as top-level modules: conftest files cannot be
# imported under --import-mode=importlib, and tests/ is not a package.
_TESTS_DIR = str(Path(__file__).parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)
