"""IP-Adapter units on the source's adapted rows in AUTOMATIC1111, through the stand-in WebUI and the stand-in
sd-webui-controlnet extension (its IP-Adapter model, its module-global attention hook and a CLIP-vision encoder of
the real layout, reduced), with tiny random models written as files.

The reference for the identities is the extension's own IP-Adapter unit on the active model (``PlugableIPAdapter
.hook`` on ``p.sd_model``): with the source as the target and λ = 1, Delta Sampling's unit gives the same image.
"""

from __future__ import annotations

import gc
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

from test_a1111_controlnet import BASE, images, rel  # noqa: E402  (the same scene)

from lib_delta.args import DeltaSettings  # noqa: E402
from lib_delta.errors import DeltaError  # noqa: E402
from lib_delta.hosts import a1111 as host  # noqa: E402
from lib_delta.hosts.a1111 import ipadapter as ip_mod  # noqa: E402
from lib_delta.hosts.a1111 import source as a1111_source  # noqa: E402
from lib_delta.webui import interfaces  # noqa: E402
from tests.pictures import b64png  # noqa: E402


def reference_image(size: int = 64) -> np.ndarray:
    """A red disc on a blue-green gradient: colours and a shape for the image encoder to see."""
    yy, xx = np.mgrid[:size, :size]
    img = np.stack([np.full((size, size), 30), yy * 255 // size, 255 - xx * 255 // size], axis=2).astype(np.uint8)
    img[(yy - size * 0.4) ** 2 + (xx - size * 0.55) ** 2 < (size * 0.25) ** 2] = (230, 40, 40)
    return img


IMAGE = reference_image()
OTHER = np.ascontiguousarray(IMAGE[::-1, ::-1])


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("webui_ip")
    models = root / "models"
    fake.write_checkpoint(models / "base.safetensors", "sd1", 1)
    fake.write_checkpoint(models / "xl.safetensors", "sdxl", 4)
    fake.write_checkpoint(models / "v2v.safetensors", "sd2v", 5, yaml_beside=True)
    ui = fake.WebUI(models)
    cn = root / "ControlNet"
    from modules import shared

    ui.load("base")
    unet = shared.sd_model.model.diffusion_model
    controlnet_ext.write_ipadapter(cn / "ip-adapter_tiny_sd15.safetensors", unet, seed=31)
    controlnet_ext.write_ipadapter(cn / "ip-adapter_tiny_sd15_b.safetensors", unet, seed=32)
    controlnet_ext.write_ipadapter(cn / "ip-adapter_tiny_sd15_vitg.safetensors", unet, clip_dim=1280, seed=33)
    controlnet_ext.write_ipadapter(cn / "ip-adapter-faceid_tiny_sd15.safetensors", unet, clip_dim=512, seed=34)
    controlnet_ext.write_controlnet(cn / "control_tiny_sd15_canny.safetensors", "sd1", seed=21)
    ui.load("xl")
    controlnet_ext.write_ipadapter(cn / "ip-adapter_tiny_sdxl.safetensors", shared.sd_model.model.diffusion_model,
                                   seed=35)
    annotator = root / "annotator"
    controlnet_ext.write_clip_vision(annotator / "clip_vision" / "clip_h.pth", "clip_h", seed=41)
    return root


@pytest.fixture
def ui(files):
    """A fresh WebUI session on "base", with the ControlNet extension installed and nothing cached."""
    a1111_source.forget_all()
    ip_mod.forget_all()
    ui = fake.WebUI(files / "models")
    ui.load("base")
    ui.cn_script = controlnet_ext.install(files / "ControlNet", files / "annotator")
    ui.add_script(ui.cn_script)
    yield ui
    controlnet_ext.uninstall()
    a1111_source.forget_all()
    ip_mod.forget_all()
    gc.collect()


def listed(stem: str) -> str:
    return sys.modules["scripts.global_state"].cn_models_names[stem]


def unit(stem: str = "ip-adapter_tiny_sd15", image: np.ndarray = IMAGE, **kw):
    return {"model": listed(stem), "image": b64png(image), **kw}


def own_unit(stem: str = "ip-adapter_tiny_sd15", image: np.ndarray = IMAGE, **kw):
    """The same unit for the extension's own IP-Adapter on the active model."""
    return {"model": listed(stem), "image": image, "module": "ip-adapter_clip_h", "weight": 1.0,
            "guidance_start": 0.0, "guidance_end": 1.0, **kw}


def delta(**kw):
    return {"enabled": True, "source": "base", **kw}


def encoder_loads() -> int:
    return sys.modules["scripts.preprocessor.legacy.processor"].loads


def encoder_loaded() -> bool:
    return sys.modules["scripts.preprocessor.legacy.processor"].clip_encoder["clip_h"] is not None


def _hooked(entry) -> bool:
    unet = entry.model.model.diffusion_model
    return any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())


# --- off means off; base rows stay plain -------------------------------------------------------------------------


def test_zero_strength_empty_window_and_zero_weight_are_bit_identical_to_off(ui):
    off = images(ui.txt2img(**BASE))
    for d in (delta(ipadapters=[unit()], strength=0.0), delta(ipadapters=[unit()], start=0.5, end=0.5),
              delta(ipadapters=[unit(guidance_start=0.9, guidance_end=0.9)]), delta(ipadapters=[unit(weight=0.0)])):
        assert torch.equal(images(ui.txt2img(d, **BASE)), off)


@torch.no_grad()
def test_base_rows_of_the_batched_call_are_untouched_and_adapted_rows_equal_the_extensions_hook(ui):
    """One UNet call with [base rows | adapted cond row | adapted uncond row]: the base rows equal a call without
    the adapter, bit for bit, and the adapted rows equal the extension's hacked attention on those rows."""
    from modules import shared

    from lib_delta.hosts.a1111.ip_rows import RowImagePrompt

    p = type("P", (), {"scripts": ui.runner, "init_images": None})()
    settings = DeltaSettings.from_dict(delta(ipadapters=[unit()])).validated()
    [plan] = ip_mod.plan_units(settings, p, "sd1", 32, "base")
    unet = shared.sd_model.model.diffusion_model
    [loaded] = ip_mod.load_units([plan], p, lambda g: unet, "sd1", 32, "base")
    g = torch.Generator().manual_seed(3)
    x, t, ctx = torch.randn(4, 4, 8, 8, generator=g), torch.full((4,), 500.0), torch.randn(4, 77, 32, generator=g)
    plain = unet(x, t, context=ctx)
    hooks = RowImagePrompt(unet)
    try:
        with hooks.rows([(slice(2, 4), ((loaded, (True, False)),))]):
            mixed = unet(x, t, context=ctx)
    finally:
        hooks.remove()
    assert not _hooked(type("E", (), {"model": shared.sd_model})())
    assert torch.equal(mixed[:2], plain[:2])
    ip = sys.modules["scripts.ipadapter.plugable_ipadapter"]
    built = sys.modules["scripts.controlnet_model_guess"].build_model_by_guess(
        __import__("safetensors.torch").torch.load_file(plan.path), None, plan.path)
    clip = sys.modules["scripts.supported_preprocessor"].Preprocessor.get_preprocessor("ip-adapter_clip_h")
    built.model.hook(model=unet, preprocessor_outputs=clip(IMAGE), weight=1.0, start=0.0, end=1.0)
    unet.cond_mark = torch.tensor([1.0, 0.0]).view(2, 1, 1, 1)
    try:
        reference = unet(x[2:], t[2:], context=ctx[2:])
    finally:
        ip.clear_all_ip_adapter()
        del unet.cond_mark
    assert rel(mixed[2:], reference) < 1e-5 and rel(mixed[2:], plain[2:]) > 1e-3


# --- the identity: target == source, λ = 1 equals the extension's own unit -----------------------------------------


def test_identity_with_the_extensions_own_unit(ui):
    plain = images(ui.txt2img(**BASE))
    reference = images(ui.txt2img(controlnet=[own_unit()], **BASE))
    out = images(ui.txt2img(delta(ipadapters=[unit()]), **BASE))
    assert rel(reference, plain) > 1e-2  # the image prompt really moves the image
    assert rel(out, reference) < 1e-5
    other = images(ui.txt2img(delta(ipadapters=[unit(image=OTHER)]), **BASE))
    assert rel(other, out) > 1e-3  # and it is the image that decides how


def test_identity_with_a_window_a_weight_two_units_and_batches(ui):
    own = [own_unit(weight=0.7, guidance_end=0.5), own_unit("ip-adapter_tiny_sd15_b", OTHER, weight=1.3,
                                                            guidance_start=0.25)]
    ours = [unit(weight=0.7, guidance_end=0.5), unit("ip-adapter_tiny_sd15_b", OTHER, weight=1.3,
                                                     guidance_start=0.25)]
    kw = {**BASE, "batch_size": 2}
    reference = images(ui.txt2img(controlnet=own, **kw))
    out = images(ui.txt2img(delta(ipadapters=ours), **kw))
    assert out.shape[0] == 2 and rel(out, reference) < 1e-5


@pytest.mark.parametrize("cfg_mode", ["cfg", "cond"])
def test_identity_when_cond_and_uncond_rows_run_in_separate_calls(ui, monkeypatch, cfg_mode):
    """Cond and uncond rows in separate calls (their token lengths differ): each row gets its own embedding. The
    extension caches each layer's keys and values from the first call of a generation (the cond rows) and gives
    them to the uncond call too, so its image differs; without that cache it is ours."""
    long = {**BASE, "prompt": " ".join(f"word{i}" for i in range(90))}  # two 75-token chunks against one
    cached = images(ui.txt2img(controlnet=[own_unit()], **long))
    ip = sys.modules["scripts.ipadapter.plugable_ipadapter"].PlugableIPAdapter
    monkeypatch.setattr(ip, "call_ip", lambda self, key, feat, device: self.ipadapter.ip_layers.to_kvs[key](feat))
    reference = images(ui.txt2img(controlnet=[own_unit()], **long))
    out = images(ui.txt2img(delta(ipadapters=[unit()], cfg_mode=cfg_mode), **long))
    if cfg_mode == "cfg":
        assert rel(out, reference) < 1e-5 and rel(cached, reference) > 1e-3
    else:  # the source on its cond rows only: not the identity, but steered and finite
        assert torch.isfinite(out).all() and rel(out, images(ui.txt2img(**long))) > 1e-3


def test_identity_with_a_controlnet_in_the_same_group(ui):
    from test_a1111_controlnet import IMAGE as CONTROL

    cn_own = {"model": listed("control_tiny_sd15_canny"), "image": CONTROL, "module": "none", "weight": 1.0,
              "guidance_start": 0.0, "guidance_end": 1.0, "resize_mode": "Crop and Resize"}
    reference = images(ui.txt2img(controlnet=[cn_own, own_unit()], **BASE))
    out = images(ui.txt2img(delta(ipadapters=[unit()], controlnets=[{"model": listed("control_tiny_sd15_canny"),
                                                                     "image": b64png(CONTROL)}]), **BASE))
    assert rel(out, reference) < 1e-5


# --- across families -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["xl", "v2v"])
def test_an_sd1_ipadapter_through_an_sd1_source_steers_other_families(ui, target):
    ui.load(target)
    plain = images(ui.txt2img(**BASE))
    p = ui.txt2img(delta(ipadapters=[unit(weight=0.6)]), **BASE)
    out = images(p)
    assert torch.isfinite(out).all() and rel(out, plain) > 1e-3
    stored = p.extra_generation_params["Delta IP Adapters"]
    back = DeltaSettings.from_infotext({"Delta source": "base", "Delta IP Adapters": stored})
    [u] = back.groups[0].ipadapters
    assert (u.model, u.module, u.weight, u.image) == (listed("ip-adapter_tiny_sd15"), "ip-adapter_clip_h", 0.6, "")
    assert b64png(IMAGE)[:40] not in p.infotexts[0]


# --- refusals: a 422 with a clear message, nothing loaded -------------------------------------------------------------


@pytest.mark.parametrize(("units", "message"), [
    ([{"model": "ip-adapter_tiny_sd1", "image": "x"}], r"IP-Adapter model 'ip-adapter_tiny_sd1' is not among "
                                                         r"sd-webui-controlnet's models\. Closest: 'ip-adapter_tiny"),
    ([{"model": "ip-adapter_tiny_sdxl", "image": "x"}], r"IP-Adapter 'ip-adapter_tiny_sdxl \[\w+\]' \(64-wide "
                                                          r"context\) is not made for the source 'base'"),
    ([{"model": "ip-adapter_tiny_sd15_vitg", "image": "x"}], r"trained with the ViT-bigG image encoder, but "
                                                               r"'ip-adapter_clip_h' is ViT-H"),
    ([{"model": "ip-adapter_tiny_sd15", "image": "x", "module": "ip-adapter_clip_g"}],
     r"trained with the ViT-H image encoder, but 'ip-adapter_clip_g' is ViT-bigG"),
    ([{"model": "ip-adapter-faceid_tiny_sd15", "image": "x", "module": "ip-adapter_face_id"}],
     r"FaceID encoder 'ip-adapter_face_id' \(IP-Adapter unit 1\) needs its face model"),
    ([{"model": "ip-adapter-faceid_tiny_sd15", "image": "x"}], r"needs an ip-adapter_face_id encoder, not "
                                                                 r"'ip-adapter_clip_h'"),
    ([{"model": "control_tiny_sd15_canny", "image": "x"}], r"'control_tiny_sd15_canny \[\w+\]' is not an "
                                                             r"IP-Adapter"),
    ([{"model": "ip-adapter_tiny_sd15", "image": "x", "module": "canny"}], r"'canny' \(IP-Adapter unit 1\) is not "
                                                                           r"an IP-Adapter image encoder"),
    ([{"model": "ip-adapter_tiny_sd15", "image": "bm90IGFuIGltYWdl"}], r"reference image \(IP-Adapter unit 1\) is "
                                                                       r"not a readable image"),
    ([{"model": "ip-adapter_tiny_sd15"}], r"No reference image was given \(IP-Adapter unit 1\)"),
])
def test_bad_units_are_refused_before_anything_loads(ui, units, message):
    loads = encoder_loads()
    with pytest.raises(DeltaError, match=message) as e:
        ui.txt2img(delta(ipadapters=units), **BASE)
    assert e.value.status_code == 422
    assert a1111_source.cached() == [] and ip_mod.POOL.models() == [] and encoder_loads() == loads
    assert torch.isfinite(images(ui.txt2img(**BASE))).all()  # and the WebUI keeps serving


def test_a_missing_encoder_file_and_a_missing_extension_are_refused(ui, files, monkeypatch):
    monkeypatch.setattr(sys.modules["annotator.annotator_path"], "models_path", str(files / "nowhere"))
    with pytest.raises(DeltaError, match=r"image encoder 'ip-adapter_clip_h' \(IP-Adapter unit 1\) is not "
                                         r"downloaded .*clip_h\.pth is missing.*does not download") as e:
        ui.txt2img(delta(ipadapters=[unit()]), **BASE)
    assert e.value.status_code == 422 and a1111_source.cached() == []
    monkeypatch.undo()
    one = unit()
    with pytest.raises(DeltaError, match=r"lists 3 IP-Adapter units; at most 2"):
        ui.txt2img(delta(ipadapters=[one] * 3), **BASE)
    controlnet_ext.uninstall()
    with pytest.raises(DeltaError, match=r"IP-Adapter units need the sd-webui-controlnet extension") as e:
        ui.txt2img(delta(ipadapters=[one]), **BASE)
    assert e.value.status_code == 422 and a1111_source.cached() == []


# --- infotext and X/Y/Z ---------------------------------------------------------------------------------------------


def test_the_xyz_weight_axis_sets_every_unit_of_the_first_group(ui):
    from modules import processing

    axis = {a.label: a for a in interfaces.AXES}["[Delta] IP-Adapter weight"]
    off = images(ui.txt2img(**BASE))

    def cell(value):
        p = processing.StableDiffusionProcessingTxt2Img(scripts=ui.runner, script_args=(delta(ipadapters=[unit()]),
                                                                                        []), **BASE)
        axis.apply(p, value, None)
        return processing.process_images(p)

    assert torch.equal(images(cell(0.0)), off)
    half = cell(0.5)
    assert '"weight":0.5' in half.extra_generation_params["Delta IP Adapters"]
    assert torch.equal(images(half), images(ui.txt2img(delta(ipadapters=[unit(weight=0.5)]), **BASE)))


# --- the lifecycle: nothing of a unit survives the generation; the adapter is reused while named -----------------


def test_hooks_and_embeddings_go_with_the_run_the_adapter_stays_while_named(ui, monkeypatch):
    runs = []
    real_open = host.SLOT.open

    def open_(p, run):
        runs.append(weakref.ref(run))
        real_open(p, run)

    monkeypatch.setattr(host.SLOT, "open", open_)
    fresh = images(ui.txt2img(**BASE))
    first = images(ui.txt2img(delta(ipadapters=[unit()]), **BASE))
    [adapter] = ip_mod.POOL.models()
    assert not encoder_loaded()  # we loaded the encoder, so we unloaded it
    assert not any(_hooked(e) for e in a1111_source.cached())
    assert torch.equal(images(ui.txt2img(delta(ipadapters=[unit()]), **BASE)), first)
    assert ip_mod.POOL.models() == [adapter]  # reused, not read again
    ui.txt2img(delta(ipadapters=[unit("ip-adapter_tiny_sd15_b")]), **BASE)
    assert ip_mod.POOL.models() != [adapter] and adapter.model.ip_layers.to_kvs["1_to_k_ip"].weight.numel() == 0
    ui.txt2img(delta(adapted_prompt="red"), **BASE)
    assert ip_mod.POOL.models() == []  # released when not named
    gc.collect()
    assert all(r() is None or not r().ip_units for r in runs)

    from modules import shared

    model = shared.sd_model.model
    original = type(model).forward
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("an extension's UNet hook failed")
        return original(self, *args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(type(model), "forward", failing)
        with pytest.raises(Exception, match="an extension's UNet hook failed"):
            ui.txt2img(delta(ipadapters=[unit()]), **BASE)
    assert not any(_hooked(e) for e in a1111_source.cached())
    assert torch.equal(images(ui.txt2img(**BASE)), fresh)


def test_the_users_own_unit_on_the_active_model_works_beside_ours(ui):
    """Both at once: the extension's IP-Adapter on the target (its module-global hook) and ours on the source's
    adapted rows; the user's unit is untouched by ours (the same image as the extension alone when λ = 0), the
    encoder the user's unit loaded stays loaded, and the extension's globals are its own after the run."""
    own = [own_unit("ip-adapter_tiny_sd15_b", OTHER, weight=0.6)]
    alone = images(ui.txt2img(controlnet=own, **BASE))
    both_off = images(ui.txt2img(delta(ipadapters=[unit()], strength=0.0), controlnet=own, **BASE))
    both = images(ui.txt2img(delta(ipadapters=[unit()]), controlnet=own, **BASE))
    assert torch.equal(both_off, alone)
    assert torch.isfinite(both).all() and rel(both, alone) > 1e-3
    ip = sys.modules["scripts.ipadapter.plugable_ipadapter"]
    assert ip.current_model is None and ip.all_hacks == {}
    assert encoder_loaded()  # the user's unit loaded it (the extension keeps it): ours left it so


def test_a_start_that_fails_after_the_adapter_loaded_keeps_nothing(ui, monkeypatch):
    """The second unit's encoder fails: the adapter read for the first is released and nothing stays hooked."""
    real = ip_mod._embed
    seen = []

    def embed(plan, model):
        seen.append(1)
        if len(seen) == 2:
            raise DeltaError("the encoder failed")
        return real(plan, model)

    monkeypatch.setattr(ip_mod, "_embed", embed)
    fresh = images(ui.txt2img(**BASE))
    with pytest.raises(DeltaError, match="the encoder failed") as e:
        ui.txt2img(delta(ipadapters=[unit(), unit("ip-adapter_tiny_sd15_b")]), **BASE)
    assert e.value.status_code == 422 and ip_mod.POOL.models() == []
    assert host.SLOT.get() is None and not any(_hooked(e) for e in a1111_source.cached())
    monkeypatch.setattr(ip_mod, "_embed", real)
    assert torch.equal(images(ui.txt2img(**BASE)), fresh)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_source_on_the_gpu_gets_its_image_prompt_there_eagerly(ui, monkeypatch, capsys):
    """The source on cuda:0 (the stand-in's target stays on the CPU): the image prompt's keys and values go to the
    source's device, CUDA graph replay is off for the run (and said so), and the identity holds within the two
    devices' rounding."""
    from modules import shared

    made = []
    real = host.GraphedCall
    monkeypatch.setattr(host, "GraphedCall", lambda *a, **k: made.append(1) or real(*a, **k))
    monkeypatch.setattr(shared.opts, "delta_sampling_device", "cuda:0", raising=False)
    monkeypatch.setattr(shared.opts, "delta_sampling_cuda_graph", True, raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # TF32 alone differs from the CPU by 1e-3
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    kw = {**BASE, "steps": 8}
    reference = images(ui.txt2img(controlnet=[own_unit()], **kw))
    devices = []
    real_kv = ip_mod.LoadedIPUnit.kv

    def kv(self, n, marks, device, dtype):
        out = real_kv(self, n, marks, device, dtype)
        devices.append(out[0].device.type)
        return out

    monkeypatch.setattr(ip_mod.LoadedIPUnit, "kv", kv)
    out = images(ui.txt2img(delta(ipadapters=[unit()]), **kw))
    said = capsys.readouterr().out
    assert not made, f"a graph was recorded for a run with units; the log said: {said[-2000:]}"
    assert "CUDA graph replay is off" in said, said[-2000:]
    assert devices and set(devices) == {"cuda"}
    assert rel(out, reference) < 1e-4


# --- what the panel's dropdowns list ----------------------------------------------------------------------------------


def test_the_panels_ipadapter_lists_are_the_extensions_split_by_kind(ui):
    """The extension lists ControlNets and IP-Adapters together; the IP-Adapter dropdown offers the IP-Adapters
    (those of the source's family), the ControlNet dropdown the rest, the encoder dropdown the IP-Adapter
    preprocessors by the labels the ControlNet tab shows."""
    from lib_delta.args import IPAdapterUnit
    from lib_delta.fields import settings_of
    from lib_delta.hosts.a1111 import catalog
    from lib_delta.webui import lists

    ips = [listed(s) for s in ("ip-adapter_tiny_sd15", "ip-adapter_tiny_sd15_b", "ip-adapter_tiny_sd15_vitg",
                               "ip-adapter-faceid_tiny_sd15", "ip-adapter_tiny_sdxl")]
    assert catalog.missing("ipadapter") is None and catalog.missing("ipadapter_module") is None
    assert sorted(catalog.names("ipadapter")) == sorted(ips)
    assert catalog.names("controlnet") == [listed("control_tiny_sd15_canny")]
    assert catalog.names("ipadapter_module") == ["ip-adapter_clip_h", "ip-adapter_clip_g", "ip-adapter_face_id"]
    model, module = (next(s for s in settings_of(IPAdapterUnit) if s.name == n) for n in ("model", "module"))
    assert module.default in lists.choices(module)  # the default encoder is one the dropdown offers
    # the source's family from its file's header: "base" is SD1.5, "xl" SDXL
    assert lists.choices(model, "base") == ["None", *(n for n in catalog.names("ipadapter") if "sdxl" not in n)]
    assert lists.choices(model, "xl") == ["None", listed("ip-adapter_tiny_sdxl")]
    # a name the panel offers is one a unit resolves, and runs
    offered = next(n for n in lists.choices(model, "base") if n == listed("ip-adapter_tiny_sd15"))
    p = ui.txt2img(delta(ipadapters=[{**unit(), "model": offered, "module": lists.choices(module)[0]}]), **BASE)
    assert "Delta IP Adapters" in p.extra_generation_params
    controlnet_ext.uninstall()
    assert "sd-webui-controlnet extension, which is not installed" in catalog.missing("ipadapter")
    assert catalog.names("ipadapter") == [] and lists.choices(model, "base") == ["None"]


@pytest.mark.parametrize(("name", "is_ip"), [
    ("ip-adapter_sd15 [6a3f6166]", True), ("ip-adapter-plus-face_sdxl_vit-h [1]", True),
    ("ip_adapter_faceid_sd15", True), ("IPAdapter SD1.5 [2]", True), ("control_v11p_sd15_canny [d14c016b]", False),
    ("t2iadapter_canny_sd15", False), ("diffusers_xl_canny_mid", False)])
def test_ipadapters_are_told_from_controlnets_by_name(name, is_ip):
    assert ip_mod.is_ipadapter(name) is is_ip
