"""The one generation in progress, and the rule that closes it whatever ends it.

A WebUI runs one generation at a time. Its run is closed by whichever comes first: its own end (``postprocess``),
the start of the next generation (``process``; the WebUI skips ``postprocess`` when sampling raised), or an
exception raised anywhere in its sampling. Closing is idempotent and drops what the run built (graphs, patches,
hooks) with the last reference to it, so a failed generation leaves nothing behind for the next.
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol


class Run(Protocol):
    def close(self) -> None: ...


class RunSlot:
    def __init__(self) -> None:
        self._run: Any = None
        self._owner: weakref.ref | None = None  # the generation's ``p``, never kept alive by the slot

    def open(self, p: Any, run: Run) -> None:
        self.close()
        self._run, self._owner = run, weakref.ref(p)

    def get(self, p: Any = None) -> Any:
        """The open run, if it belongs to ``p`` (X/Y/Z cells and hires passes share objects, never this one)."""
        if self._run is None or (p is not None and (self._owner is None or self._owner() is not p)):
            return None
        return self._run

    def take(self, p: Any = None) -> Any:
        """Remove and return the open run of ``p`` without closing it (its owner finishes it)."""
        run = self.get(p)
        if run is not None:
            self._run = self._owner = None
        return run

    def close(self) -> None:
        run, self._run, self._owner = self._run, None, None
        if run is not None:
            run.close()
