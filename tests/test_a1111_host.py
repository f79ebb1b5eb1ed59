"""The AUTOMATIC1111 host adapter, driven through the stand-in WebUI (tests/fake_webui) with tiny random models.

The generations run the real script file, the WebUI's call order and its CFG denoiser with callbacks; images are
the final latents. "Identical" means bit-identical tensors; the adapted-model identities hold within 1e-5 relative.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "fake_webui"))
import webui as fake

fake.install()

import networks  # noqa: E402

from lib_delta.errors import DeltaError  # noqa: E402
from lib_delta.hosts import a1111 as host  # noqa: E402
from lib_delta.hosts.a1111 import source as a1111_source  # noqa: E402
from lib_delta.hosts.a1111 import step as a1111_step  # noqa: E402
from lib_delta.lora.fold import WeightFold  # noqa: E402

PROMPT = "a photo of a cat on a red sofa"
NEGATIVE = "blurry, dark"
BASE = dict(prompt=PROMPT, negative_prompt=NEGATIVE, steps=4, seed=7, width=64, height=64, cfg_scale=5.0)


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("webui")
    models = root / "models"
    fake.write_checkpoint(models / "base.safetensors", "sd1", 1)
    fake.write_checkpoint(models / "other.safetensors", "sd1", 2)
    fake.write_checkpoint(models / "tuned.safetensors", "sd1", 3)
    fake.write_checkpoint(models / "xl.safetensors", "sdxl", 4)
    fake.write_checkpoint(models / "v2v.safetensors", "sd2v", 5, yaml_beside=True)
    fake.write_checkpoint(models / "inpaint.safetensors", "sd1-inpaint", 6)
    fake.write_checkpoint(models / "pix2pix.safetensors", "pix2pix", 8)
    fake.write_checkpoint(models / "pickled.ckpt", "sd1", 9)
    fake.write_checkpoint(models / "pickled_xl.ckpt", "sdxl", 10)
    (models / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    loras = root / "lora"
    loras.mkdir()
    ui = fake.WebUI(models)
    ui.load("base")
    from modules import shared

    networks.write_lora(loras / "style.safetensors", shared.sd_model, seed=11)
    networks.write_lora(loras / "unet_only.safetensors", shared.sd_model, seed=12, te=False)
    (loras / "corrupt.safetensors").write_bytes((loras / "style.safetensors").read_bytes()[:300])
    return root


@pytest.fixture
def ui(files):
    """A fresh WebUI session on the "base" checkpoint, with nothing cached."""
    a1111_source.forget_all()
    ui = fake.WebUI(files / "models")
    networks.list_available_networks(files / "lora")
    ui.load("base")
    yield ui
    a1111_source.forget_all()
    gc.collect()


def delta(**kw):
    return {"enabled": True, "source": "base", **kw}


def rel(a, b):
    return float((a - b).norm() / b.norm())


def images(processed):
    return torch.stack([im for im in processed.images if isinstance(im, torch.Tensor)])


# --- off means off ------------------------------------------------------------------------------------------------


def test_disabled_zero_strength_and_empty_window_are_bit_identical_to_off(ui):
    off = images(ui.txt2img(**BASE))
    for d in ({"enabled": False, "source": "base", "adapted_prompt": "x"},
              delta(adapted_prompt="in the snow", strength=0.0),
              delta(adapted_prompt="in the snow", start=0.5, end=0.5)):
        assert torch.equal(images(ui.txt2img(d, **BASE)), off)
    p = ui.txt2img(delta(adapted_prompt="in the snow", strength=0.0), **BASE)
    assert "Delta lambda: 0" in p.infotexts[0]


# --- the identity: target == source, λ = 1 equals the adapted model ---------------------------------------------


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "Heun", "DPM++ 2M", "DDIM"])
def test_prompt_delta_at_unit_strength_is_the_adapted_prompt(ui, sampler):
    adapted = images(ui.txt2img(**{**BASE, "prompt": PROMPT + ", in the snow"}, sampler_name=sampler))
    plain = images(ui.txt2img(**BASE, sampler_name=sampler))
    out = images(ui.txt2img(delta(adapted_prompt="in the snow"), **BASE, sampler_name=sampler))
    assert rel(plain, adapted) > 1e-2  # the adaptation really moves the image
    assert rel(out, adapted) < 1e-5


def test_identity_with_and_prompts_prompt_editing_and_batches(ui):
    kw = {**BASE, "prompt": "a [dog:cat:2] AND a red sofa :0.7", "batch_size": 2, "n_iter": 2}
    # the adapted prompt goes into every AND part, before its weight, so the rows stay the target's
    adapted_prompt = "a [dog:cat:2], in the snow AND a red sofa, in the snow :0.7"
    adapted = images(ui.txt2img(**{**kw, "prompt": adapted_prompt}))
    out = images(ui.txt2img(delta(adapted_prompt="in the snow"), **kw))
    assert out.shape[0] == 4 and rel(out, adapted) < 1e-5


def test_long_prompts_with_uneven_token_lengths(ui):
    long = " ".join(f"word{i}" for i in range(90))  # two 75-token chunks for the cond, one for the uncond
    kw = {**BASE, "prompt": long}
    adapted = images(ui.txt2img(**{**kw, "prompt": long + ", in the snow"}))
    out = images(ui.txt2img(delta(adapted_prompt="in the snow"), **kw))
    assert rel(out, adapted) < 1e-5


def test_lora_delta_at_unit_strength_is_the_webuis_own_lora(ui):
    own = images(ui.txt2img(**{**BASE, "prompt": PROMPT + " <lora:style:1>"}))
    plain = images(ui.txt2img(**BASE))
    out = ui.txt2img(delta(loras="<lora:style:1>"), **BASE)
    assert rel(plain, own) > 1e-2
    assert rel(images(out), own) < 1e-5
    info = out.infotexts[0]
    assert "Delta LoRAs: \"<lora:style:1>\"" in info
    # the source and its LoRA are credited where image sites read resources (see test_credits.py)
    style = networks.available_networks["style"]
    assert f"Lora hashes: \"style: {style.shorthash}\"" in info, info
    base = a1111_source.key_of(a1111_source.resolve("base"))[1]
    assert f'Hashes: {{"model:base": "{base}", "lora:style": "{style.shorthash}"}}' in info, info


def test_credits_merge_into_the_webuis_own_lora_hashes(ui):
    """The target's own LoRA (in the prompt) keeps the WebUI's entry; the source's is added beside it, once per
    name, on every pass (hires fix re-activates the prompt's LoRAs and rewrites the key)."""
    out = ui.txt2img(delta(loras="<lora:style:1><lora:unet_only:0.5>"),
                     **{**BASE, "prompt": PROMPT + " <lora:style:1>", "enable_hr": True, "hr_scale": 1.5,
                        "hr_second_pass_steps": 2, "denoising_strength": 0.6})
    info = out.infotexts[0]
    style, unet_only = (networks.available_networks[n].shorthash for n in ("style", "unet_only"))
    assert f"Lora hashes: \"style: {style}, unet_only: {unet_only}\"" in info, info
    assert info.count("Lora hashes:") == 1 and info.count("Hashes: {") == 1, info


def test_split_lora_weights_and_two_groups_add_up(ui):
    own = images(ui.txt2img(**{**BASE, "prompt": PROMPT + ", in the snow <lora:unet_only:0.5>"}))
    groups = [{"loras": "<lora:unet_only:0.5>"}, {"adapted_prompt": "in the snow"}]
    # target == source: the two deltas add up to the model with both adaptations, to first order only
    out = images(ui.txt2img({"enabled": True, "source": "base", "groups": groups}, **BASE))
    plain = images(ui.txt2img(**BASE))
    assert rel(out, own) < 0.2 * rel(plain, own)


def test_fine_tuned_checkpoint_delta(ui):
    ui.load("tuned")
    tuned = images(ui.txt2img(**BASE))
    ui.load("base")
    out = images(ui.txt2img(delta(checkpoint="tuned"), **BASE))
    assert rel(out, tuned) < 1e-5


# --- other families -------------------------------------------------------------------------------------------


def test_sd1_source_steers_sdxl_and_sd2v_targets(ui):
    for target in ("xl", "v2v"):
        ui.load(target)
        plain = images(ui.txt2img(**BASE))
        out = images(ui.txt2img(delta(adapted_prompt="in the snow"), **BASE))
        assert torch.isfinite(out).all()
        assert 1e-3 < rel(out, plain) < 1.0


def test_refused_pairs_and_models(ui):
    ui.load("pix2pix")
    with pytest.raises(DeltaError, match="instruct-pix2pix") as e:
        ui.txt2img(delta(adapted_prompt="x"), **BASE)
    assert e.value.status_code == 422
    ui.load("base")
    with pytest.raises(DeltaError, match="inpainting model"):
        ui.txt2img(delta(source="inpaint", adapted_prompt="x"), **BASE)


def test_inpainting_target_with_a_plain_source(ui):
    ui.load("inpaint")
    init = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 8, 8)
    mask[:, :, 4:] = 1.0
    kw = dict(**BASE, init_latent_input=init, latent_mask=mask, denoising_strength=0.8)
    plain = images(ui.img2img(**kw))
    out = images(ui.img2img(delta(adapted_prompt="in the snow"), **kw))
    keep = mask.expand_as(plain) == 0
    assert torch.equal(out[keep], plain[keep])  # the delta goes in before the blend
    assert not torch.equal(out, plain)


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_img2img_inpainting_keeps_the_protected_region(ui, sampler):
    init = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 8, 8)
    mask[:, 2:6, 2:6] = 1.0
    kw = dict(**BASE, init_latent_input=init, latent_mask=mask, denoising_strength=0.6, sampler_name=sampler)
    plain = images(ui.img2img(**kw))
    adapted = images(ui.img2img(**{**kw, "prompt": PROMPT + ", in the snow"}))
    out = images(ui.img2img(delta(adapted_prompt="in the snow"), **kw))
    keep = mask.expand_as(plain) == 0
    assert torch.equal(out[keep], plain[keep])
    assert rel(out, adapted) < 1e-5


