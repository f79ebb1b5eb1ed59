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
  (``on_cfg_after_cfg``) holds a non-finite value, and trace the first steps (sigma, the largest value of the input,
  of each conditioning tensor and of the prediction; on Forge also the prediction type and the model's dtypes), so
  that a prediction out of range can be followed to where it starts. Off by default: it synchronises every step.
- ``GET /delta-gpu/paths``: since the last read, how often the source's forward was recorded and replayed as a
  CUDA graph, and how many LoRA layers ran folded (the most in one generation), so that a comparison of the
  default against graph/fold off shows the defaults were really in use. Read from the extension's own objects.
  (Forge runs neither: the counters stay at zero there.)
- ``POST /delta-gpu/resident?on=1`` and ``GET /delta-gpu/resident``: Forge only: at every sampling step, the models
  Forge's memory manager holds (``current_loaded_models``) and how many of their parameter bytes sit on the entry's
  load device; the step with the most models fully there is kept. Shows the target and the source resident together.
"""

from __future__ import annotations

import gc
import importlib.util
import os

import torch
from modules import script_callbacks

# max_abs: of any denoised value
_nan: dict = {"on": False, "steps": 0, "bad_steps": 0, "max_abs": 0.0, "trace": [], "model": {}}
TRACE_STEPS = 64  # the first steps' sigma and the largest input, conditioning and denoised value: where a value grows
_fold = {"original": None}
_paths = {"captures": 0, "replays": 0, "graph_failures": 0, "folded_layers": 0, "hooked": False}
_resident: dict = {"on": False, "steps": 0, "most": []}
FORGE = importlib.util.find_spec("modules_forge") is not None


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


def _forge_loaded() -> list[dict]:
    """Forge's loaded models now: each entry's class, parameter bytes, and the bytes on its load device."""
    from backend import memory_management

    out = []
    for entry in memory_management.current_loaded_models:
        patcher = entry.model
        module = getattr(patcher, "model", None) if patcher is not None else None
        if module is None:
            continue
        device = torch.device(entry.device)
        total = there = 0
        for t in module.parameters():
            n = t.numel() * t.element_size()
            total += n
            there += n if t.device.type == device.type else 0
        out.append({"model": type(module).__name__, "device": str(device), "bytes": total, "bytes_there": there})
    return out


def _absmax(value) -> float | dict | None:
    if isinstance(value, dict):
        return {k: _absmax(v) for k, v in value.items()}
    return float(value.detach().float().abs().max()) if isinstance(value, torch.Tensor) else None


def _model_info(denoiser) -> dict:
    """What the sampler runs: the prediction type, its sigma range, and the diffusion model's dtypes and device."""
    try:
        kmodel = denoiser.inner_model.inner_model.forge_objects.unet.model
        weight = next(kmodel.diffusion_model.parameters())
        predictor = kmodel.predictor
        return {"predictor": type(predictor).__name__, "sigma_max": float(predictor.sigma_max),
                "sigma_min": float(predictor.sigma_min), "computation_dtype": str(kmodel.computation_dtype),
                "storage_dtype": str(getattr(kmodel, "storage_dtype", None)),
                "weight": f"{weight.dtype} {weight.device}"}
    except Exception as e:  # A1111, or a layout this does not know: the trace goes on without it
        return {"error": repr(e)[:200]}


def _before_cfg(params) -> None:
    if not _nan["on"] or len(_nan["trace"]) >= TRACE_STEPS:
        return
    if not _nan["model"] and FORGE:
        _nan["model"] = _model_info(params.denoiser)
    _nan["trace"].append({"step": params.sampling_step, "sigma": [float(s) for s in params.sigma.flatten()[:4]],
                          "x": _absmax(params.x), "cond": _absmax(params.text_cond)})


def _after_cfg(params) -> None:
    if _resident["on"]:
        _resident["steps"] += 1
        loaded = _forge_loaded()
        full = [m for m in loaded if m["bytes"] and m["bytes_there"] == m["bytes"]]
        if len(full) > sum(1 for m in _resident["most"] if m["bytes_there"] == m["bytes"]):
            _resident["most"] = loaded
    if _nan["on"]:
        _nan["steps"] += 1
        _nan["max_abs"] = max(_nan["max_abs"], float(params.x.detach().abs().max()))
        if _nan["trace"] and "denoised" not in _nan["trace"][-1]:
            _nan["trace"][-1]["denoised"] = _absmax(params.x)
        if not bool(torch.isfinite(params.x).all()):
            _nan["bad_steps"] += 1


def _hook_paths() -> None:
    """Count graph captures/replays as each run drops its graphs, and folded layers as each run lays them out."""
    if _paths["hooked"]:
        return
    from lib_delta import cuda_graph

    reset = cuda_graph.GraphedCall.reset

    def counting_reset(self):
        _paths["captures"] += self.captures
        _paths["replays"] += self.replays
        _paths["graph_failures"] += len(self.failures)
        self.captures = self.replays = 0
        self.failures = []
        return reset(self)

    cuda_graph.GraphedCall.reset = counting_reset
    if not FORGE:  # Forge's host folds nothing (its layers are its own operations, moved by its memory manager)
        from lib_delta.hosts.a1111 import lora as a1111_lora

        lay_out = a1111_lora.Adapter.lay_out

        def counting_lay_out(self):
            result = lay_out(self)
            folded = sum(p.folded_layers for p in self._patches.values())
            _paths["folded_layers"] = max(_paths["folded_layers"], folded)
            return result

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
        _nan.update(on=bool(on), steps=0, bad_steps=0, max_abs=0.0, trace=[], model={})
        return dict(_nan)

    @app.get("/delta-gpu/nan")
    def nan_read():
        return dict(_nan)

    @app.post("/delta-gpu/resident")
    def resident_on(on: int):
        if on and not FORGE:
            return {"error": "Forge only"}
        _resident.update(on=bool(on), steps=0, most=[])
        return {"on": bool(on)}

    @app.get("/delta-gpu/resident")
    def resident_read():
        now = _forge_loaded() if FORGE else []
        return {**_resident, "now": now}


script_callbacks.on_app_started(_routes)
script_callbacks.on_cfg_denoiser(_before_cfg)
script_callbacks.on_cfg_after_cfg(_after_cfg)
