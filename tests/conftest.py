import sys
from pathlib import Path

import pytest
import torch

# The extension is not an installed package: the WebUI puts its folder on sys.path, and so do the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@pytest.fixture
def one_thread():
    """The tiny models are launch-bound: one thread avoids OpenMP spin-waits on a shared machine (40× faster here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
