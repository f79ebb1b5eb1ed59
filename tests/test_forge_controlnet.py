"""ControlNet units on the source's adapted rows in Forge 2 and Forge Neo, through the stand-in of Forge's built-in
ControlNet (tests/fake_forge/controlnet.py) with tiny random models.

The reference for the identities is Forge's own unit on the active model (``apply_controlnet_advanced`` on
``p.sd_model.forge_objects.unet``, as Forge's ControlNet script does): with the source as the target and λ = 1, Delta
Sampling's unit must give the same image.
"""

from __future__ import annotations

import base64
import io
import weakref

import numpy as np
import pytest
import torch

from lib_delta.args import DeltaSettings
from tests.fake_forge import backend, controlnet, harness, webui
from tests.fake_forge.harness import Forge, failure, forward_calls

pytestmark = pytest.mark.usefixtures("one_thread")
forge = harness.forge
neo = harness.neo
no_cycle_collection = harness.no_cycle_collection


def shape_image(size: int = 64) -> np.ndarray:
    """A white disc off-centre on a dark background: a map that says where the shape goes."""
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size, 3), 20, dtype=np.uint8)
    img[(yy - size * 0.35) ** 2 + (xx - size * 0.6) ** 2 < (size * 0.22) ** 2] = 235
    return img


def b64png(img: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def huge_png(w: int, h: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


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
    from lib_delta.hosts.forge import source as source_mod

    real = source_mod.ForgeSource._run
    checked = []

    def run(self, slot, ks, compiled, x, level, run_uncond):
        got = real(self, slot, ks, compiled, x, level, run_uncond)
        units, slot.units = slot.units, []
        try:
            plain = real(self, slot, ks, compiled, x, level, run_uncond)
        finally:
            slot.units = units
        for k in ks:
            if self.variants[k].units is None:
                assert torch.equal(got[k], plain[k])
            else:
                checked.append(rel(got[k], plain[k]))
        return got

    monkeypatch.setattr(source_mod.ForgeSource, "_run", run)
    extra = {"enable_hr": True, "hr_second_pass_steps": 2} if hires else {}
    world.ours([world.unit(module="canny")], prompt="a red cube AND a tall tree:0.6", **extra)
    assert len(checked) == (6 if hires else 4) and min(checked) > 1e-4


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


# --- across families ---------------------------------------------------------------------------------------------------


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
