"""ControlNet units on the source's adapted rows in AUTOMATIC1111, through the stand-in WebUI and the stand-in
sd-webui-controlnet extension (tests/fake_webui/sd-webui-controlnet) with tiny random models.

The reference for the identities is the extension's own unit on the active model (its ``UnetHook`` on
``p.sd_model``): with the source as the target and λ = 1, Delta Sampling's unit must give the same image.
"""

from __future__ import annotations

import base64
import gc
import io
import json
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "fake_webui"))
import controlnet_ext
import webui as fake

fake.install()

import networks  # noqa: E402

from lib_delta.args import DeltaSettings  # noqa: E402
from lib_delta.errors import DeltaError  # noqa: E402
from lib_delta.hosts import a1111 as host  # noqa: E402
from lib_delta.hosts.a1111 import source as a1111_source  # noqa: E402
from lib_delta.webui import interfaces  # noqa: E402
from tests.pictures import b64png, shape_image  # noqa: E402

PROMPT = "a photo of a cat on a red sofa"
BASE = dict(prompt=PROMPT, negative_prompt="blurry, dark", steps=4, seed=7, width=64, height=64, cfg_scale=5.0)


IMAGE = shape_image()


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("webui_cn")
    models = root / "models"
    fake.write_checkpoint(models / "base.safetensors", "sd1", 1)
    fake.write_checkpoint(models / "xl.safetensors", "sdxl", 4)
    fake.write_checkpoint(models / "v2v.safetensors", "sd2v", 5, yaml_beside=True)
    cn = root / "ControlNet"
    cn.mkdir()
    import safetensors.torch

    adapter = {"body.0.in_conv.weight": torch.zeros(4, 4, 1, 1)}  # a T2I-Adapter's layout
    safetensors.torch.save_file(adapter, str(cn / "t2iadapter_tiny.safetensors"))
    controlnet_ext.write_controlnet(cn / "control_tiny_sd15_canny.safetensors", "sd1", seed=21)
    controlnet_ext.write_controlnet(cn / "control_tiny_sd15_depth.safetensors", "sd1", seed=22)
    controlnet_ext.write_controlnet(cn / "control_tiny_sdxl_canny.safetensors", "sdxl", seed=23)
    loras = root / "lora"
    loras.mkdir()
    ui = fake.WebUI(models)
    ui.load("base")
    from modules import shared

    networks.write_lora(loras / "style.safetensors", shared.sd_model, seed=11)
    return root


@pytest.fixture
def ui(files):
    """A fresh WebUI session on "base", with the ControlNet extension installed and nothing cached."""
    a1111_source.forget_all()
    ui = fake.WebUI(files / "models")
    networks.list_available_networks(files / "lora")
    ui.load("base")
    ui.cn_script = controlnet_ext.install(files / "ControlNet")
    ui.add_script(ui.cn_script)
    yield ui
    controlnet_ext.uninstall()
    a1111_source.forget_all()
    gc.collect()


def listed(stem: str) -> str:
    gs = sys.modules["scripts.global_state"]
    return gs.cn_models_names[stem]


def unit(**kw):
    return {"model": listed("control_tiny_sd15_canny"), "image": b64png(IMAGE), **kw}


def own_unit(**kw):
    """The same unit for the extension's own ControlNet on the active model."""
    out = {"model": listed("control_tiny_sd15_canny"), "image": IMAGE, "module": "none", "weight": 1.0,
           "guidance_start": 0.0, "guidance_end": 1.0, "resize_mode": "Crop and Resize"}
    out.update(kw)
    return out


def delta(**kw):
    return {"enabled": True, "source": "base", **kw}


def rel(a, b):
    return float((a - b).norm() / b.norm())


def images(processed):
    return torch.stack([im for im in processed.images if isinstance(im, torch.Tensor)])


# --- off means off; base rows stay plain -------------------------------------------------------------------------


def test_zero_strength_and_empty_window_with_a_unit_are_bit_identical_to_off(ui):
    off = images(ui.txt2img(**BASE))
    for d in (delta(controlnets=[unit()], strength=0.0), delta(controlnets=[unit()], start=0.5, end=0.5),
              delta(controlnets=[unit(guidance_start=0.9, guidance_end=0.9)], adapted_prompt="",
                    strength=1.0)):
        assert torch.equal(images(ui.txt2img(d, **BASE)), off)


