"""Where the functional LoRA's time goes inside the source call: each patched layer's update timed on its own.

One forward of the 4-row source call (``[base | adapted]``) records every distinct layer update it makes (op,
input shape, output shape, how often). Each is then timed alone on the adapted rows: on a GPU replayed ``reps``
times inside one CUDA graph, so that launch costs are out and what remains is GPU time, as in the host's graphed
source call. Beside it, its two GEMMs separately, and one read and write of its output: the bandwidth floor of any
update that adds into the layer's output.

The updates are recorded unfolded (:mod:`lib_delta.lora.fold`): folding moves the down GEMM into the layer's own,
so what a folded layer adds is its up-projection (``up_us``) and the wider GEMM's extra columns.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from lib_delta.lora import ops as lora_ops

from .rig import Env, Models
from .schemes import PairRig
from .sources import take

OPS = (lora_ops.LinearLowRank, lora_ops.LinearDense, lora_ops.ConvLowRank, lora_ops.ConvDense)


def measure_lora_layers(env: Env, models: Models, rig: PairRig, adapter: str = "lora", reps: int = 50) -> dict:
    seen: dict[tuple, list] = {}
    originals = {cls: cls.__call__ for cls in OPS}

    def recorder(cls: type) -> Callable:
        def call(self, x, out, _original=originals[cls]):
            key = (cls.__name__, tuple(x.shape), tuple(out.shape))
            seen.setdefault(key, [self, x.clone(), out.clone(), 0])[3] += 1
            return _original(self, x, out)

        return call

    patch = models.patch(adapter)
    xs, ss = rig.bridge.to_source(rig.x, rig.sigma)
    x4, s4 = torch.cat([xs] * 4), torch.cat([ss] * 4)
    cond4 = take(rig.source_cond, [0, 1], 2)
    for cls in OPS:
        cls.__call__ = recorder(cls)
    try:
        with patch, patch.rows([(slice(0, 2), None), (slice(2, 4), 0)]):
            patch.folding = False  # each update whole, its down-projection included, as an op call
            rig.source(x4, s4, cond4)
    finally:
        patch.folding = True
        for cls, fn in originals.items():
            cls.__call__ = fn

    rows = []
    for (name, x_shape, out_shape), (op, x, out, count) in seen.items():
        row = {"op": name, "x": list(x_shape), "out": list(out_shape), "count": count,
               "us": _time(env, lambda op=op, x=x, out=out: op(x, out), reps)}
        if name == "LinearLowRank" and x.dtype == op.down.dtype == out.dtype:
            x2, o2 = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
            h = torch.mm(x2, op.down_t)
            row["down_us"] = _time(env, lambda x2=x2, op=op: torch.mm(x2, op.down_t), reps)
            row["up_us"] = _time(env, lambda o2=o2, h=h, op=op: o2.addmm_(h, op.up_t), reps)
        row["out_rw_us"] = _time(env, lambda out=out: out.mul_(1.0), reps)
        rows.append(row)
    rows.sort(key=lambda r: -r["us"] * r["count"])
    return {"adapter": adapter, "px": rig.pair.px, "graphed": env.cuda, "reps": reps, "rows": rows,
            "sum_ms": sum(r["us"] * r["count"] for r in rows) / 1e3,
            "kernels": sum(r["count"] * (2 if r["op"].endswith("LowRank") else 1) for r in rows),
            "shortest_kernel_us": min((r.get("down_us", r["us"]) for r in rows), default=0.0)}


def _time(env: Env, fn: Callable[[], object], reps: int) -> float:
    """Microseconds per call of ``fn``: on a GPU the median of 7 replays of a graph of ``reps`` calls."""
    if not env.cuda:
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) * 1e6 / reps
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return sorted(times)[3]