def test_hires_fix_runs_a_second_guided_pass(ui):
    kw = dict(**BASE, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=3, denoising_strength=0.6)
    adapted = images(ui.txt2img(**{**kw, "prompt": PROMPT + ", in the snow"}))
    p = ui.txt2img(delta(adapted_prompt="in the snow"), **kw)
    out = images(p)
    assert out.shape[-1] == 12 and rel(out, adapted) < 1e-5


def test_refiner_steps_run_without_the_delta(ui, files):
    from modules import sd_models

    refiner = sd_models.get_closet_checkpoint_match("other")
    kw = dict(**BASE, refiner_checkpoint_info=refiner, refiner_switch_at=0.5)
    p = ui.txt2img(delta(adapted_prompt="in the snow"), **kw)
    assert "Delta refiner: stopped" in p.infotexts[0]
    assert torch.isfinite(images(p)).all()


def test_skipped_uncond_steps_use_the_cond_prediction(ui):
    from modules import shared

    shared.opts.skip_early_cond = 0.5
    adapted = images(ui.txt2img(**{**BASE, "prompt": PROMPT + ", in the snow"}))
    out = images(ui.txt2img(delta(adapted_prompt="in the snow"), **BASE))
    assert rel(out, adapted) < 1e-5


@pytest.mark.parametrize("option", ["skip_early_cond", "ngms"])
def test_skipped_uncond_steps_with_and_prompts_take_the_targets_rows(ui, monkeypatch, option):
    """With AND weights that do not sum to 1 the uncond row counts in the combine: where the WebUI skips it, it
    uses each image's first cond row instead, and so must the source."""
    from modules import shared

    if option == "skip_early_cond":
        monkeypatch.setattr(shared.opts, "skip_early_cond", 0.5)
        extra = {}
    else:
        monkeypatch.setattr(shared.opts, "s_min_uncond_all", True)
        extra = {"s_min_uncond": 100.0}
    prompt = "a cat :0.8 AND a red sofa :0.6"
    adapted = images(ui.txt2img(**{**BASE, **extra, "prompt": "a cat, in the snow :0.8 AND a red sofa, in the snow "
                                                               ":0.6"}))
    out = images(ui.txt2img(delta(adapted_prompt="in the snow"), **{**BASE, **extra, "prompt": prompt}))
    assert rel(out, adapted) < 1e-5


