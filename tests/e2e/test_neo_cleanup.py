"""What a generation leaves behind in a real Forge Neo, and what it never runs (see neo_harness.py for the
variables): test_forge_cleanup.py's tests again, against Neo.

- Switching the source between two SD1.5 checkpoints keeps the server's memory flat.
- Pickled files never run code and are never renamed: a ``.ckpt`` named as the source (a bare pickle, and one
  written by ``torch.save``) and a ``.pt`` named as a LoRA are refused with a 422 that says what to do before Neo
  reads them (Neo's loader would unpickle them with torch's weights-only loader and rename a file that fails to
  ``.corrupted``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import test_forge_cleanup
from neo_harness import NeoServerPool, open_pool
from test_forge_cleanup import (  # noqa: F401  (collected here again, on Neo)
    MODELS,
    test_switching_sources_keeps_memory_flat,
)

fresh, server = test_forge_cleanup.fresh, test_forge_cleanup.server  # the fixtures, on Neo's pool


@pytest.fixture(scope="module")
def pool() -> Iterator[NeoServerPool]:
    yield from open_pool(MODELS)


def test_pickled_files_are_refused_never_run_and_keep_their_names(server, fresh: bytes) -> None:
    test_forge_cleanup.test_pickled_files_are_refused_and_never_run(server, fresh)
    names = {p.name for p in (server.data_dir / "models").rglob("*")}
    planted = {"delta_e2e_bare.ckpt", "delta_e2e_saved.ckpt", "delta_e2e_payload.pt"}
    assert planted <= names, sorted(names)
    assert not any(name.endswith(".corrupted") for name in names), sorted(names)
