"""A test-only extension for the GPU end-to-end run: reads and caps the server's memory, and watches for NaN.

Routes (added to the WebUI's app; the harness links this folder into a throwaway data dir, nowhere else):

- ``GET  /delta-gpu/mem``: the CUDA caching allocator's counters (bytes allocated and reserved now, and their
  peaks since the last reset), the device's used memory as the driver sees it, and the process's RSS.
- ``POST /delta-gpu/reset``: ``gc.collect()``, ``torch.cuda.empty_cache()`` and a reset of the peak counters.
- ``POST /delta-gpu/cap?fraction=F``: ``torch.cuda.set_per_process_memory_fraction(F)`` (1.0 lifts the cap): the
  allocator refuses what would take its reserved memory over F of the card, as a card that size would.
- ``POST /delta-gpu/fold?on=0``: build Delta Sampling's LoRA patches with folding off (``fold=False``), which no
  setting offers; ``on=1`` restores the default (fold on CUDA).
- ``POST /delta-gpu/nan?on=1`` and ``GET /delta-gpu/nan``: count the sampling steps whose combined prediction
  (``on_cfg_after_cfg``) holds a non-finite value. Off by default: the check synchronises every step.
- ``GET /delta-gpu/paths``: since the last read, how often the source's forward was recorded and replayed as a
  CUDA graph, and how many LoRA layers ran folded (the most in one generation), so that a comparison of the
  default against graph/fold off shows the defaults were really in use. Read from the extension's own objects.
"""

from __future__ import annotations

import gc
import os

import torch
from modules import script_callbacks

_nan = {"on": False, "steps": 0, "bad_steps": 0}
_fold = {"original": None}
_paths = {"captures": 0, "replays": 0, "graph_failures": 0, "folded_layers": 0, "hooked": False}


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return -1


def _mem() -> dict:
    out = {"rss": _rss_bytes(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        out.update(allocated=torch.cuda.memory_allocated(), reserved=torch.cuda.memory_reserved(),
                   max_allocated=torch.cuda.max_memory_allocated(), max_reserved=torch.cuda.max_memory_reserved(),
                   device_used=total - free, device_total=total,
                   ooms=torch.cuda.memory_stats().get("num_ooms", 0))
    return out


def _after_cfg(params) -> None:
    if _nan["on"]:
        _nan["steps"] += 1
        if not bool(torch.isfinite(params.x).all()):
            _nan["bad_steps"] += 1


def _hook_paths() -> None:
    """Count graph captures/replays as each run drops its graphs, and folded layers as each run lays them out."""
    if _paths["hooked"]:
        return
    from lib_delta import cuda_graph
    from lib_delta.hosts.a1111 import lora as a1111_lora

    reset, lay_out = cuda_graph.GraphedCall.reset, a1111_lora.Adapter.lay_out

    def counting_reset(self):
        _paths["captures"] += self.captures
        _paths["replays"] += self.replays
        _paths["graph_failures"] += len(self.failures)
        self.captures = self.replays = 0
        self.failures = []
        return reset(self)

    def counting_lay_out(self):
        result = lay_out(self)
        folded = sum(p.folded_layers for p in self._patches.values())
        _paths["folded_layers"] = max(_paths["folded_layers"], folded)
        return result

    cuda_graph.GraphedCall.reset = counting_reset
    a1111_lora.Adapter.lay_out = counting_lay_out
    _paths["hooked"] = True


def _routes(_demo, app) -> None:
    @app.get("/delta-gpu/paths")
    def paths():
        _hook_paths()
        out = dict(_paths)
        _paths.update(captures=0, replays=0, graph_failures=0, folded_layers=0)
        return out

    @app.get("/delta-gpu/mem")
    def mem():
        return _mem()

    @app.post("/delta-gpu/reset")
    def reset():
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        return _mem()

    @app.post("/delta-gpu/cap")
    def cap(fraction: float):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(fraction)
        return _mem()

    @app.post("/delta-gpu/fold")
    def fold(on: int):
        import lib_delta.lora as lora  # the extension's package, imported by its script at start-up

        if _fold["original"] is None:
            _fold["original"] = lora.build_patch
        original = _fold["original"]
        if on:
            lora.build_patch = original
        else:
            def build_patch_unfolded(*args, **kwargs):
                kwargs["fold"] = False
                return original(*args, **kwargs)

            lora.build_patch = build_patch_unfolded
        return {"fold": bool(on)}

    @app.post("/delta-gpu/nan")
    def nan_on(on: int):
        _nan.update(on=bool(on), steps=0, bad_steps=0)
        return dict(_nan)

    @app.get("/delta-gpu/nan")
    def nan_read():
        return dict(_nan)


script_callbacks.on_app_started(_routes)
script_callbacks.on_cfg_after_cfg(_after_cfg)