# --- failing loudly, and nothing left behind ------------------------------------------------------------------


@pytest.mark.parametrize(("settings", "words"), [
    (delta(source="nonexistent", adapted_prompt="x"), ["nonexistent", "checkpoint list"]),
    (delta(loras="<lora:missing:1>"), ["missing", "LoRAs"]),
    (delta(loras="<lora:corrupt:1>"), ["corrupt"]),
    (delta(source="broken", adapted_prompt="x"), ["broken.safetensors"]),
    ({"enabled": True, "source": "", "adapted_prompt": "x"}, ["no source checkpoint"]),
])
def test_bad_inputs_stop_the_generation_with_a_message(ui, settings, words):
    fresh = images(ui.txt2img(**BASE))
    with pytest.raises(Exception) as e:
        ui.txt2img(settings, **BASE)
    message = str(e.value)
    assert all(w in message for w in words), message
    assert e.value.status_code in (400, 422) and e.value.detail == message
    assert torch.equal(images(ui.txt2img(**BASE)), fresh)
    _assert_nothing_left(ui)


def test_pickled_checkpoint_goes_through_the_safe_loader(ui):
    out = images(ui.txt2img(delta(source="pickled", adapted_prompt="in the snow"), **BASE))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("error", "way_out"), [(RuntimeError("boom"), False),
                                               (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                                                True)], ids=["error", "oom"])
