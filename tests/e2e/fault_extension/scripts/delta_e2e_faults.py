"""A test-only extension for the end-to-end suite: injects faults into a real WebUI's generation, on request.

A prompt containing ``FAULT_RAISE_AT_<k>`` makes the active model's UNet raise at its k-th call (a RuntimeError
worded like CUDA's out-of-memory error); ``FAULT_INTERRUPT_AT_<k>`` presses Interrupt (``shared.state.interrupt``)
during the k-th call. ``GET /delta-e2e/state`` reports what Delta Sampling holds at that moment: whether a run is
open and which source models are loaded, read from its own objects without collecting garbage first.
``GET /delta-e2e/tensors`` collects garbage, then counts the process's live tensors and the bytes of their distinct
storages, per device: what a generation left behind shows as a difference between two readings.
AUTOMATIC1111 and Forge alike. The harness links this folder into a throwaway data dir; it is never installed
anywhere else.
"""

from __future__ import annotations

import gc
import importlib.util
import re

from modules import script_callbacks, scripts, shared

_FAULT = re.compile(r"FAULT_(RAISE|INTERRUPT)_AT_(\d+)")
FORGE = importlib.util.find_spec("modules_forge") is not None


def _unet(p):
    """The active model's diffusion model: Forge's inside its UNet patcher, AUTOMATIC1111's on the model itself."""
    return p.sd_model.forge_objects.unet.model.diffusion_model if FORGE else p.sd_model.model.diffusion_model


class FaultScript(scripts.Script):
    sorting_priority = 99  # after Delta Sampling

    def title(self):
        return "Delta e2e faults"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process_before_every_sampling(self, p, *args, **kwargs):
        unet = _unet(p)
        vars(unet).pop("forward", None)  # a fault of an earlier pass or generation
        found = _FAULT.search(" ".join(getattr(p, "all_prompts", None) or [p.prompt]))
        if not found:
            return
        kind, at, calls, original = found.group(1), int(found.group(2)), [], unet.forward

        def forward(*a, **k):
            calls.append(1)
            if len(calls) == at:
                vars(unet).pop("forward", None)
                if kind == "RAISE":
                    raise RuntimeError("CUDA out of memory (injected by the e2e fault extension)")
                shared.state.interrupt()
            return original(*a, **k)

        unet.forward = forward

    def postprocess(self, p, processed, *args):
        vars(_unet(p)).pop("forward", None)


def _routes(_demo, app):
    @app.get("/delta-e2e/state")
    def state():
        if FORGE:
            from lib_delta.hosts import forge as host
            from lib_delta.hosts.forge.models import cached
        else:
            from lib_delta.hosts import a1111 as host
            from lib_delta.hosts.a1111.source import cached

        return {"run_open": host.SLOT.get() is not None, "sources": [e.info.name_for_extra for e in cached()]}

    @app.get("/delta-e2e/tensors")
    def tensors():
        import torch

        gc.collect()
        out: dict[str, dict[str, int]] = {}
        seen: set[tuple[str, int]] = set()
        for obj in gc.get_objects():
            if not isinstance(obj, torch.Tensor) or obj.is_meta:
                continue
            device = str(obj.device)
            count = out.setdefault(device, {"tensors": 0, "bytes": 0})
            count["tensors"] += 1
            try:
                storage = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):  # sparse, nested and other storage-less layouts
                continue
            key = (device, storage.data_ptr())
            if key not in seen:
                seen.add(key)
                count["bytes"] += storage.nbytes()
        return out


script_callbacks.on_app_started(_routes)
