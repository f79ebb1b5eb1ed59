"""IP-Adapter units on the source's adapted rows in Forge 2 and Forge Neo, through the stand-in of Forge's built-in
IP-Adapter (tests/fake_forge/ipadapter.py) with tiny random models.

The reference for the identities is Forge's own unit on the active model (its ControlNet script running an
IP-Adapter model: the preprocessor's conditioning, then ``apply_ipadapter`` on ``p.sd_model.forge_objects.unet``):
with the source as the target and λ = 1, Delta Sampling's unit must give the same image.
"""

from __future__ import annotations

import re
import sys
import weakref

import numpy as np
import pytest
import safetensors.torch
import torch

from lib_delta.args import DeltaSettings
from tests.fake_forge import backend, controlnet, harness, ipadapter, webui
from tests.fake_forge.harness import Forge
from tests.pictures import b64png, huge_png
from tests.test_forge_controlnet import rel

pytestmark = pytest.mark.usefixtures("one_thread")
forge = harness.forge
neo = harness.neo
no_cycle_collection = harness.no_cycle_collection
H = "CLIP-ViT-H (IPAdapter)"


def reference_image(size: int = 48) -> np.ndarray:
    """A reference picture: a warm diagonal gradient with a dark square."""
    yy, xx = np.mgrid[:size, :size]
    img = np.stack([(xx * 5) % 256, (yy * 3) % 256, np.full_like(xx, 90)], axis=-1).astype(np.uint8)
    img[size // 4:size // 2, size // 4:size // 2] = 10
    return img


IMAGE = reference_image()


class World:
    """A Forge session with the SD1 checkpoint "base" and an SDXL "xl"; Forge's ControlNet folder holds two tiny SD1
    IP-Adapters, a tiny SDXL one, one whose header is that of a real SDXL adapter, a FaceID one, a pickle, a truncated
    file and a ControlNet; models/ControlNetPreprocessor holds a ViT-H-like encoder (the adapters' width) and a
    bigG-like one of another width."""

    def __init__(self, f: Forge):
        self.f = f
        self.base = f.checkpoint("base", family="sd1", seed=0)
        self.xl = f.checkpoint("xl", family="sdxl", seed=4)
        self.target = f.load(self.base)
        widths = ipadapter.attn2_widths(self.target.forge_objects.unet.model.diffusion_model)
        xl_widths = ipadapter.attn2_widths(f.load(self.xl).forge_objects.unet.model.diffusion_model)
        folder = f.tmp / "ControlNet"
        ipadapter.write_adapter(folder / "ip-adapter_tiny_sd15.safetensors", 32, widths, seed=31, scale=2.0)
        ipadapter.write_adapter(folder / "ip-adapter_tiny_sd15_b.safetensors", 32, widths, seed=32, scale=2.0)
        ipadapter.write_adapter(folder / "ip-adapter_tiny_sdxl.safetensors", 64, xl_widths, seed=33)
        ipadapter.write_adapter(folder / "ip-adapter_sdxl_header.safetensors", 2048, (640,), tokens=1, seed=34)
        ipadapter.write_adapter(folder / "ip-adapter-faceid_tiny_sd15.safetensors", 32, widths, seed=35,
                                extra={"ip_adapter.0.to_q_lora.down.weight": torch.zeros(4, 32)})
        torch.save({"ip_adapter": {"1.to_k_ip.weight": torch.zeros(8, 32)}}, str(folder / "ip-adapter_pickled.bin"))
        whole = (folder / "ip-adapter_tiny_sd15.safetensors").read_bytes()
        (folder / "ip-adapter_truncated.safetensors").write_bytes(whole[: len(whole) // 2])
        controlnet.write_controlnet(folder / "control_tiny_sd15_canny.safetensors", "sd1", seed=21)
        controlnet.use_folder(folder)
        models = f.tmp / "models"
        ipadapter.use_models(models)
        ipadapter.write_encoder(models / "ControlNetPreprocessor" / "CLIP-ViT-H-14.safetensors", 32, 2, 24, seed=41)
        ipadapter.write_encoder(models / "ControlNetPreprocessor" / "CLIP-ViT-bigG.safetensors", 48, 2, 40, seed=42)

    def unit(self, stem: str = "ip-adapter_tiny_sd15", **kw) -> dict:
        return {"model": controlnet.listed(stem), "image": b64png(IMAGE), **kw}

    def own(self, *units: dict):
        """The units as Forge's own ControlNet script runs them on the active model."""
        units = units or ({},)
        return (ipadapter.UserIPAdapter(), tuple({"model": controlnet.listed(u.pop("stem", "ip-adapter_tiny_sd15")),
                                                  "image": IMAGE, "module": H, **u} for u in map(dict, units)))

    def ours(self, units: list[dict], settings: dict | None = None, **kw) -> torch.Tensor:
        return self.f.run(self.target, self.base, {"ipadapters": units, **(settings or {})}, **kw)


@pytest.fixture
def world(forge) -> World:
    return World(forge)


@pytest.fixture
def neo_world(neo) -> World:
    return World(neo)


# --- the identity: target == source, λ = 1 equals Forge's own unit ---------------------------------------------------


def test_identity_with_forges_own_unit(world):
    plain = world.f.generate(world.target)
    reference = world.f.generate(world.target, others=[world.own()])
    out = world.ours([world.unit()])
    assert rel(reference, plain) > 1e-2  # the image prompt really moves the image
    assert rel(out, reference) < 1e-5


def test_identity_with_two_stacked_units_a_window_and_hires(world):
    hires = {"enable_hr": True, "hr_second_pass_steps": 3, "denoising_strength": 0.6}
    reference = world.f.generate(world.target, others=[world.own(
        {"weight": 0.7, "guidance_end": 0.5}, {"stem": "ip-adapter_tiny_sd15_b", "weight": 1.3,
                                               "guidance_start": 0.25})], **hires)
    out = world.ours([world.unit(weight=0.7, guidance_end=0.5),
                      world.unit("ip-adapter_tiny_sd15_b", weight=1.3, guidance_start=0.25)], **hires)
    assert rel(reference, world.f.generate(world.target, **hires)) > 1e-2
    assert rel(out, reference) < 1e-5


def test_identity_in_forge_neo_and_its_class_state_is_put_back(neo_world):
    w = neo_world
    cls = sys.modules["lib_ipadapter.IPAdapterPlus"].IPAdapterApply
    reference = w.f.generate(w.target, others=[w.own()])
    users = cls.ipadapter  # Neo keeps the user's last adapter on its class
    out = w.ours([w.unit()])
    assert rel(reference, w.f.generate(w.target)) > 1e-2
    assert rel(out, reference) < 1e-5
    assert cls.ipadapter is users  # ours never stays there


def test_the_a1111_encoder_name_of_the_unit_default_means_forges_vit_h(world):
    settings = DeltaSettings.from_dict({"source": "base", "ipadapters": [{"model": "m"}]})
    assert settings.groups[0].ipadapters[0].module == "ip-adapter_clip_h"
    assert torch.equal(world.ours([world.unit()]), world.ours([world.unit(module=H)]))


# --- off means off; base rows stay plain ---------------------------------------------------------------------------


def test_zero_strength_an_empty_window_and_weight_zero_are_bit_identical_to_off(world):
    off = world.f.generate(world.target)
    for settings in ({"strength": 0.0}, {"start": 0.5, "end": 0.5}):
        assert torch.equal(world.ours([world.unit()], settings), off)
    assert torch.equal(world.ours([world.unit(weight=0.0)]), off)
    assert ipadapter.encoder_loads, "the units above did load the encoder"


def test_base_rows_of_every_batched_call_get_plain_attention(world, monkeypatch):
    """Every source call with a unit, recomputed without it: the base rows (and a group without an image prompt) are
    bit for bit the same, each image-prompt group's rows move."""
    checked = harness.units_against_none(monkeypatch, "images")
    world.ours([world.unit()], prompt="a red cube AND a tall tree:0.6")
    assert len(checked) == 4 and min(checked) > 0 and max(checked) > 1e-3
    checked.clear()
    groups = [{"ipadapters": [world.unit()], "strength": 0.4},
              {"adapted_prompt": "wood", "strength": 0.3},
              {"ipadapters": [world.unit("ip-adapter_tiny_sd15_b", weight=0.6)], "strength": 0.3}]
    out = world.f.run(world.target, world.base, {"groups": groups})
    assert torch.isfinite(out).all() and len(checked) == 2 * 4 and min(checked) > 0 and max(checked) > 1e-3



def test_a_source_call_builds_each_groups_rows_once_for_all_its_cross_attentions(world, monkeypatch):
    """The gate runs in every attn2 of every step: the row index (a host-to-device copy) is built once per call
    shape and group, not once per layer; the images are those of a gate that builds it every time."""
    from lib_delta.hosts.forge import ip_rows

    built, real_rows = [], ip_rows.rows

    def counted(*args, **kwargs):
        built.append(args[0])
        return real_rows(*args, **kwargs)

    monkeypatch.setattr(ip_rows, "rows", counted)
    calls = []
    real_gated = ip_rows.gated
    monkeypatch.setattr(ip_rows, "gated", lambda groups, b: calls.append(real_gated(groups, b)) or calls[-1])
    groups = [{"ipadapters": [world.unit()], "strength": 0.4},
              {"ipadapters": [world.unit("ip-adapter_tiny_sd15_b", weight=0.6)], "strength": 0.3}]
    shared = world.f.run(world.target, world.base, {"groups": groups})
    layers = len(calls[0])
    assert layers > 1 and len({id(g._rows) for g in calls[0].values()}) == 1
    assert 0 < len(built) <= 2 * len(calls) * 2  # two groups, at most two call shapes (chunks) per call
    monkeypatch.setattr(ip_rows.AdaptedRowsAttn2, "__init__",
                        lambda self, owners, batch, row_cache=None: (
                            setattr(self, "owners", [(p, tuple(q)) for p, q in owners]),
                            setattr(self, "batch", batch), setattr(self, "_rows", _Forgetful()))[0])
    built.clear()
    calls.clear()
    fresh = world.f.run(world.target, world.base, {"groups": groups})
    assert len(built) >= 2 * layers * len(calls)  # every layer built each group's own: what the cache saves
    assert torch.equal(shared, fresh)


class _Forgetful(dict):
    """A row cache that keeps nothing."""

    def __setitem__(self, key, value) -> None:
        pass

# --- across families --------------------------------------------------------------------------------------------------


def test_an_sd1_ip_adapter_through_an_sd1_source_steers_an_sdxl_target(world):
    xl = world.f.load(world.xl)
    plain = world.f.generate(xl)
    p = world.f.processing(xl, {"enabled": True, "source": world.base, "ipadapters": [world.unit(weight=0.8)],
                                "strength": 0.5})
    out = webui.process_images(p)
    assert torch.isfinite(out).all() and rel(out, plain) > 1e-3
    stored = p.extra_generation_params["Delta IP Adapters"]
    assert b64png(IMAGE)[:40] not in stored
    back = DeltaSettings.from_infotext({"Delta source": world.base, "Delta IP Adapters": stored})
    unit = back.groups[0].ipadapters[0]
    assert unit.model == controlnet.listed("ip-adapter_tiny_sd15") and unit.weight == 0.8 and unit.image == ""


# --- refusals: a 422 with a clear message, nothing loaded ----------------------------------------------------------


@pytest.mark.parametrize(("unit", "message"), [
    ({"model": "ip-adapter_tiny_sd5"},
     r"IP-Adapter model 'ip-adapter_tiny_sd5' is not among Forge's ControlNet models\. Closest: 'ip-adapter_tiny"),
    ({"image": "bm90IGFuIGltYWdl"}, r"reference image \(IP-Adapter unit 1\) is not a readable image"),
    ({"image": huge_png(4097, 8)}, r"4097×8; at most 4096 pixels a side"),
    ({"image": ""}, r"No reference image was given \(IP-Adapter unit 1\)"),
    ({"model": "ip-adapter_sdxl_header"},
     r"IP-Adapter 'ip-adapter_sdxl_header \[\w+\]' \(SDXL\) is not made for the source 'base' \(SD1\)"),
    ({"module": "CLIP-ViT-bigG (IPAdapter)"},
     r"reads a 24-wide image embedding, but 'CLIP-ViT-bigG \(IPAdapter\)' is a 48-wide CLIP-vision encoder \(40 wide"),
    ({"module": "canny"}, r"'canny' \(IP-Adapter unit 1\) is not an IP-Adapter image encoder"),
    ({"module": "CLIP-ViT-L"}, r"IP-Adapter encoder \(IP-Adapter unit 1\) 'CLIP-ViT-L' is not among"),
    ({"model": "ip-adapter-faceid_tiny_sd15"},
     r"is a FaceID adapter and needs the encoder 'InsightFace\+CLIP-H \(IPAdapter\)', not 'CLIP-ViT-H"),
    ({"model": "ip-adapter-faceid_tiny_sd15", "module": "InsightFace+CLIP-H (IPAdapter)"},
     r"FaceID encoder 'InsightFace\+CLIP-H \(IPAdapter\)' \(IP-Adapter unit 1\) needs its face model"),
    ({"model": "ip-adapter_pickled"}, r"IP-Adapter 'ip-adapter_pickled \[\w+\]' is not a \.safetensors file"),
    ({"model": "ip-adapter_truncated"}, r"IP-Adapter 'ip-adapter_truncated \[\w+\]' is damaged or truncated"),
    ({"model": "control_tiny_sd15_canny"}, r"'control_tiny_sd15_canny \[\w+\]' is not an IP-Adapter"),
], ids=["unknown-model", "not-an-image", "huge-image", "no-image", "sdxl-adapter", "encoder-mismatch",
        "not-an-encoder", "unknown-encoder", "faceid-without-face-encoder", "faceid-without-face-model", "pickle",
        "truncated", "a-controlnet"])
def test_bad_units_are_refused_before_anything_loads(world, unit, message, no_cycle_collection):
    from lib_delta.hosts.forge import ipadapter as ip_mod
    from lib_delta.hosts.forge import models as forge_models

    fresh = world.f.generate(world.target)
    request = world.unit(**{k: v for k, v in unit.items() if k != "model"})
    if "model" in unit:
        names = [k for k in controlnet.controlnet_filename_dict if k.startswith(unit["model"] + " [")]
        request["model"] = names[0] if names else unit["model"]
    status, text, _ = harness.failure(lambda: world.ours([request]))
    assert status == 422 and re.search(message, text), text
    assert controlnet.loaded_files == [] and ipadapter.encoder_loads == [] and ip_mod.POOL.keys() == []
    assert forge_models.cached() == [] and ipadapter.download_attempts == []
    assert torch.equal(world.f.generate(world.target), fresh)  # and the WebUI keeps serving


def test_a_missing_encoder_file_is_refused_and_never_downloaded(world):
    (world.f.tmp / "models" / "ControlNetPreprocessor" / "CLIP-ViT-H-14.safetensors").unlink()
    status, text, _ = harness.failure(lambda: world.ours([world.unit()]))
    assert status == 422 and "The image encoder 'CLIP-ViT-H (IPAdapter)' (IP-Adapter unit 1) is not downloaded" in text
    assert ipadapter.download_attempts == [] and controlnet.loaded_files == []


def test_a_tiny_sdxl_adapter_on_an_sd1_source_and_a_missing_extension_are_refused(world, monkeypatch):
    """A header too small to name its family: the built source's cross-attention width refuses it, before the
    adapter loads; without Forge's IP-Adapter extension, the request is refused naming it."""
    status, text, _ = harness.failure(lambda: world.ours([world.unit("ip-adapter_tiny_sdxl")]))
    assert status == 422 and "(64-wide context) is not made for the source 'base' (32-wide context)" in text
    assert controlnet.loaded_files == [] and ipadapter.encoder_loads == []
    monkeypatch.delitem(sys.modules, "lib_ipadapter.IPAdapterPlus")
    status, text, _ = harness.failure(lambda: world.ours([world.unit()]))
    assert status == 422 and "need Forge's built-in IP-Adapter (sd_forge_ipadapter), which is not enabled" in text


# --- the encoder: Forge's loader and memory manager; shared with Forge's preprocessor; the pool -------------------


def test_the_encoder_is_loaded_by_forge_kept_while_named_and_released_after(world):
    from lib_delta.hosts.forge import ipadapter as ip_mod

    world.ours([world.unit()])
    path = str(world.f.tmp / "models" / "ControlNetPreprocessor" / "CLIP-ViT-H-14.safetensors")
    assert ipadapter.encoder_loads == [path]
    encoder = next(e.encoder for e in ip_mod.POOL.models() if e.encoder is not None)
    assert any(c["models"][0]() is encoder.patcher for c in backend.load_calls)  # the memory manager loaded it
    assert all(e.model is not encoder.patcher for e in backend.current_loaded_models)  # and it left after the run
    world.ours([world.unit(weight=0.5)])
    assert ipadapter.encoder_loads == [path]  # kept between generations that name it
    weight = encoder.model.visual_projection.weight
    del encoder
    world.f.generate(world.target, {"enabled": True, "source": world.base, "adapted_prompt": "x"})
    assert ip_mod.POOL.keys() == [] and weight.numel() == 0  # a generation that names none frees it


def test_an_encoder_forges_preprocessor_holds_is_shared_and_never_freed(world):
    from lib_delta.hosts.forge import ipadapter as ip_mod

    own = world.f.generate(world.target, others=[world.own()])
    users = controlnet.supported_preprocessors[H].clipvision
    world.ours([world.unit()])
    assert len(ipadapter.encoder_loads) == 1  # the user's, not loaded again
    assert any(e.encoder is users for e in ip_mod.POOL.models())
    ip_mod.forget_all()
    assert users.model.visual_projection.weight.numel() > 0
    assert torch.equal(world.f.generate(world.target, others=[world.own()]), own)


# --- the lifecycle: nothing of a unit survives the generation ---------------------------------------------------------


class AdapterSpy:
    """Weak references to each run's adapter modules, patches and image embeddings."""

    def __init__(self, monkeypatch):
        from lib_delta.hosts.forge import ipadapter as ip_mod

        self.refs: list[weakref.ref] = []
        real = ip_mod.load_group

        def load_group(*args, **kwargs):
            group = real(*args, **kwargs)
            self.refs += [weakref.ref(m) for m in group.modules()] + [weakref.ref(group)]
            self.refs += [weakref.ref(p) for p in group.attn2.values()]
            return group

        monkeypatch.setattr(ip_mod, "load_group", load_group)

    def alive(self) -> int:
        return sum(r() is not None for r in self.refs)


def test_nothing_of_a_unit_survives_a_finished_a_failed_or_an_interrupted_generation(world, monkeypatch,
                                                                                       no_cycle_collection):
    harness.assert_units_leave_nothing(world, monkeypatch, AdapterSpy)


def test_a_start_that_fails_while_applying_keeps_nothing(world, monkeypatch, no_cycle_collection):
    """The second unit's adapter cannot be applied: the first one's modules are freed at once, the fresh encoder is
    released, and the next plain image is the fresh one."""
    from lib_delta.hosts.forge import ipadapter as ip_mod

    spy = AdapterSpy(monkeypatch)
    cls = sys.modules["lib_ipadapter.IPAdapterPlus"].IPAdapterApply
    real = cls.apply_ipadapter
    built = []

    def apply(self, ipadapter, model, *args, **kwargs):
        if built:
            raise RuntimeError("damaged weights")
        out = real(self, ipadapter, model, *args, **kwargs)
        built.append(weakref.ref(self.ipadapter))
        return out

    fresh = world.f.generate(world.target)
    monkeypatch.setattr(cls, "apply_ipadapter", apply)
    status, text, _ = harness.failure(lambda: world.ours([world.unit(), world.unit("ip-adapter_tiny_sd15_b")]))
    assert status == 422 and "Forge's IP-Adapter failed on 'ip-adapter_tiny_sd15_b" in text and "damaged" in text
    assert built and built[0]() is None and ip_mod.POOL.keys() == [] and spy.alive() == 0
    assert world.f.adapter.SLOT.get() is None
    assert torch.equal(world.f.generate(world.target), fresh)


def test_the_fixture_adapter_and_encoder_are_not_degenerate(world):
    """The stand-in's files move the image for a reason: the adapter's weights are not zero, the embedding depends on
    the image."""
    path = world.f.tmp / "ControlNet" / "ip-adapter_tiny_sd15.safetensors"
    state = safetensors.torch.load_file(str(path))
    assert all(float(v.float().abs().max()) > 0 for v in state.values())
    encoder = ipadapter.load(str(world.f.tmp / "models" / "ControlNetPreprocessor" / "CLIP-ViT-H-14.safetensors"))
    with torch.no_grad():
        a = encoder.encode_image(controlnet.numpy_to_pytorch(IMAGE)).image_embeds
        b = encoder.encode_image(controlnet.numpy_to_pytorch(255 - IMAGE)).image_embeds
    assert rel(a, b) > 1e-2


def test_in_neo_an_unknown_encoder_is_a_422_too(neo_world):
    """Neo's ``get_preprocessor`` raises a KeyError for a name it does not list: still a 422 naming it."""
    status, text, _ = harness.failure(lambda: neo_world.ours([neo_world.unit(module="CLIP-ViT-L")]))
    assert status == 422 and "IP-Adapter encoder (IP-Adapter unit 1) 'CLIP-ViT-L' is not among" in text


def test_an_encoder_forge_cannot_build_is_a_422_that_says_why(neo_world, monkeypatch, no_cycle_collection):
    """Neo 5692d2d's model patcher sets ``device`` on the transformers model, which transformers refuses: its
    loader raises for every CLIP-vision file. The unit is refused naming it; nothing stays loaded."""
    from lib_delta.hosts.forge import ipadapter as ip_mod

    def load(path):
        raise AttributeError("property 'device' of 'CLIPVisionModelWithProjection' object has no setter")

    fresh = neo_world.f.generate(neo_world.target)
    monkeypatch.setattr(sys.modules["backend.patcher.clipvision"], "load", load)
    status, text, _ = harness.failure(lambda: neo_world.ours([neo_world.unit()]))
    assert status == 422 and "Forge cannot load the image encoder 'CLIP-ViT-H (IPAdapter)'" in text
    assert "Forge's own IP-Adapter units fail the same way" in text
    assert "Update Forge Neo" in text and "or its transformers" not in text  # no transformers version allows it
    assert ip_mod.POOL.keys() == [] and neo_world.f.adapter.SLOT.get() is None
    assert torch.equal(neo_world.f.generate(neo_world.target), fresh)