def test_an_error_inside_a_step_stops_the_generation(ui, monkeypatch, error, way_out):
    fresh = images(ui.txt2img(**BASE))
    from lib_delta.hosts.a1111 import step as a1111_step

    calls = []

    def broken(self, *args):
        calls.append(1)
        raise error

    monkeypatch.setattr(a1111_step.SourceEval, "__call__", broken)
    with pytest.raises(DeltaError, match=f"{type(error).__name__}: {error}") as e:
        ui.txt2img(delta(adapted_prompt="x"), **BASE)
    assert e.value.status_code == 500 and len(calls) == 1  # stopped at the first failing call
    assert ("set CFG mode to cond" in str(e.value)) == way_out  # out of memory names the ways to make room
    monkeypatch.undo()
    assert torch.equal(images(ui.txt2img(**BASE)), fresh)
    _assert_nothing_left(ui)


def test_nothing_leaks_after_enabled_and_failed_runs(ui):
    fresh = images(ui.txt2img(**BASE))
    ui.txt2img(delta(loras="<lora:style:1>", adapted_prompt="in the snow"), **BASE)
    _assert_nothing_left(ui)
    assert torch.equal(images(ui.txt2img(**BASE)), fresh)
    with pytest.raises(DeltaError):
        ui.txt2img(delta(loras="<lora:missing:1>"), **BASE)
    assert torch.equal(images(ui.txt2img(**BASE)), fresh)
    _assert_nothing_left(ui)


def _assert_nothing_left(ui):
    from modules import sd_hijack, shared

    assert sd_hijack.model_hijack.clip is shared.sd_model.cond_stage_model
    for entry in a1111_source.cached():
        assert not any("_delta_lora_patched" in vars(m) or "forward" in vars(m) for m in entry.model.modules())
        assert entry.device.type == "cpu"
    for m in shared.sd_model.modules():
        assert "forward" not in vars(m)


def test_callbacks_register_once_and_survive_a_script_reload(ui):
    from modules import script_callbacks

    def count():
        return [sum(c.callback is fn for c in script_callbacks.callback_map[f"callbacks_{k}"])
                for k, fn in (("cfg_denoiser", host._on_cfg_denoiser), ("cfg_denoised", host._on_cfg_denoised))]

    assert count() == [1, 1]
    with fake.without_ui_registration():
        host.register()
    assert count() == [1, 1]
    script_callbacks.clear_callbacks()  # what the WebUI does before re-importing scripts
    ui.load_script()
    assert count() == [1, 1]
    out = images(ui.txt2img(delta(adapted_prompt="in the snow"), **BASE))
    adapted = images(ui.txt2img(**{**BASE, "prompt": PROMPT + ", in the snow"}))
    assert rel(out, adapted) < 1e-5


def test_cache_policy(ui):
    from modules import shared

    ui.txt2img(delta(adapted_prompt="x"), **BASE)
    assert len(a1111_source.cached()) == 1
    first = a1111_source.cached()[0]
    ui.txt2img(delta(adapted_prompt="y"), **BASE)
    assert a1111_source.cached() == [first]  # reused, not reloaded
    shared.opts.delta_sampling_cache = "free"
    ui.txt2img(delta(adapted_prompt="x"), **BASE)
    assert a1111_source.cached() == []