def test_a_unit_of_weight_zero_leaves_the_image_as_without_control(ui):
    off = images(ui.txt2img(**BASE))
    out = images(ui.txt2img(delta(controlnets=[unit(weight=0.0)]), **BASE))
    assert torch.equal(out, off)


@torch.no_grad()
def test_base_rows_of_the_batched_call_are_untouched(ui):
    """One source call with [base rows | adapted rows]: the base rows equal a call without control, bit for bit,
    and the adapted rows equal the extension's hooked forward on those rows."""
    from lib_delta.hosts.a1111 import control as control_mod
    from lib_delta.hosts.a1111.control_rows import RowControl

    gs = sys.modules["scripts.global_state"]
    from modules import sd_models, shared

    hook_mod = sys.modules["scripts.hook"]
    guess = sys.modules["scripts.controlnet_model_guess"]
    path = gs.cn_models[listed("control_tiny_sd15_canny")]
    unet = shared.sd_model.model.diffusion_model
    net = guess.build_model_by_guess(sd_models.read_state_dict(path), unet, path).model.control_model
    hint, _ = ui.cn_script.detectmap_proc(IMAGE, "none", "Crop and Resize", 64, 64)

    class Unit:
        def hint(self, h, w, device):
            return hint

        def scales(self, hires):
            return [1.0] * 13

    Unit.net = net
    g = torch.Generator().manual_seed(3)
    x, t, ctx = torch.randn(4, 4, 8, 8, generator=g), torch.full((4,), 500.0), torch.randn(4, 77, 32, generator=g)
    plain = unet(x, t, context=ctx)
    control = RowControl(unet)
    try:
        with control.rows([(slice(2, 4), (Unit(),))]):
            mixed = unet(x, t, context=ctx)
    finally:
        control.remove()
    assert not unet._forward_pre_hooks and not unet.middle_block._forward_hooks
    assert torch.equal(mixed[:2], plain[:2])
    params = hook_mod.ControlParams(control_model=net, preprocessor={"name": "none"}, hint_cond=hint, weight=1.0,
                                    guidance_stopped=False, start_guidance_percent=0.0, stop_guidance_percent=1.0,
                                    advanced_weighting=None, control_model_type=None, hr_hint_cond=None,
                                    global_average_pooling=False, soft_injection=False, cfg_injection=False)
    hook = hook_mod.UnetHook()
    hook.hook(unet, shared.sd_model, [params], None)
    try:
        reference = unet(x[2:], t[2:], context=ctx[2:])
    finally:
        hook.restore(unet)
    assert rel(mixed[2:], reference) < 1e-6 and rel(mixed[2:], plain[2:]) > 1e-3
    assert control_mod.SAFE_MODULES[0] == "none"


# --- the identity: target == source, λ = 1 equals the extension's own unit -----------------------------------------


@pytest.mark.parametrize("module", ["none", "canny", "shuffle"])
def test_identity_with_the_extensions_own_unit(ui, module):
    plain = images(ui.txt2img(**BASE))
    reference = images(ui.txt2img(controlnet=[own_unit(module=module)], **BASE))
    out = images(ui.txt2img(delta(controlnets=[unit(module=module)]), **BASE))
    assert rel(reference, plain) > 1e-2  # the control really moves the image
    assert rel(out, reference) < 1e-5
    from modules import shared

    assert "_original_forward" not in vars(shared.sd_model.model.diffusion_model)  # the extension restored it


def test_identity_with_a_window_two_units_and_a_lora(ui):
    own = [own_unit(weight=0.7, guidance_end=0.5),
           own_unit(model=listed("control_tiny_sd15_depth"), module="invert", weight=1.3, guidance_start=0.25)]
    ours = [unit(weight=0.7, guidance_end=0.5),
            unit(model=listed("control_tiny_sd15_depth"), module="invert", weight=1.3, guidance_start=0.25)]
    reference = images(ui.txt2img(controlnet=own, **{**BASE, "prompt": PROMPT + " <lora:style:1>"}))
    out = images(ui.txt2img(delta(controlnets=ours, loras="<lora:style:1>"), **BASE))
    assert rel(out, reference) < 1e-5


