"""What the stand-in tiers use to prove that a generation leaves nothing behind."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def no_cycle_collection() -> Iterator[None]:
    """What is freed here is freed by reference counting alone, as in a WebUI that rarely runs a full collection."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