def test_preview_strip_is_appended(ui):
    p = ui.txt2img(delta(adapted_prompt="in the snow", preview=True), **BASE)
    strip = p.images[-1]
    array = strip if isinstance(strip, np.ndarray) else np.asarray(strip)
    assert array.dtype == np.uint8 and array.shape[2] == 3
    tile = array.shape[0] // 4  # rows: target, base, adapted, |Δ|; one column per kept step
    assert array.shape[0] == 4 * tile and 1 <= array.shape[1] // tile <= 4
    assert len(p.infotexts) == len(p.images)


def test_a_16_channel_source_is_refused_with_the_latent_message(ui):
    from types import SimpleNamespace

    from modules import shared

    info = SimpleNamespace(name="sd3_medium.safetensors", name_for_extra="sd3_medium")
    sd3 = SimpleNamespace(is_sd3=True, latent_channels=16, cond_stage_key="txt", depth_model=None,
                          model=SimpleNamespace(conditioning_key="crossattn"), sd_checkpoint_info=info)
    with pytest.raises(DeltaError, match=r"'sd3_medium' \(SD3, 16 latent channels\) cannot steer the target 'base'"):
        host._check_pair(sd3, shared.sd_model, "source")


def test_a_refusal_suggests_only_families_automatic1111_loads(ui):
    """An SD1 source for an SD3 target: the way out names SD3, not Flux, which this WebUI cannot load."""
    from types import SimpleNamespace

    from modules import shared

    info = SimpleNamespace(name="sd3_medium.safetensors", name_for_extra="sd3_medium")
    sd3 = SimpleNamespace(is_sd3=True, latent_channels=16, cond_stage_key="txt", depth_model=None,
                          model=SimpleNamespace(conditioning_key="crossattn"), sd_checkpoint_info=info)
    with pytest.raises(DeltaError) as e:
        host._check_pair(shared.sd_model, sd3, "source")
    assert "a 16-channel model such as SD3)" in str(e.value) and "Flux" not in str(e.value)


def test_an_alternative_unet_is_refused(ui, monkeypatch):
    from types import SimpleNamespace

    from modules import sd_unet

    monkeypatch.setattr(sd_unet, "current_unet", object())
    monkeypatch.setattr(sd_unet, "current_unet_option", SimpleNamespace(label="TensorRT"))
    with pytest.raises(DeltaError, match="TensorRT"):
        ui.txt2img(delta(adapted_prompt="x"), **BASE)


def test_base_first_with_the_target_as_source_changes_nothing(ui):
    plain = images(ui.txt2img(**BASE))
    out = images(ui.txt2img({"enabled": True, "source": "base", "mode": "base-first", "end": 0.5,
                             "source_cfg": BASE["cfg_scale"]}, **BASE))
    assert rel(out, plain) < 1e-5


def test_base_first_guides_the_source_with_its_own_scale(ui):
    """A distilled target runs at CFG 1-2; base-first's source is guided at 7 unless told otherwise, so the layout
    steps are the guided source's. Over the whole window the image is the source's own at CFG 7."""
    guided = images(ui.txt2img(**{**BASE, "cfg_scale": 7.0}))
    out = images(ui.txt2img({"enabled": True, "source": "base", "mode": "base-first"}, **{**BASE, "cfg_scale": 1.5}))
    assert rel(out, guided) < 1e-5
    same = images(ui.txt2img({"enabled": True, "source": "base", "mode": "base-first", "source_cfg": 3.0},
                             **{**BASE, "cfg_scale": 1.5}))
    assert rel(same, images(ui.txt2img(**{**BASE, "cfg_scale": 3.0}))) < 1e-5


def test_a_source_scale_equal_to_the_targets_is_the_default_in_delta_mode(ui):
    auto = images(ui.txt2img(delta(adapted_prompt="in the snow"), **BASE))
    named = images(ui.txt2img(delta(adapted_prompt="in the snow", source_cfg=BASE["cfg_scale"]), **BASE))
    other = images(ui.txt2img(delta(adapted_prompt="in the snow", source_cfg=12.0), **BASE))
    assert torch.equal(auto, named) and rel(other, auto) > 1e-3


@pytest.mark.parametrize("changes", [{"cfg_mode": "cond"}, {"trajectory": "separate"}])
def test_cond_mode_and_separate_trajectory(ui, changes):
    plain = images(ui.txt2img(**BASE))
    adapted = images(ui.txt2img(**{**BASE, "prompt": PROMPT + ", in the snow"}))
    out = images(ui.txt2img(delta(adapted_prompt="in the snow", **changes), **BASE))
    assert torch.isfinite(out).all() and rel(out, plain) > 1e-3
    if "trajectory" in changes:  # target == source: the separate trajectory is the shared one
        assert rel(out, adapted) < 1e-4


