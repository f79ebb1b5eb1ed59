import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny models are launch-bound: one thread avoids OpenMP spin-waits on a shared machine (40× faster here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
