"""The GPU run's probe extension (tests/e2e/gpu/probe_extension): its watch of the models Forge's memory manager
holds, which decides the GPU check "the target and the source resident together". Loaded against a minimal Forge:
its callback registry and its loaded-model list, with real modules whose parameters sit on the load device or not."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

PROBE = Path(__file__).resolve().parent / "e2e" / "gpu" / "probe_extension" / "scripts" / "delta_gpu_probe.py"


class Patcher:
    def __init__(self, model: torch.nn.Module):
        self.model = model


class Entry:  # backend.memory_management.LoadedModel: the patcher and its load device
    def __init__(self, model: torch.nn.Module, device: str):
        self.model, self.device = Patcher(model), device


class Unet(torch.nn.Module):
    def __init__(self, width: int, device: str = "cpu"):
        super().__init__()
        self.proj = torch.nn.Linear(width, width, device=device)


def _module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)
    m.__dict__.update(attrs)
    return m


@pytest.fixture
def forge(monkeypatch):
    """The probe loaded in a minimal Forge; yields (probe, the loaded-model list, the registered callbacks)."""
    callbacks: dict = {}
    loaded: list = []
    modules = _module("modules")
    modules.script_callbacks = _module(
        "modules.script_callbacks", on_app_started=lambda fn: callbacks.__setitem__("app", fn),
        on_cfg_after_cfg=lambda fn: callbacks.__setitem__("cfg", fn))
    backend = _module("backend")
    backend.memory_management = _module("backend.memory_management", current_loaded_models=loaded)
    for name, m in {"modules": modules, "modules.script_callbacks": modules.script_callbacks, "backend": backend,
                    "backend.memory_management": backend.memory_management,
                    "modules_forge": _module("modules_forge")}.items():
        monkeypatch.setitem(sys.modules, name, m)
    spec = importlib.util.spec_from_file_location("delta_gpu_probe_under_test", PROBE)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    yield probe, loaded, callbacks


def test_the_step_with_two_models_wholly_on_their_device_is_kept(forge):
    probe, loaded, callbacks = forge
    assert probe.FORGE and "cfg" in callbacks
    target, source = Unet(8), Unet(4)
    probe._resident.update(on=True, steps=0, most=[])
    loaded[:] = [Entry(target, "cpu")]  # the target alone
    callbacks["cfg"](None)
    loaded[:] = [Entry(source, "cpu"), Entry(target, "cpu")]  # both there
    callbacks["cfg"](None)
    loaded[:] = [Entry(target, "cpu")]  # the source gone again
    callbacks["cfg"](None)
    most = probe._resident["most"]
    assert probe._resident["steps"] == 3
    assert sorted(m["bytes"] for m in most) == [4 * 5 * 4, 8 * 9 * 4]  # weights and biases, float32
    assert all(m["bytes_there"] == m["bytes"] and m["model"] == "Unet" for m in most)


def test_a_model_not_on_its_load_device_does_not_count_as_resident(forge):
    probe, loaded, callbacks = forge
    probe._resident.update(on=True, steps=0, most=[])
    loaded[:] = [Entry(Unet(8), "cpu")]
    callbacks["cfg"](None)
    first = probe._resident["most"]
    # a second model listed but whose weights are elsewhere (here: meta, as on a GPU they would be on the CPU)
    loaded[:] = [Entry(Unet(8), "cpu"), Entry(Unet(4, device="meta"), "cpu")]
    callbacks["cfg"](None)
    assert probe._resident["most"] is first
    assert [m["bytes_there"] for m in probe._forge_loaded()] == [8 * 9 * 4, 0]


def test_the_watch_is_off_by_default(forge):
    probe, loaded, callbacks = forge
    loaded[:] = [Entry(Unet(8), "cpu")]
    callbacks["cfg"](None)
    assert probe._resident["steps"] == 0 and probe._resident["most"] == []