def test_a_fine_tuned_checkpoint_of_another_family_is_refused(ui):
    with pytest.raises(DeltaError, match="not of the source's family"):
        ui.txt2img(delta(checkpoint="xl"), **BASE)


@pytest.mark.parametrize("model", ["xl", "v2v"])
@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_sdxl_and_v_prediction_sources(ui, model, sampler):
    ui.load(model)
    kw = {**BASE, "sampler_name": sampler}
    adapted = images(ui.txt2img(**{**kw, "prompt": PROMPT + ", in the snow"}))
    out = images(ui.txt2img(delta(source=model, adapted_prompt="in the snow"), **kw))
    assert rel(out, adapted) < 1e-5


# --- the source replayed as a CUDA graph -------------------------------------------------------------------------


class ReplayingGraphs:
    """The CUDA-graph backend's contract on the CPU: "records" by running the call on its static inputs, and each
    replay runs it again on them, writing into the recorded outputs (tests/test_cuda_graph.py uses the same)."""

    def __init__(self):
        self.captures = 0

    def usable(self, tensors):
        return bool(tensors)

    def capture(self, run, device):
        from torch.utils import _pytree as pytree

        self.captures += 1
        outputs = run()

        def replay():
            for old, new in zip(pytree.tree_leaves(outputs), pytree.tree_leaves(run()), strict=True):
                old.copy_(new)

        return replay, outputs


def test_graphed_source_gives_the_eager_images_and_records_once_per_shape(ui, monkeypatch):
    from lib_delta import cuda_graph

    backend = ReplayingGraphs()
    allowed = a1111_source.graphs_allowed
    kw = {**BASE, "steps": 8, "batch_size": 1, "n_iter": 2}
    settings = delta(loras="<lora:style:1>", adapted_prompt="in the snow")
    eager = images(ui.txt2img(settings, **kw))
    monkeypatch.setattr(a1111_source, "graphs_allowed", lambda device: True)
    monkeypatch.setattr(cuda_graph, "CudaGraphs", lambda: backend)
    graphed = ui.txt2img(settings, **kw)
    assert torch.equal(images(graphed), eager)
    # one recording for the [base | adapted] rows of the first image; the second image replays it
    assert backend.captures == 1
    # short passes stay eager: recording costs more than it saves there
    backend.captures = 0
    ui.txt2img(settings, **{**kw, "steps": 4})
    assert backend.captures == 0
    # the option switches it off
    from modules import shared

    assert allowed(torch.device("cuda"))  # a GPU without --lowvram/--medvram
    monkeypatch.setattr(shared.opts, "delta_sampling_cuda_graph", False, raising=False)
    assert not allowed(torch.device("cuda"))
    assert not allowed(torch.device("cpu"))


def test_the_source_keeps_its_own_largest_noise_level(ui, monkeypatch):
    """The source's σ cap comes from its own schedule (SD1: linear betas 0.00085-0.012 over 1000 steps), read at
    load, not from the target's alphas that a pass gives it."""
    seen = []
    real = host.ModelSpace
    monkeypatch.setattr(host, "ModelSpace", lambda *a, **k: seen.append(k.get("sigma_max")) or real(*a, **k))
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    last = float(torch.cumprod(1 - betas, 0)[-1])
    want = ((1 - last) / last) ** 0.5
    for target in ("v2v", "base"):
        ui.load(target)
        ui.txt2img(delta(adapted_prompt="in the snow"), **BASE)
    (entry,) = a1111_source.cached()
    assert entry.sigma_max == pytest.approx(want, rel=1e-4)
    assert seen == [entry.sigma_max, entry.sigma_max]


# --- a source on another GPU, started before the target's forward ------------------------------------------------


def _guidances(monkeypatch) -> list:
    made = []
    real = a1111_step.DeltaGuidance

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(a1111_step, "DeltaGuidance", spy)
    return made


