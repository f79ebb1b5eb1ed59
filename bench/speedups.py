"""Optional wrappers around a :class:`~lib_delta.guidance.SourceModel` that trade exactness or devices for speed.

- :class:`ReusedDelta` evaluates the source on every k-th call only and reuses that prediction in between: an
  approximation (the image moves; docs/performance.md measures how far), for delta mode only.
- :class:`OnDevice` runs the source on another device (a second GPU). Exact. Paired with
  :meth:`DeltaGuidance.prefetch <lib_delta.guidance.DeltaGuidance.prefetch>`, which starts the source call before
  the target's forward, the two models run at the same time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lib_delta.guidance import SourceModel


class ReusedDelta:
    """Call ``source`` on every ``every``-th call; in between, return its last prediction again.

    In delta mode only differences of the predictions are used, so this reuses the delta (adapted − base) of an
    earlier step. Base-first mode uses the prediction itself: do not wrap a base-first source. A call for other
    rows or variants (a window opening for another group, another batch layout) always evaluates. Create one per
    generation.
    """

    def __init__(self, source: SourceModel, every: int) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.source = source
        self.every = every
        self.evaluations = 0
        self._last: Tensor | None = None
        self._key: tuple | None = None
        self._age = 0

    def __call__(self, x: Tensor, level: Tensor, rows: Sequence[int], variants: Sequence[int]) -> Tensor:
        key = (tuple(rows), tuple(variants), tuple(x.shape), x.device)
        if self._last is not None and key == self._key and self._age + 1 < self.every:
            self._age += 1
            return self._last
        self._last = self.source(x, level, rows, variants)
        self._key, self._age = key, 0
        self.evaluations += 1
        return self._last


class OnDevice:
    """Evaluate ``source`` on ``device``: inputs are copied there; the prediction stays there until the guidance
    consumes it (it moves it back when it adds the delta), so launching this call never waits for the target."""

    def __init__(self, source: SourceModel, device: torch.device | str) -> None:
        self.source = source
        self.device = torch.device(device)

    def __call__(self, x: Tensor, level: Tensor, rows: Sequence[int], variants: Sequence[int]) -> Tensor:
        return self.source(x.to(self.device, non_blocking=True), level.to(self.device, non_blocking=True),
                           rows, variants)


__all__ = ["OnDevice", "ReusedDelta"]
