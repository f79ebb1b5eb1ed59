import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every LoRA test runs on one thread (tests/conftest.py says why)."""