@pytest.mark.parametrize("sampler, trajectory", [("Euler", "shared"), ("DDIM", "shared"), ("Euler", "separate")])
def test_a_source_beside_the_target_is_started_first_and_changes_nothing(ui, monkeypatch, sampler, trajectory):
    """With the source on a GPU of its own, each step's source call starts at ``cfg_denoiser``, before the
    target's forward, and ``cfg_denoised`` takes that prediction: the same images, one source call per model call.
    On the CPU the "other GPU" is simulated; the GPU test below runs it on a real one."""
    kw = {**BASE, "sampler_name": sampler, "batch_size": 2, "enable_hr": True, "hr_scale": 1.5,
          "hr_second_pass_steps": 3, "denoising_strength": 0.6}
    settings = delta(loras="<lora:style:1>", adapted_prompt="in the snow", trajectory=trajectory)
    sequential = images(ui.txt2img(settings, **kw))
    made = _guidances(monkeypatch)
    monkeypatch.setattr(a1111_source, "runs_beside", lambda device: True)
    beside = images(ui.txt2img(settings, **kw))
    assert torch.equal(beside, sequential)
    assert len(made) == 2 and all(g.source_calls > 0 for g in made)  # the first pass and the hires pass
    for g in made:  # a separate trajectory's source point needs the target's previous prediction: not started early
        assert g.prefetched == (0 if trajectory == "separate" else g.source_calls)


