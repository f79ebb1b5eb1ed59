"""Timing (CUDA events, or the host clock on the CPU), peak memory, and how far two outputs are apart."""

from __future__ import annotations

import math
import statistics
import time
import weakref
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .rig import Env


def time_calls(env: Env, fn: Callable[[], object], warmup: int, iters: int) -> list[float]:
    """Milliseconds of each of ``iters`` calls after ``warmup`` calls.

    On a GPU each call is bracketed by events on the main device's stream, recorded without host syncs in
    between, so a call's time is its span on the GPU's timeline (launch gaps included).
    """
    for _ in range(warmup):
        fn()
    env.sync()
    if not env.cuda:
        out = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return out
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    env.sync()
    return [start.elapsed_time(end) for start, end in events]


def summary(samples: list[float]) -> dict:
    """Median and inter-quartile range of the samples (ms)."""
    qs = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else [samples[0]] * 3
    return {"median": statistics.median(samples), "q1": qs[0], "q3": qs[2], "iqr": qs[2] - qs[0],
            "min": min(samples), "n": len(samples)}


class PeakMemory:
    """Bytes allocated above what was allocated at the start, at the peak, per device."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.base: dict[str, int] = {}

    def __enter__(self) -> PeakMemory:
        if self.env.cuda:
            for d in self.env.devices:
                torch.cuda.synchronize(d)
                torch.cuda.reset_peak_memory_stats(d)
                self.base[str(d)] = torch.cuda.memory_allocated(d)
        return self

    def __exit__(self, *exc) -> None:
        self.peaks = {}
        if self.env.cuda:
            for d in self.env.devices:
                torch.cuda.synchronize(d)
                self.peaks[str(d)] = torch.cuda.max_memory_allocated(d) - self.base[str(d)]


class TensorBytesPeak(TorchDispatchMode):
    """The peak of the bytes held by tensors that the operators inside the block create, on any device.

    The CPU's stand-in for ``torch.cuda.max_memory_allocated``: the same allocations a GPU makes for the same
    operators, counted per storage as the operators return them, without the CUDA allocator's block rounding or
    the kernels' own workspaces (cuBLAS, attention), which never reach Python. A storage counts until the last
    tensor that refers to it is freed. Views of tensors made before the block (a weight's transpose) are not counted:
    their bytes were allocated before it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._holders: dict[int, int] = {}  # storage address -> live tensors that refer to it
        self._before: set[int] = set()  # storages of the tensors the block was given

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # torch's protocol: untyped
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in self._holders:
                self._before.add(t.untyped_storage().data_ptr())
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self._hold(t)
        return out

    def _hold(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self._before:
            return
        if key not in self._holders:
            self._holders[key] = 0
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self._holders[key] += 1
        weakref.finalize(t, self._release, key, storage.nbytes())

    def _release(self, key: int, nbytes: int) -> None:
        self._holders[key] -= 1
        if not self._holders[key]:
            del self._holders[key]
            self.live -= nbytes


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def psnr(got: Tensor, want: Tensor) -> float:
    """PSNR of a latent against the exact one, peak = the exact latent's value range."""
    got, want = got.double(), want.double()
    mse = float(((got - want) ** 2).mean())
    peak = float(want.max() - want.min())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)
