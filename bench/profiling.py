"""A torch.profiler summary of a few steps: where the GPU time goes, and how much of the wall the GPU is busy."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from .rig import Env


def profile_steps(env: Env, fn: Callable[[], object], steps: int = 3, rows: int = 12) -> dict:
    """Per step: wall time, summed kernel time, kernel launches; and the top ops by GPU time."""
    fn()
    env.sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if env.cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        env.sync()
        wall = (time.perf_counter() - t0) * 1e3 / steps
    averages = prof.key_averages()
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_us = sum(e.time_range.elapsed_us() for e in kernels)
    by_device: dict[int, float] = {}
    for e in kernels:  # a source on a second GPU: how busy each one is
        by_device[e.device_index] = by_device.get(e.device_index, 0.0) + e.time_range.elapsed_us() / 1e3 / steps
    launches = sum(1 for e in events if e.name.startswith(("cudaLaunch", "cuLaunch", "cudaGraphLaunch")))
    sort = "self_cuda_time_total" if env.cuda else "self_cpu_time_total"
    try:
        table = averages.table(sort_by="self_device_time_total" if env.cuda else sort, row_limit=rows)
    except (AttributeError, KeyError, ValueError):
        table = averages.table(sort_by=sort, row_limit=rows)
    kernel_ms = kernel_us / 1e3 / steps
    return {"wall_ms": wall, "kernel_ms": kernel_ms, "launches": launches / steps,
            "busy": kernel_ms / wall if wall else 0.0, "table": table,
            "kernel_ms_by_device": {str(k): v for k, v in sorted(by_device.items())}}


def gpu_time_by_op(env: Env, fn: Callable[[], object], calls: int = 3) -> dict[str, float]:
    """GPU time per call (µs) of each operator's own kernels. Operator names do not depend on the GPU's kernel
    names: ``aten::addmm_``/``aten::baddbmm_`` are the LoRA up-projections added in place into a layer's output,
    ``aten::add`` the residual additions (slower on the strided outputs of a folded layer)."""
    fn()
    env.sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        env.sync()
    out = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        us = e.self_cuda_time_total if us is None else us
        if us > 0 and e.key.startswith("aten::"):
            out[e.key] = us / calls
    return out
