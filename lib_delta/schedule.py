"""λ(t): how strongly the delta applies at each point of the sampling progress.

Progress is read from the noise level the model is called at, relative to the sampler's own schedule, not from a
call counter: second-order samplers call the model twice per step and img2img runs a truncated schedule, and both
still get the λ of the point they are really at.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Sequence

_EXP_K = 5.0
_SIGMOID_K = 12.0


def _normalised(f: Callable[[float], float]) -> Callable[[float], float]:
    """Rescale a decreasing curve on [0, 1] so that it runs exactly from 1 to 0."""
    f0, f1 = f(0.0), f(1.0)
    return lambda u: (f(u) - f1) / (f0 - f1)


# Each shape maps the position u in [0, 1] inside the window to a factor in [0, 1].
SHAPES: dict[str, Callable[[float], float]] = {
    "constant": lambda u: 1.0,
    "linear": lambda u: 1.0 - u,
    "exponential": _normalised(lambda u: math.exp(-_EXP_K * u)),
    "cosine": lambda u: 0.5 * (1.0 + math.cos(math.pi * u)),
    "sigmoid": _normalised(lambda u: 1.0 / (1.0 + math.exp(_SIGMOID_K * (u - 0.5)))),
}
SCHEDULES: tuple[str, ...] = tuple(SHAPES)


def in_window(progress: float, start: float, end: float) -> bool:
    """The window is [start, end); an end of 1 includes the very end. start >= end is an empty window."""
    if start >= end:
        return False
    if end >= 1.0:
        return progress >= start
    return start <= progress < end


def strength_at(progress: float, strength: float, schedule: str, start: float, end: float) -> float:
    """λ at a sampling progress in [0, 1]: ``strength * shape(u)`` inside the window, exactly 0 outside."""
    if strength == 0.0 or not in_window(progress, start, end):
        return 0.0
    u = min(max((progress - start) / (end - start), 0.0), 1.0)
    return strength * SHAPES[schedule](u)


class ProgressClock:
    """Sampling progress in [0, 1] from the noise level a model call is made at.

    ``levels`` is the sampler's schedule in the order it is walked (descending noise levels, the terminal level
    included: k-diffusion sigmas end in 0). The call at ``levels[i]`` is at progress ``i / (len(levels) - 1)``;
    levels in between (second-order and multistep samplers) get fractional positions, interpolated in log space
    for VE sigmas (``log_space=True``) and linearly for timesteps or flow t.
    """

    def __init__(self, levels: Sequence[float], log_space: bool = True) -> None:
        values = [float(v) for v in levels]
        if len(values) < 2:
            raise ValueError("a sampling schedule needs at least two levels")
        if any(b > a for a, b in itertools.pairwise(values)):
            raise ValueError("sampling levels must not increase")
        self.levels = values
        self.log_space = log_space
        self._keys = [-self._key(v) for v in values]  # ascending, for bisect

    @property
    def steps(self) -> int:
        return len(self.levels) - 1

    def _key(self, v: float) -> float:
        if not self.log_space:
            return v
        return math.log(v) if v > 0 else -1e9

    def progress(self, level: float) -> float:
        level = float(level)
        if level >= self.levels[0]:
            return 0.0
        if level <= self.levels[-1]:
            return 1.0
        k = -self._key(level)
        i = bisect.bisect_right(self._keys, k) - 1  # levels[i] >= level > levels[i + 1]
        i = min(max(i, 0), self.steps - 1)
        lo, hi = self._keys[i], self._keys[i + 1]
        if self.log_space and self.levels[i + 1] <= 0:
            # the last interval runs down to zero noise: interpolate linearly there
            frac = (self.levels[i] - level) / self.levels[i]
        else:
            frac = 0.0 if hi == lo else (k - lo) / (hi - lo)
        return (i + min(max(frac, 0.0), 1.0)) / self.steps