@pytest.mark.parametrize("cfg_mode", ["cfg", "cond"])
def test_identity_when_cond_and_uncond_rows_run_in_separate_calls(ui, cfg_mode):
    long = {**BASE, "prompt": " ".join(f"word{i}" for i in range(90))}  # two 75-token chunks against one
    reference = images(ui.txt2img(controlnet=[own_unit()], **long))
    out = images(ui.txt2img(delta(controlnets=[unit()], cfg_mode=cfg_mode), **long))
    if cfg_mode == "cfg":
        assert rel(out, reference) < 1e-5
    else:  # the source on its cond rows only: not the identity, but controlled and finite
        assert torch.isfinite(out).all() and rel(out, images(ui.txt2img(**long))) > 1e-3


def test_identity_in_hires_fix_img2img_and_batches(ui):
    from PIL import Image

    hires = dict(enable_hr=True, hr_scale=2.0, hr_second_pass_steps=2, batch_size=2)
    reference = images(ui.txt2img(controlnet=[own_unit(module="canny")], **BASE, **hires))
    out = images(ui.txt2img(delta(controlnets=[unit(module="canny")]), **BASE, **hires))
    assert out.shape[0] == 2 and rel(out, reference) < 1e-5
    init = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(5))
    i2i = dict(init_latent_input=init, init_images=[Image.fromarray(IMAGE)], denoising_strength=0.75, batch_size=2)
    reference = images(ui.img2img(controlnet=[own_unit()], **BASE, **i2i))
    plain = images(ui.img2img(**BASE, **i2i))
    out = images(ui.img2img(delta(controlnets=[{"model": listed("control_tiny_sd15_canny")}]), **BASE, **i2i))
    assert rel(reference, plain) > 1e-3 and rel(out, reference) < 1e-5  # the init image served as the control


# --- across families -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["xl", "v2v"])
def test_an_sd1_controlnet_through_an_sd1_source_steers_other_families(ui, target):
    ui.load(target)
    plain = images(ui.txt2img(**BASE))
    p = ui.txt2img(delta(controlnets=[unit(weight=0.5)], strength=0.5), **BASE)
    out = images(p)
    assert torch.isfinite(out).all() and rel(out, plain) > 1e-3
    stored = p.extra_generation_params["Delta ControlNets"]
    back = DeltaSettings.from_infotext({"Delta source": "base", "Delta ControlNets": stored})
    assert back.groups[0].controlnets[0].model == listed("control_tiny_sd15_canny")


# --- refusals: a 422 with a clear message, nothing loaded -------------------------------------------------------------


