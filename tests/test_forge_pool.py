"""The Forge host's private engines: released for good when dropped, never two sources at once, and bounded.

A Forge engine's modules are each in a reference cycle (the ``lora_loader`` every patched module gets refers back to
it, backend/patcher/base.py:63-66), and Forge collects only after dropping its own model: a dropped source whose
cycles stay unbroken keeps its weights until the server dies. These tests switch sources with the cycle collector
off and check by weak reference that every dropped engine, its UNet and its text encoders are gone.
"""

from __future__ import annotations

import weakref

import pytest
import torch

from tests.fake_forge import backend, harness, webui
from tests.fake_forge.harness import ADAPTED, Loads

pytestmark = pytest.mark.usefixtures("one_thread")
forge = harness.forge  # the fixtures
no_cycle_collection = harness.no_cycle_collection


def _parts(entry) -> dict[str, weakref.ref]:
    objects = entry.engine.forge_objects
    return {"engine": weakref.ref(entry.engine), "UNet patcher": weakref.ref(objects.unet),
            "UNet": weakref.ref(objects.unet.model), "diffusion model": weakref.ref(objects.unet.model.diffusion_model),
            "text encoders": weakref.ref(objects.clip.cond_stage_model)}


def _cached():
    from lib_delta.hosts.forge import models as forge_models

    return forge_models.cached()


def test_switching_sources_frees_every_dropped_engine_without_a_collection(forge, no_cycle_collection):
    a = forge.checkpoint("a", family="sd1", seed=0)
    b = forge.checkpoint("b", family="sd1", seed=1)
    target = forge.load(forge.checkpoint("target", family="sd1", seed=2))
    dropped: list[dict[str, weakref.ref]] = []
    for i, name in enumerate([a, b, a, b, a, b]):
        forge.run(target, name, {"adapted_prompt": ADAPTED})
        (entry,) = _cached()
        assert entry.info.name == f"{name}.safetensors"
        parts = _parts(entry)
        del entry
        alive = [what for refs in dropped for what, ref in refs.items() if ref() is not None]
        assert alive == [], f"after switch {i}: {alive} of a dropped source still alive"
        dropped.append(parts)
        assert len(backend.current_loaded_models) <= 2  # the target's UNet and its text encoder at most
    assert sum(ref() is not None for refs in dropped for ref in refs.values()) == len(dropped[-1])


def test_a_dropped_engine_gives_its_weights_back_even_while_something_holds_it(forge):
    a = forge.checkpoint("a", family="sd1", seed=0)
    b = forge.checkpoint("b", family="sd1", seed=1)
    target = forge.load(a)
    forge.run(target, a, {"adapted_prompt": ADAPTED})
    (held,) = _cached()  # another extension's reference, say
    weights = [*held.unet.model.parameters(), *held.engine.forge_objects.clip.cond_stage_model.parameters()]
    assert sum(w.numel() for w in weights) > 0
    forge.run(target, b, {"adapted_prompt": ADAPTED})
    assert sum(w.numel() for w in weights) == 0


def test_the_old_source_is_released_before_the_new_one_loads(forge, monkeypatch):
    import sys

    a = forge.checkpoint("a", family="sd1", seed=0)
    b = forge.checkpoint("b", family="sd1", seed=1)
    target = forge.load(a)
    resident: list[int] = []
    module = sys.modules["backend.loader"]
    real = module.forge_loader

    def forge_loader(*args, **kwargs):
        resident.append(len(_cached()))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "forge_loader", forge_loader)
    forge.run(target, a, {"adapted_prompt": ADAPTED})
    forge.run(target, b, {"adapted_prompt": ADAPTED})
    assert resident == [0, 0]


@pytest.mark.parametrize(("kept", "cache", "left"), [(None, "ram", ["base"]), (0, "ram", []),
                                                     (2, "ram", ["base", "tuned"]), (None, "free", []),
                                                     (None, "gpu", ["base"])])
def test_at_most_the_kept_number_of_engines_stays_between_generations(forge, monkeypatch, no_cycle_collection, kept,
                                                                       cache, left):
    base = forge.checkpoint("base", family="sd1", seed=0)
    tuned = forge.checkpoint("tuned", family="sd1", seed=1, text_seed=0)
    target = forge.load(base)
    if kept is not None:
        monkeypatch.setattr(webui.opts, "delta_sampling_kept_models", kept, raising=False)
    webui.opts.delta_sampling_cache = cache
    loads = Loads(monkeypatch)
    forge.run(target, base, {"checkpoint": tuned})
    assert [e.info.name for e in _cached()] == [f"{n}.safetensors" for n in left]
    assert loads.alive() == len(left)
    ours = {id(p) for e in _cached() for p in e.patchers()}
    still_loaded = [m for m in backend.current_loaded_models if id(m.model) in ours]
    assert bool(still_loaded) == (cache == "gpu")


def test_a_kept_source_is_reused_and_gives_the_same_image(forge, monkeypatch):
    base = forge.checkpoint("base", family="sd1", seed=0)
    target = forge.load(base)
    loads = Loads(monkeypatch)
    first = forge.run(target, base, {"adapted_prompt": ADAPTED})
    second = forge.run(target, base, {"adapted_prompt": ADAPTED})
    assert len(loads.engines) == 1 and torch.equal(first, second)
