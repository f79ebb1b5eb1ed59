"""ControlNet units on the source's adapted rows in Forge 2 and Forge Neo, through the stand-in of Forge's built-in
ControlNet (tests/fake_forge/controlnet.py) with tiny random models.

The reference for the identities is Forge's own unit on the active model (``apply_controlnet_advanced`` on
``p.sd_model.forge_objects.unet``, as Forge's ControlNet script does): with the source as the target and λ = 1, Delta
Sampling's unit must give the same image.
"""

from __future__ import annotations

import hashlib
import re
import sys
import weakref

import numpy as np
import pytest
import torch

from lib_delta.args import DeltaSettings
from tests.fake_forge import backend, controlnet, harness, webui
from tests.fake_forge import neo as neo_flavour
from tests.fake_forge.harness import Forge
from tests.pictures import b64png, huge_png, shape_image

pytestmark = pytest.mark.usefixtures("one_thread")
forge = harness.forge
neo = harness.neo
no_cycle_collection = harness.no_cycle_collection


IMAGE = shape_image()


class World:
    """A Forge session with the SD1 checkpoint "base", an SDXL "xl", and Forge's ControlNet folder holding two SD1
    ControlNets, an SDXL one, a T2I-Adapter's layout, a pickle and a truncated file."""

    def __init__(self, f: Forge):
        self.f = f
        self.base = f.checkpoint("base", family="sd1", seed=0)
        self.xl = f.checkpoint("xl", family="sdxl", seed=4)
        folder = f.tmp / "ControlNet"
        controlnet.write_controlnet(folder / "control_tiny_sd15_canny.safetensors", "sd1", seed=21)
        controlnet.write_controlnet(folder / "control_tiny_sd15_depth.safetensors", "sd1", seed=22)
        controlnet.write_controlnet(folder / "control_tiny_sdxl_canny.safetensors", "sdxl", seed=23)
        import safetensors.torch

        safetensors.torch.save_file({"body.0.in_conv.weight": torch.zeros(4, 4, 1, 1)},
                                    str(folder / "t2iadapter_tiny.safetensors"))
        torch.save({"control_model.zero_convs.0.0.weight": torch.zeros(1)}, str(folder / "control_pickled.pth"))
        whole = (folder / "control_tiny_sd15_canny.safetensors").read_bytes()
        (folder / "control_truncated.safetensors").write_bytes(whole[: len(whole) // 2])
        controlnet.use_folder(folder)
        self.target = f.load(self.base)

    def unit(self, stem: str = "control_tiny_sd15_canny", **kw) -> dict:
        return {"model": controlnet.listed(stem), "image": b64png(IMAGE), **kw}

    def own(self, stem: str = "control_tiny_sd15_canny", **kw):
        """The same unit as Forge's own ControlNet script runs it on the active model."""
        unit = {"model": controlnet.listed(stem), "image": IMAGE, "module": "None", **kw}
        return (controlnet.UserControlNet(), (unit,))

    def ours(self, units: list[dict], settings: dict | None = None, **kw) -> torch.Tensor:
        """Delta Sampling with these units (and ``settings``) on the target; ``kw`` are the generation's."""
        return self.f.run(self.target, self.base, {"controlnets": units, **(settings or {})}, **kw)


@pytest.fixture
def world(forge) -> World:
    return World(forge)


@pytest.fixture
def neo_world(neo) -> World:
    return World(neo)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- off means off; base rows stay plain ---------------------------------------------------------------------------


def test_zero_strength_an_empty_window_and_weight_zero_are_bit_identical_to_off(world):
    off = world.f.generate(world.target)
    for settings in ({"strength": 0.0}, {"start": 0.5, "end": 0.5}):
        assert torch.equal(world.ours([world.unit()], settings), off)
    assert torch.equal(world.ours([world.unit(weight=0.0)]), off)
    assert torch.equal(world.ours([world.unit(guidance_start=0.9, guidance_end=0.9)]), off)
    assert controlnet.loaded_files, "the units above did load the ControlNet"


@pytest.mark.parametrize("hires", [False, True])
def test_base_rows_of_every_batched_call_are_untouched(world, monkeypatch, hires):
    """Every source call with a unit, recomputed without it: the base rows are bit for bit the same, the adapted
    rows move."""
    checked = harness.units_against_none(monkeypatch, "units")
    extra = {"enable_hr": True, "hr_second_pass_steps": 2} if hires else {}
    world.ours([world.unit(module="canny")], prompt="a red cube AND a tall tree:0.6", **extra)
    assert len(checked) == (6 if hires else 4) and min(checked) > 1e-4
    checked.clear()  # two groups, each with its unit, in one call: each ControlNet on its own group's rows
    groups = [{"controlnets": [world.unit()], "strength": 0.5},
              {"controlnets": [world.unit("control_tiny_sd15_depth", weight=0.6)], "adapted_prompt": "wood",
               "strength": 0.5}]
    out = world.f.run(world.target, world.base, {"groups": groups}, **extra)
    assert torch.isfinite(out).all() and len(checked) == 2 * (6 if hires else 4) and min(checked) > 1e-4


# --- the identity: target == source, λ = 1 equals Forge's own unit ---------------------------------------------------


@pytest.mark.parametrize("module", ["None", "canny"])
def test_identity_with_forges_own_unit(world, module):
    plain = world.f.generate(world.target)
    reference = world.f.generate(world.target, others=[world.own(module=module)])
    out = world.ours([world.unit(module=module.lower())])
    assert rel(reference, plain) > 1e-2  # the control really moves the image
    assert rel(out, reference) < 1e-5


def test_identity_with_a_window_two_units_and_hires(world):
    hires = {"enable_hr": True, "hr_second_pass_steps": 3, "denoising_strength": 0.6}
    own = controlnet.UserControlNet()
    units = ({"model": controlnet.listed("control_tiny_sd15_canny"), "image": IMAGE, "module": "canny",
              "weight": 0.7, "guidance_end": 0.5},
             {"model": controlnet.listed("control_tiny_sd15_depth"), "image": IMAGE, "module": "None", "weight": 1.3,
              "guidance_start": 0.25})
    reference = world.f.generate(world.target, others=[(own, units)], **hires)
    out = world.ours([world.unit(module="canny", weight=0.7, guidance_end=0.5),
                      world.unit("control_tiny_sd15_depth", weight=1.3, guidance_start=0.25)], **hires)
    assert rel(reference, world.f.generate(world.target, **hires)) > 1e-2
    assert rel(out, reference) < 1e-5


def test_identity_with_a_lora_in_the_group(world):
    from tests.test_forge_adapter import merged

    lora = world.f.lora("style", world.target)
    reference = world.f.generate(merged(world.f, world.base, lora, "sd1"), others=[world.own()])
    out = world.ours([world.unit()], {"loras": f"<lora:{lora}:1>"})
    assert rel(reference, world.f.generate(world.target, others=[world.own()])) > 1e-3
    assert rel(out, reference) < 1e-5


def test_identity_in_forge_neo(neo_world):
    w = neo_world
    reference = w.f.generate(w.target, others=[w.own(module="canny")])
    out = w.ours([w.unit(module="canny")])
    assert rel(reference, w.f.generate(w.target)) > 1e-2
    assert rel(out, reference) < 1e-5


# --- across families --------------------------------------------------------------------------------------------------


def test_an_sd1_controlnet_through_an_sd1_source_steers_an_sdxl_target(world):
    xl = world.f.load(world.xl)
    plain = world.f.generate(xl)
    p = world.f.processing(xl, {"enabled": True, "source": world.base, "controlnets": [world.unit(weight=0.5)],
                                "strength": 0.5})
    out = webui.process_images(p)
    assert torch.isfinite(out).all() and rel(out, plain) > 1e-3
    stored = p.extra_generation_params["Delta ControlNets"]
    back = DeltaSettings.from_infotext({"Delta source": world.base, "Delta ControlNets": stored})
    assert back.groups[0].controlnets[0].model == controlnet.listed("control_tiny_sd15_canny")
    assert back.groups[0].controlnets[0].weight == 0.5 and back.groups[0].controlnets[0].image == ""


# --- refusals: a 422 with a clear message, nothing loaded ----------------------------------------------------------


def _listed(stem: str) -> str:
    return controlnet.listed(stem)


@pytest.mark.parametrize(("unit", "message"), [
    ({"model": "control_tiny_sd15_cany", "image": "x"},
     r"ControlNet model 'control_tiny_sd15_cany' is not among Forge's ControlNet models\. Closest: 'control_tiny"),
    ({"model": "control_tiny_sdxl_canny", "image": "x"},
     r"'control_tiny_sdxl_canny \[\w+\]' \(SDXL\) is not made for the source 'base' \(SD1\)"),
    ({"model": "t2iadapter_tiny", "image": "x"}, r"'t2iadapter_tiny \[\w+\]' is not a ControlNet \(a T2I-Adapter"),
    ({"model": "control_pickled", "image": "x"}, r"'control_pickled \[\w+\]' is not a \.safetensors file"),
    ({"model": "control_truncated", "image": "x"}, r"'control_truncated \[\w+\]' is damaged or truncated"),
    ({"image": "bm90IGFuIGltYWdl"}, r"control image \(ControlNet unit 1\) is not a readable image"),
    ({"image": "%%%"}, r"not a readable image"),
    ({"image": huge_png(4097, 8)}, r"4097×8; at most 4096 pixels a side"),
    ({"image": huge_png(4096, 4100)}, r"at most 4096 pixels a side"),
    ({"module": "depth_midas"}, r"preprocessor 'depth_midas' \(ControlNet unit 1\) is not supported"),
    ({"module": "tile_colorfix"}, r"preprocessor 'tile_colorfix' \(ControlNet unit 1\) is not supported"),
    ({"module": "cany"}, r"preprocessor \(ControlNet unit 1\) 'cany' is not among .* Closest: 'canny'"),
    ({"image": ""}, r"No control image was given \(ControlNet unit 1\): send it as base64 .* never kept in infotext"),
])
def test_bad_units_are_refused_before_anything_loads(world, unit, message, no_cycle_collection):
    from lib_delta.hosts.forge import control as control_mod
    from lib_delta.hosts.forge import models as forge_models

    fresh = world.f.generate(world.target)
    request = world.unit(**unit) if "model" not in unit else {"image": b64png(IMAGE), **unit}
    if "model" in unit and unit["model"] != "control_tiny_sd15_cany":
        request["model"] = _listed(unit["model"])
    calls = {n: p.calls for n, p in controlnet.supported_preprocessors.items()}
    status, text, _ = harness.failure(lambda: world.ours([request]))
    assert status == 422 and re.search(message, text), text
    assert controlnet.loaded_files == [] and control_mod.POOL.keys() == [] and forge_models.cached() == []
    assert {n: p.calls for n, p in controlnet.supported_preprocessors.items()} == calls
    assert torch.equal(world.f.generate(world.target), fresh)  # and the WebUI keeps serving


def test_an_sd1_unit_on_an_sdxl_source_and_a_missing_extension_are_refused(world, monkeypatch):
    status, text, _ = harness.failure(lambda: world.f.run(world.target, world.xl, {"controlnets": [world.unit()]}))
    assert status == 422 and "is not made for the source 'xl' (SDXL)" in text
    monkeypatch.delitem(sys.modules, "lib_controlnet.global_state")
    _, text, _ = harness.failure(lambda: world.ours([world.unit()]))
    assert status == 422 and "need Forge's built-in ControlNet (sd_forge_controlnet), which is not enabled" in text
    assert controlnet.loaded_files == []


def test_a_file_added_since_the_list_was_read_is_found_after_one_refresh(world):
    controlnet.write_controlnet(world.f.tmp / "ControlNet" / "control_tiny_sd15_new.safetensors", "sd1", seed=24)
    assert not any(k.startswith("control_tiny_sd15_new") for k in controlnet.controlnet_filename_dict)
    path = str(world.f.tmp / "ControlNet" / "control_tiny_sd15_new.safetensors")
    name = f"control_tiny_sd15_new [{hashlib.sha256(path.encode()).hexdigest()[:8]}]"  # the name Forge will list
    out = world.ours([{"model": name, "image": b64png(IMAGE)}])
    assert torch.isfinite(out).all() and name in controlnet.controlnet_filename_dict


# --- Forge's memory manager, the pool -------------------------------------------------------------------------------


def test_the_memory_manager_loads_the_controlnet_beside_the_target_and_the_pool_keeps_it(world, monkeypatch):
    from lib_delta.hosts.forge import control as control_mod

    real, loaded = backend.load_models_gpu, []

    def load_models_gpu(models, *args, **kwargs):
        loaded.append([id(getattr(m, "model", None)) for m in models])
        return real(models, *args, **kwargs)

    monkeypatch.setattr(backend, "load_models_gpu", load_models_gpu)
    world.ours([world.unit()])
    module = control_mod.POOL.models()[0].module
    target = id(world.target.forge_objects.unet.model)
    assert any(target in ids and id(module) in ids for ids in loaded)  # sampling_prepare loads both at once
    world.ours([world.unit(module="canny", weight=0.5)])
    assert controlnet.loaded_files == [controlnet.get_controlnet_filename(_listed("control_tiny_sd15_canny"))]
    ref = weakref.ref(module)
    del module
    world.ours([world.unit("control_tiny_sd15_depth")])  # the other one: the first is released before it loads
    assert ref() is None and len(control_mod.POOL.keys()) == 1
    world.f.generate(world.target, {"enabled": True, "source": world.base, "adapted_prompt": "x"})
    assert control_mod.POOL.keys() == []  # a generation that names none releases it


def test_in_neo_a_module_the_users_unit_cached_is_shared_and_never_freed(neo_world):
    from lib_delta.hosts.forge import control as control_mod

    w = neo_world
    path = controlnet.get_controlnet_filename(_listed("control_tiny_sd15_canny"))
    w.ours([w.unit()])
    assert path not in controlnet._CONTROL_MODEL_CACHE.cache  # ours alone: kept out of Neo's cache
    control_mod.forget_all()
    own = w.f.generate(w.target, others=[w.own()])
    cached = controlnet._CONTROL_MODEL_CACHE.cache[path]
    w.ours([w.unit()])
    assert control_mod.POOL.models()[0].module is cached
    control_mod.forget_all()
    assert cached.time_embed[0].weight.numel() > 0  # still the user's, whole
    assert torch.equal(w.f.generate(w.target, others=[w.own()]), own)
    assert neo_flavour.leak_reports == []  # no loaded network's patcher died under Neo's memory manager


# --- the lifecycle: nothing of a unit survives the generation ---------------------------------------------------------


class UnitSpy:
    """Weak references to each run's ControlNet copies and, through them, their hints."""

    def __init__(self, monkeypatch):
        from lib_delta.hosts.forge import control as control_mod

        self.refs: list[weakref.ref] = []
        real = control_mod.load_units

        def load_units(*args, **kwargs):
            units = real(*args, **kwargs)
            self.refs += [weakref.ref(u.cnet) for u in units] + [weakref.ref(u) for u in units]
            return units

        monkeypatch.setattr(control_mod, "load_units", load_units)

    def alive(self) -> int:
        return sum(r() is not None for r in self.refs)


def test_nothing_of_a_unit_survives_a_finished_a_failed_or_an_interrupted_generation(world, monkeypatch,
                                                                                       no_cycle_collection):
    from lib_delta.hosts.forge import control as control_mod

    def pooled_and_unloaded() -> None:  # the model itself stays pooled ("kept models"), not loaded
        module = control_mod.POOL.models()[0].module
        assert all(control_mod.memory.module_of(e) is not module for e in backend.current_loaded_models)

    harness.assert_units_leave_nothing(world, monkeypatch, UnitSpy, pooled_and_unloaded)


def test_a_start_that_fails_while_loading_units_keeps_nothing(world, monkeypatch, no_cycle_collection):
    """The second unit's network cannot be built: the first one's copy and module are freed at once (reference
    counting alone), even while the error (and its traceback) lives; the next plain image is the fresh one."""
    from lib_delta.hosts.forge import control as control_mod

    real = controlnet.try_load_supported_control_model
    built = []

    def load(path):
        if built:
            raise RuntimeError("damaged weights")
        out = real(path)
        built.append(weakref.ref(out.model_patcher.control_model))
        return out

    fresh = world.f.generate(world.target)
    monkeypatch.setattr(controlnet, "try_load_supported_control_model", load)
    monkeypatch.setattr(sys.modules["modules_forge.shared"], "try_load_supported_control_model", load)
    status, text, _ = harness.failure(lambda: world.ours([world.unit(), world.unit("control_tiny_sd15_depth")]))
    assert status == 422 and "cannot load the ControlNet" in text and "damaged weights" in text
    assert built and built[0]() is None and control_mod.POOL.keys() == []
    assert world.f.adapter.SLOT.get() is None
    assert torch.equal(world.f.generate(world.target), fresh)


def test_a_unit_on_a_native_resolution_source_gets_its_hint_fitted_by_forge(world, monkeypatch):
    """The source at its own (smaller) size: Forge's ControlNet fits the generation-size hint to the source's latent
    (its get_control), and the image is steered, finite."""
    from lib_delta import resolution

    monkeypatch.setitem(resolution.NATIVE_SIDE, "SD1", 64)
    xl = world.f.load(world.xl)
    big = {"width": 128, "height": 128}
    plain = world.f.run(xl, world.base, {"source_resolution": "native", "adapted_prompt": "wood"}, **big)
    out = world.f.run(xl, world.base, {"source_resolution": "native", "adapted_prompt": "wood",
                                       "controlnets": [world.unit()]}, **big)
    assert torch.isfinite(out).all() and rel(out, plain) > 1e-3


# --- the preview strip --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["forge", "neo"])
def test_the_preview_strip_shows_each_units_control_map(flavour, request):
    """One column of maps beside the strip's images, unit by unit down its rows: the map each ControlNet was given
    (canny edges of the control image at the generation's size), blank rows below."""
    from lib_delta import preview

    w: World = request.getfixturevalue("neo_world" if flavour == "neo" else "world")

    def strip(units: list[dict], **settings) -> np.ndarray:
        p = w.f.processing(w.target, {"enabled": True, "source": w.base, "controlnets": units, "preview": True,
                                      **settings})
        webui.process_images(p)
        return np.asarray(p.processed.images[-1])

    plain = strip([], adapted_prompt="x")
    one = strip([w.unit(module="canny")])
    two = strip([w.unit(module="canny"), w.unit("control_tiny_sd15_depth")])
    tile = one.shape[0] // preview.ROWS
    assert one.shape[0] == plain.shape[0] and one.shape[1] == plain.shape[1] + tile
    maps = one[:, plain.shape[1]:]
    assert maps[:tile].std() > 10 and not maps[tile:].any()
    both = two[:, plain.shape[1]:]
    assert np.array_equal(both[:tile], maps[:tile]) and both[tile:2 * tile].any() and not both[2 * tile:].any()
    edges = controlnet.PreprocessorCanny()(IMAGE, 512, slider_1=100, slider_2=200)  # 64 px: fitting keeps it
    assert np.array_equal(maps[:tile], preview._shrink(preview.hint_image(edges), tile, tile))
