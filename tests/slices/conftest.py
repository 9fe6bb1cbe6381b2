import pytest
import torch
from threadpoolctl import threadpool_limits


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread for torch, BLAS and OpenMP: on the shared 2-core test machine oversubscribed threads made
    the small trainings here 10x slower. Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)