def _huge_png(w: int, h: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize(("units", "message"), [
    ([{"model": "control_tiny_sd15_cany", "image": "x"}], r"ControlNet model 'control_tiny_sd15_cany' is not among "
                                                            r"sd-webui-controlnet's models\. Closest: 'control_tiny"),
    ([{"model": "control_tiny_sdxl_canny", "image": "x"}], r"'control_tiny_sdxl_canny \[\w+\]' \(SDXL\) is not made "
                                                             r"for the source 'base'"),
    ([{"model": "t2iadapter_tiny", "image": "x"}], r"'t2iadapter_tiny \[\w+\]' is not a ControlNet \(a T2I-Adapter"),
    ([{"model": "control_tiny_sd15_canny", "image": "bm90IGFuIGltYWdl"}], r"control image \(ControlNet unit 1\) is "
                                                                          r"not a readable image"),
    ([{"model": "control_tiny_sd15_canny", "image": "%%%"}], r"not a readable image"),
    ([{"model": "control_tiny_sd15_canny", "image": _huge_png(4097, 8)}], r"4097×8; at most 4096 pixels a side"),
    ([{"model": "control_tiny_sd15_canny", "image": _huge_png(4096, 4100)}], r"at most 4096 pixels a side"),
    ([{"model": "control_tiny_sd15_canny", "image": b64png(IMAGE), "module": "depth_midas"}],
     r"preprocessor 'depth_midas' \(ControlNet unit 1\) is not supported"),
    ([{"model": "control_tiny_sd15_canny", "image": b64png(IMAGE), "module": "cany"}],
     r"preprocessor \(ControlNet unit 1\) 'cany' is not among .* Closest: 'canny'"),
    ([{"model": "control_tiny_sd15_canny"}],
     r"No control image was given \(ControlNet unit 1\): send it as base64 .* never kept in infotext"),
])
def test_bad_units_are_refused_before_anything_loads(ui, monkeypatch, units, message):
    pre = sys.modules["scripts.supported_preprocessor"].Preprocessor
    calls = pre.calls
    built = []
    guess = sys.modules["scripts.controlnet_model_guess"]
    real = guess.build_model_by_guess
    monkeypatch.setattr(guess, "build_model_by_guess", lambda *a: built.append(1) or real(*a))
    with pytest.raises(DeltaError, match=message) as e:
        ui.txt2img(delta(controlnets=units), **BASE)
    assert e.value.status_code == 422
    assert a1111_source.cached() == [] and built == [] and pre.calls == calls
    off = images(ui.txt2img(**BASE))  # and the WebUI keeps serving
    assert torch.isfinite(off).all()


def test_too_many_units_and_a_missing_extension_are_refused(ui):
    one = unit()
    with pytest.raises(DeltaError, match=r"lists 3 ControlNet units; at most 2"):
        ui.txt2img(delta(controlnets=[one] * 3), **BASE)
    controlnet_ext.uninstall()
    with pytest.raises(DeltaError, match=r"need the sd-webui-controlnet extension, which is not installed") as e:
        ui.txt2img(delta(controlnets=[one]), **BASE)
    assert e.value.status_code == 422 and a1111_source.cached() == []


# --- infotext and X/Y/Z ---------------------------------------------------------------------------------------------


def _params(infotext: str) -> dict[str, str]:
    """The generation-parameters line of the stand-in's infotext, split as the WebUI's parser does (quoted values)."""
    import re

    line = infotext.splitlines()[-1]
    return {m[0]: m[1] for m in re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', line)}


def test_infotext_records_the_unit_but_never_the_image(ui):
    p = ui.txt2img(delta(controlnets=[unit(module="canny", weight=0.8, guidance_end=0.75)]), **BASE)
    text = p.infotexts[0]
    name = listed("control_tiny_sd15_canny")
    assert name in text and "[" in name  # the model's listed name carries its hash
    assert b64png(IMAGE)[:40] not in text
    stored = p.extra_generation_params["Delta ControlNets"]
    back = DeltaSettings.from_infotext({"Delta source": "base", "Delta lambda": "1", "Delta ControlNets": stored})
    [u] = back.groups[0].controlnets
    assert (u.model, u.module, u.weight, u.guidance_start, u.guidance_end, u.image) == (name, "canny", 0.8, 0.0,
                                                                                          0.75, "")
    with pytest.raises(DeltaError, match="never kept in infotext: after pasting parameters, give it again"):
        ui.txt2img(back.to_dict(), **BASE)


def test_the_xyz_axes_set_every_unit_of_the_first_group(ui):
    from modules import processing

    axes = {a.label: a for a in interfaces.AXES}
    weight, end = axes["[Delta] ControlNet weight"], axes["[Delta] ControlNet guidance end"]
    off = images(ui.txt2img(**BASE))

    def cell(axis, value):
        p = processing.StableDiffusionProcessingTxt2Img(scripts=ui.runner, script_args=(delta(controlnets=[unit()]),
                                                                                        []), **BASE)
        axis.apply(p, value, None)
        return processing.process_images(p)

    assert torch.equal(images(cell(weight, 0.0)), off)
    assert torch.equal(images(cell(end, 0.0)), images(ui.txt2img(delta(controlnets=[unit(guidance_end=0.0)]),
                                                                 **BASE)))
    assert '"weight":0.5' in cell(weight, 0.5).extra_generation_params["Delta ControlNets"]

    p = processing.StableDiffusionProcessingTxt2Img(scripts=ui.runner, script_args=(delta(), []), **BASE)
    # a grid over the weight of units the panel does not have: refused before it starts (the grid's confirm reads
    # the request's settings from its p), and by each cell if one still runs
    assert "which has none" in interfaces.settings_of_grid(p).missing_entries("controlnet_weight")
    weight.apply(p, 0.5, None)
    with pytest.raises(DeltaError, match=r"axis '\[Delta\] ControlNet weight' sets every ControlNet unit of the first "
                                         "adaptation group, which has none: add a ControlNet unit"):
        processing.process_images(p)
    assert torch.equal(images(ui.txt2img(**BASE)), off)


# --- the lifecycle: nothing of a unit survives the generation -------------------------------------------------


def _hooked(entry) -> bool:
    unet = entry.model.model.diffusion_model
    return bool(unet._forward_pre_hooks or unet.middle_block._forward_hooks
                or any(b._forward_pre_hooks for b in unet.output_blocks))


def test_hooks_and_networks_go_with_the_run_even_when_it_fails(ui, monkeypatch):
    refs = []
    real_open = host.SLOT.open

    def open_(p, run):
        refs.extend(weakref.ref(u.net) for u in run.units)
        real_open(p, run)

    monkeypatch.setattr(host.SLOT, "open", open_)
    fresh = images(ui.txt2img(**BASE))
    was = gc.isenabled()
    gc.collect()
    gc.disable()  # what is freed here is freed by reference counting alone
    try:
        ui.txt2img(delta(controlnets=[unit()]), **BASE)
        assert refs and all(r() is None for r in refs)
    finally:
        if was:
            gc.enable()
    assert not any(_hooked(e) for e in a1111_source.cached())

    from modules import shared

    model = shared.sd_model.model
    original = type(model).forward
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("an extension's UNet hook failed")
        return original(self, *args, **kwargs)

    refs.clear()
    with monkeypatch.context() as mp:
        mp.setattr(type(model), "forward", failing)
        with pytest.raises(Exception, match="an extension's UNet hook failed"):
            ui.txt2img(delta(controlnets=[unit()]), **BASE)
    gc.collect()
    assert refs and all(r() is None for r in refs)
    assert not any(_hooked(e) for e in a1111_source.cached())
    assert torch.equal(images(ui.txt2img(**BASE)), fresh)


def test_the_users_own_unit_on_the_active_model_works_beside_ours(ui):
    """Both at once: the extension's unit on the target and ours on the source's adapted rows; the user's unit
    is untouched by ours (the same image as the extension alone when λ = 0)."""
    own = [own_unit(model=listed("control_tiny_sd15_depth"), weight=0.6)]
    alone = images(ui.txt2img(controlnet=own, **BASE))
    both_off = images(ui.txt2img(delta(controlnets=[unit()], strength=0.0), controlnet=own, **BASE))
    both = images(ui.txt2img(delta(controlnets=[unit()]), controlnet=own, **BASE))
    assert torch.equal(both_off, alone)
    assert torch.isfinite(both).all() and rel(both, alone) > 1e-3
    from modules import shared

    assert "_original_forward" not in vars(shared.sd_model.model.diffusion_model)


def test_a_start_that_fails_while_loading_units_keeps_nothing(ui, monkeypatch):
    """The second unit's network cannot be built: the first one's is freed at once (reference counting alone),
    even while the error (and its traceback) lives, and the source goes back to the pool's limits."""
    guess = sys.modules["scripts.controlnet_model_guess"]
    real = guess.build_model_by_guess
    built = []

    def build(state_dict, unet, path):
        if built:
            raise RuntimeError("damaged weights")
        out = real(state_dict, unet, path)
        built.append(weakref.ref(out.model.control_model))
        return out

    monkeypatch.setattr(guess, "build_model_by_guess", build)
    fresh = images(ui.txt2img(**BASE))
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        with pytest.raises(DeltaError, match=r"cannot build the ControlNet .*damaged weights") as e:
            ui.txt2img(delta(controlnets=[unit(), unit(model=listed("control_tiny_sd15_depth"))]), **BASE)
        assert e.value.status_code == 422 and built and built[0]() is None
    finally:
        if was:
            gc.enable()
    assert host.SLOT.get() is None and not any(_hooked(e) for e in a1111_source.cached())
    monkeypatch.setattr(guess, "build_model_by_guess", real)
    assert torch.equal(images(ui.txt2img(**BASE)), fresh)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_source_on_the_gpu_runs_its_units_there_eagerly(ui, monkeypatch, capsys):
    """The source on cuda:0 (the stand-in's target stays on the CPU, so the source runs beside it): the networks
    and hints go with it, CUDA graph replay is off for the run (and said so), and the identity holds within the
    two devices' rounding."""
    from modules import shared

    made = []
    real = host.GraphedCall
    monkeypatch.setattr(host, "GraphedCall", lambda *a, **k: made.append(1) or real(*a, **k))
    monkeypatch.setattr(shared.opts, "delta_sampling_device", "cuda:0", raising=False)
    monkeypatch.setattr(shared.opts, "delta_sampling_cuda_graph", True, raising=False)
    # cuDNN's convolutions default to TF32 (10-bit mantissa): 1e-3 from the CPU's fp32 on their own
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    kw = {**BASE, "steps": 8}
    reference = images(ui.txt2img(controlnet=[own_unit(module="canny")], **kw))
    devices = []
    real_hint = sys.modules["lib_delta.hosts.a1111.control"].LoadedUnit.hint

    def hint(self, h, w, device):
        devices.append((next(self.net.parameters()).device.type, device.type))
        return real_hint(self, h, w, device)

    monkeypatch.setattr(sys.modules["lib_delta.hosts.a1111.control"].LoadedUnit, "hint", hint)
    out = images(ui.txt2img(delta(controlnets=[unit(module="canny")]), **kw))
    said = capsys.readouterr().out
    assert not made, f"a graph was recorded for a run with units; the log said: {said[-2000:]}"
    assert "CUDA graph replay is off" in said, said[-2000:]
    assert devices and set(devices) == {("cuda", "cuda")}
    assert rel(out, reference) < 1e-4


# --- the panel's form, the infotext's names, the preview strip ------------------------------------------------------


def _from_panel(ui, values: list, img2img: bool = False, **kw):
    """A generation whose Delta Sampling arguments are the panel's positional values (as the WebUI passes them)."""
    from modules import processing

    from lib_delta.args import POSITIONAL_FIELDS

    ours, cn = ui.runner.alwayson_scripts[0], ui.cn_script
    n = len(POSITIONAL_FIELDS)
    ours.args_to, cn.args_from, cn.args_to = n, n, n + 1
    try:
        cls = processing.StableDiffusionProcessingImg2Img if img2img else processing.StableDiffusionProcessingTxt2Img
        return processing.process_images(cls(scripts=ui.runner, script_args=(*values, []), **kw))
    finally:
        ours.args_to, cn.args_from, cn.args_to = 1, 1, 2


def _panel(**controls) -> list:
    from lib_delta.args import POSITIONAL_FIELDS, to_positional

    values = to_positional(DeltaSettings())
    for name, value in controls.items():
        values[POSITIONAL_FIELDS.index(name)] = value
    return values


def test_a_unit_set_in_the_panel_gives_the_image_of_the_same_api_unit(ui):
    api = images(ui.txt2img(delta(controlnets=[unit(module="canny", weight=0.7)]), **BASE))
    panel = images(_from_panel(ui, _panel(enabled=True, source="base", controlnet1_model=listed(
        "control_tiny_sd15_canny"), controlnet1_image=IMAGE, controlnet1_module="canny", controlnet1_weight=0.7),
        **BASE))
    assert torch.equal(panel, api) and rel(api, images(ui.txt2img(**BASE))) > 1e-3
    # a unit left at "None" is none: with only a prompt delta the panel's other unit controls change nothing
    untouched = _panel(enabled=True, source="base", prompt="in the snow", controlnet2_weight=0.2,
                       controlnet2_image=IMAGE)
    assert torch.equal(images(_from_panel(ui, untouched, **BASE)),
                       images(ui.txt2img(delta(adapted_prompt="in the snow"), **BASE)))


def test_the_init_image_box_uses_the_init_image_and_is_refused_in_txt2img(ui):
    from PIL import Image

    init = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(5))
    i2i = dict(init_latent_input=init, init_images=[Image.fromarray(IMAGE)], denoising_strength=0.75)
    by_default = images(ui.img2img(delta(controlnets=[{"model": listed("control_tiny_sd15_canny")}]), **BASE, **i2i))
    other = shape_image()[::-1].copy()  # an upload the box overrides
    ticked = _panel(enabled=True, source="base", controlnet1_model=listed("control_tiny_sd15_canny"),
                    controlnet1_image=other, controlnet1_use_init_image=True)
    assert torch.equal(images(_from_panel(ui, ticked, img2img=True, **BASE, **i2i)), by_default)
    with pytest.raises(DeltaError, match=r"asks for the init image, which txt2img has none of") as e:
        ui.txt2img(delta(controlnets=[unit(use_init_image=True)]), **BASE)
    assert e.value.status_code == 422


def test_infotext_and_log_line_name_the_listed_model_with_its_hash(ui, capsys):
    name = listed("control_tiny_sd15_canny")
    p = ui.txt2img(delta(controlnets=[unit(model="control_tiny_sd15_canny", module="canny", weight=0.5)]), **BASE)
    [recorded] = json.loads(p.extra_generation_params["Delta ControlNets"])
    assert recorded["model"] == name and name.startswith("control_tiny_sd15_canny [")  # the stem, given as is
    assert (recorded["module"], recorded["weight"], recorded["guidance_start"], recorded["guidance_end"]) == (
        "canny", 0.5, 0.0, 1.0)
    log = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Delta Sampling: source=")]
    assert f"ControlNet on the adapted rows: {name} (canny, 0.5, 0-1)" in log[-1]
    assert f"controlnet={name} (canny, 0.5, 0-1)" in log[-1]


def test_the_preview_strip_shows_each_units_control_map(ui):
    from lib_delta import preview

    def strip(units):
        p = ui.txt2img(delta(controlnets=units, preview=True), **BASE)
        return np.asarray(p.images[-1])

    plain = np.asarray(ui.txt2img(delta(adapted_prompt="x", preview=True), **BASE).images[-1])
    one = strip([unit(module="canny")])
    two = strip([unit(module="canny"), unit(module="invert", model=listed("control_tiny_sd15_depth"))])
    tile = one.shape[0] // 4
    assert one.shape[0] == plain.shape[0] and one.shape[1] == plain.shape[1] + tile  # one more column: the maps
    maps = one[:, plain.shape[1]:]
    assert maps[:tile].std() > 10 and not maps[tile:].any()  # unit 1's map in the first row, then blank rows
    both = two[:, plain.shape[1]:]
    assert np.array_equal(both[:tile], maps[:tile]) and both[tile:2 * tile].any() and not both[2 * tile:].any()
    # what is shown is the map the ControlNet was given: the canny edges of the image at the generation's size
    script = ui.cn_script
    detected = sys.modules["scripts.supported_preprocessor"].Preprocessor.get_preprocessor("canny")(
        IMAGE, 512, slider_1=100, slider_2=200)
    hint, _ = type(script).detectmap_proc(detected, "canny", "Crop and Resize", 64, 64)
    expected = preview._shrink(preview.hint_image(hint), tile, tile)
    assert np.array_equal(maps[:tile], expected)


# --- what the panel's dropdowns list ------------------------------------------------------------------------------


def test_the_panels_lists_are_the_extensions_and_follow_the_sources_header(ui, files):
    from lib_delta import hosts
    from lib_delta.args import ControlNetUnit
    from lib_delta.fields import settings_of
    from lib_delta.hosts.a1111 import catalog
    from lib_delta.webui import lists

    assert hosts.catalog() is catalog and catalog.missing("controlnet") is None
    gs = sys.modules["scripts.global_state"]
    assert catalog.names("controlnet") == [k for k, v in gs.cn_models.items() if v]  # "None" maps to no file
    assert catalog.names("controlnet_module") == ["none", "canny", "invert", "shuffle"]  # not depth_midas, inpaint
    model = next(s for s in settings_of(ControlNetUnit) if s.name == "model")
    # the source's family from its file's header, whatever its name says: "base" is SD1.5, "xl" SDXL
    assert lists.source_family("base") == "SD1" and lists.source_family("xl") == "SDXL"
    assert lists.choices(model, "base") == ["None", listed("control_tiny_sd15_canny"),
                                            listed("control_tiny_sd15_depth"), listed("t2iadapter_tiny")]
    assert lists.choices(model, "xl") == ["None", listed("control_tiny_sdxl_canny"), listed("t2iadapter_tiny")]
    # a file added later appears after a refresh
    controlnet_ext.write_controlnet(files / "ControlNet" / "control_late_sd15_seg.safetensors", "sd1", seed=24)
    try:
        assert not any("late" in n for n in catalog.names("controlnet"))
        lists.refresh(model)
        assert any(n.startswith("control_late_sd15_seg [") for n in lists.choices(model, "base"))
    finally:
        (files / "ControlNet" / "control_late_sd15_seg.safetensors").unlink()
        gs.update_cn_models()
    controlnet_ext.uninstall()
    assert "sd-webui-controlnet extension, which is not installed" in catalog.missing("controlnet")
    assert catalog.names("controlnet") == [] and lists.choices(model, "base") == ["None"]
