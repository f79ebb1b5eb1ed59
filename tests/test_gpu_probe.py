"""The GPU run's probe extension (tests/e2e/gpu/probe_extension): its watch of the models Forge's memory manager
holds, which decides the GPU check "the target and the source resident together", and its trace of the first
sampling steps, which tells where a prediction leaves its range. Loaded against a minimal Forge: its callback
registry and its loaded-model list, with real modules whose parameters sit on the load device or not."""

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
        on_cfg_after_cfg=lambda fn: callbacks.__setitem__("cfg", fn),
        on_cfg_denoiser=lambda fn: callbacks.__setitem__("denoiser", fn))
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


class Params:  # CFGDenoiserParams and AfterCFGCallbackParams: the fields the probe reads
    def __init__(self, **fields):
        self.__dict__.update(fields)


class PredictionFlux:  # backend.modules.k_prediction: a sigma range held as tensors
    sigma_max, sigma_min = torch.tensor(1.0), torch.tensor(3e-4)


def _denoiser() -> types.SimpleNamespace:
    """What CFGDenoiser hands its callbacks: the sampler's model wrap, down to Forge's KModel."""
    kmodel = types.SimpleNamespace(diffusion_model=Unet(4).to(torch.bfloat16), predictor=PredictionFlux(),
                                   computation_dtype=torch.bfloat16, storage_dtype=torch.bfloat16)
    unet = types.SimpleNamespace(model=kmodel)
    wrap = types.SimpleNamespace(forge_objects=types.SimpleNamespace(unet=unet))
    return types.SimpleNamespace(inner_model=types.SimpleNamespace(inner_model=wrap))


def _step(callbacks, sigma: float, step: int, scale: float) -> None:
    x = torch.full((1, 4, 2, 2), -scale)
    cond = {"crossattn": torch.full((1, 3, 8), 2.0), "vector": torch.full((1, 8), -5.0),
            "guidance": torch.tensor([3.5])}
    callbacks["denoiser"](Params(x=x, sigma=torch.tensor([sigma]), sampling_step=step, text_cond=cond,
                                 denoiser=_denoiser()))
    callbacks["cfg"](Params(x=x * 10))


def test_the_trace_records_each_steps_sigma_and_largest_values(forge):
    probe, _, callbacks = forge
    probe._nan.update(on=True, steps=0, bad_steps=0, max_abs=0.0, trace=[], model={})
    _step(callbacks, 9999.0, 0, 3.0)  # a schedule in pseudo timesteps, as Forge's Automatic gives a Flux
    _step(callbacks, 0.5, 1, 6.0)
    trace = probe._nan["trace"]
    assert [t["sigma"] for t in trace] == [[9999.0], [0.5]]
    assert [t["x"] for t in trace] == [3.0, 6.0] and [t["denoised"] for t in trace] == [30.0, 60.0]
    assert trace[0]["cond"] == {"crossattn": 2.0, "vector": 5.0, "guidance": 3.5}
    assert probe._nan["max_abs"] == 60.0 and probe._nan["steps"] == 2
    model = probe._nan["model"]
    assert model["predictor"] == "PredictionFlux" and model["sigma_max"] == 1.0
    assert model["computation_dtype"] == "torch.bfloat16" and model["weight"] == "torch.bfloat16 cpu"


def test_the_trace_keeps_the_first_steps_only_and_is_off_by_default(forge, monkeypatch):
    probe, _, callbacks = forge
    _step(callbacks, 1.0, 0, 1.0)
    assert probe._nan["trace"] == [] and probe._nan["model"] == {}
    monkeypatch.setattr(probe, "TRACE_STEPS", 2)
    probe._nan.update(on=True, trace=[])
    for i in range(3):
        _step(callbacks, 1.0 - i / 4, i, 1.0 + i)
    assert [t["step"] for t in probe._nan["trace"]] == [0, 1] and probe._nan["steps"] == 3