def test_only_another_gpu_counts_as_beside(ui):
    from modules import devices

    assert devices.device.type == "cpu"
    assert not a1111_source.runs_beside(torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_source_on_the_gpu_replayed_as_a_cuda_graph_gives_the_eager_images(ui, monkeypatch):
    """The source on cuda:0 (the "Device for the source model" setting; the stand-in's target stays on the CPU),
    with the real CUDA-graph backend: the same images as eager calls on that GPU, from replays."""
    from modules import shared

    made = []

    class Recorded(host.GraphedCall):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(host, "GraphedCall", Recorded)
    stacked = []
    lay_out = WeightFold.lay_out

    def recording_lay_out(self, *args):
        before = self.wide()
        lay_out(self, *args)
        stacked.append(before is None and self.wide() is not None)

    monkeypatch.setattr(WeightFold, "lay_out", recording_lay_out)
    monkeypatch.setattr(shared.opts, "delta_sampling_device", "cuda:0", raising=False)
    assert a1111_source.runs_beside(torch.device("cuda:0"))  # the stand-in's target computes on the CPU
    guidances = _guidances(monkeypatch)
    kw = {**BASE, "steps": 8, "n_iter": 2}
    settings = delta(loras="<lora:style:1>", adapted_prompt="in the snow")
    plain = images(ui.txt2img(**BASE))
    monkeypatch.setattr(shared.opts, "delta_sampling_cuda_graph", False, raising=False)
    eager = images(ui.txt2img(settings, **kw))
    assert not made
    monkeypatch.setattr(shared.opts, "delta_sampling_cuda_graph", True, raising=False)
    graphed = images(ui.txt2img(settings, **kw))
    assert made and not [f for g in made for f in g.failures]
    # the LoRA layers were folded before the graph was keyed on their weights: one recording, then replays
    assert sum(g.captures for g in made) == 1 and sum(g.replays for g in made) == 2 * 8
    assert any(stacked)
    for entry in a1111_source.cached():  # and given compact weights back after the generation
        for p in entry.model.parameters():
            assert p.untyped_storage().nbytes() == p.numel() * p.element_size()
    # started on the GPU at cfg_denoiser, while the target computed on the CPU; the eager run too
    assert [g.prefetched for g in guidances] == [g.source_calls for g in guidances] == [8] * 4
    assert rel(graphed, eager) < 1e-5
    assert rel(graphed, images(ui.txt2img(**kw))) > 1e-2  # the delta really moved the images
    assert torch.equal(images(ui.txt2img(**BASE)), plain)  # and nothing of it is left behind


# --- the source at its own resolution ----------------------------------------------------------------------------


def _source_sizes(monkeypatch) -> list:
    """The latent sizes the source's forwards see."""
    seen = []
    real = a1111_step.forward_source

    def spy(lora, entry, wrapper, xs, *args):
        seen.append(tuple(xs.shape[-2:]))
        return real(lora, entry, wrapper, xs, *args)

    monkeypatch.setattr(a1111_step, "forward_source", spy)
    return seen


@pytest.mark.parametrize("target", ["base", "xl"])
def test_a_native_source_runs_at_its_own_size_and_changes_the_image(ui, monkeypatch, target):
    """With the tiny models' training size taken as 64 px, a 128 px request runs the source at 64 px (8×8
    latent cells), the delta upsampled; at 64 px "native" is today's computation bit for bit."""
    from lib_delta import resolution

    monkeypatch.setitem(resolution.NATIVE_SIDE, "SD1", 64)
    seen = _source_sizes(monkeypatch)
    ui.load(target)
    big = {**BASE, "width": 128, "height": 128}
    settings = delta(loras="<lora:style:1>", adapted_prompt="in the snow")
    plain = images(ui.txt2img(**big))
    at_target = images(ui.txt2img(settings, **big))
    assert set(seen) == {(16, 16)}
    seen.clear()
    p = ui.txt2img({**settings, "source_resolution": "native"}, **big)
    native = images(p)
    assert set(seen) == {(8, 8)}
    assert torch.isfinite(native).all() and rel(native, plain) > 1e-3 and rel(native, at_target) > 1e-4
    assert "Delta source resolution: native" in p.infotexts[0]
    small = {**BASE}
    assert torch.equal(images(ui.txt2img({**settings, "source_resolution": "native"}, **small)),
                       images(ui.txt2img(settings, **small)))


def test_a_native_sdxl_source_is_conditioned_on_the_size_it_runs_at(ui, monkeypatch):
    """SDXL's size conditioning (original and target size) says the size the source runs at: its own area behind
    a larger image, the image's where it runs at the image's grid."""
    from lib_delta import resolution
    from lib_delta.hosts.a1111 import conds

    monkeypatch.setitem(resolution.NATIVE_SIDE, "SDXL", 64)
    seen, real = [], conds.encode
    monkeypatch.setattr(conds, "encode", lambda model, ps: (seen.append((ps.width, ps.height)), real(model, ps))[1])
    ui.load("xl")
    big = {**BASE, "width": 128, "height": 96}
    settings = delta(source="xl", adapted_prompt="in the snow")
    ui.txt2img(settings, **big)
    assert set(seen) == {(128, 96)}
    seen.clear()
    native = images(ui.txt2img({**settings, "source_resolution": "native"}, **big))
    assert set(seen) == {(64, 64)}, "where it runs: 64² in area on the latent grid (8 cells each way)"
    assert torch.isfinite(native).all()


def test_a_native_source_in_hires_fix_and_beside_the_target(ui, monkeypatch):
    """The hires pass (192 px) runs the source at its 64 px too; a source on another GPU is started before the
    target's forward where its point needs no prediction of the target's, and the images are the sequential ones."""
    from lib_delta import resolution

    monkeypatch.setitem(resolution.NATIVE_SIDE, "SD1", 64)
    kw = {**BASE, "width": 128, "height": 128, "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 3,
          "denoising_strength": 0.6}
    settings = delta(adapted_prompt="in the snow", source_resolution="native")
    seen = _source_sizes(monkeypatch)
    sequential = images(ui.txt2img(settings, **kw))
    assert set(seen) == {(8, 8)}
    made = _guidances(monkeypatch)
    monkeypatch.setattr(a1111_source, "runs_beside", lambda device: True)
    assert torch.equal(images(ui.txt2img(settings, **kw)), sequential)
    early = resolution.METHOD not in resolution.NEEDS_X0
    assert len(made) == 2 and all(g.source_calls > 0 and g.prefetched == (g.source_calls if early else 0)
                                  for g in made)


def test_a_native_inpainting_source_gets_its_image_conditioning_resized(ui, monkeypatch):
    from lib_delta import resolution

    monkeypatch.setitem(resolution.NATIVE_SIDE, "SD1", 64)
    ui.load("inpaint")
    init = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 16, 16)
    mask[:, :, 8:] = 1.0
    kw = dict(**{**BASE, "width": 128, "height": 128}, init_latent_input=init, latent_mask=mask,
              denoising_strength=0.8)
    plain = images(ui.img2img(**kw))
    seen = _source_sizes(monkeypatch)
    out = images(ui.img2img(delta(source="inpaint", adapted_prompt="in the snow", source_resolution="native"), **kw))
    keep = mask.expand_as(plain) == 0
    assert set(seen) == {(8, 8)} and torch.isfinite(out).all()
    assert torch.equal(out[keep], plain[keep]) and not torch.equal(out, plain)
